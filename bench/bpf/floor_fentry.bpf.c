// Floors for bench/fork_overhead.py on the fentry backend's hooks
// (bench/floors.py substitutes every -D below).
//
// EMPTY: programs that return at once, the price of the hooks (trampolines
// on the rmap functions, the kmem_cache_free and process tracepoints).
// Otherwise the cheapest tracer that keeps per-object state in maps on these
// hooks: a VMA given an anon_vma by anon_vma_fork is held (VMA -> tgid), a
// new anon_vma gets its owner and its process a count; unlink_anon_vmas lets
// a held VMA go; an anon_vma freed by __put_anon_vma takes its owner's count
// down. Exact per-process anon_vma counts, nothing else.
//
// OFF_VMA_ANON_VMA: vm_area_struct.anon_vma (BTF); RMAP_FUNC: the function
// the tool's rmap probe attaches to here; SITE_PUT_*: __put_anon_vma.

#define KFUNC_PROBE_X(fn, ...) KFUNC_PROBE(fn, __VA_ARGS__)

#ifndef EMPTY
BPF_HASH(owner, u64, u32, 1048576);
BPF_HASH(vmas, u64, u32, 1048576);
BPF_HASH(objects, u32, s64, 65536);
BPF_PERCPU_ARRAY(owned, u64, 1);   // objects given an owner: the floor did its work

static __always_inline void own(void)
{
    int zero = 0;
    u64 *n = owned.lookup(&zero);
    if (n)
        (*n)++;
}

static __always_inline void count(u32 tgid, s64 d)
{
    s64 *c = objects.lookup(&tgid);
    if (c)
        __sync_fetch_and_add(c, d);
    else
        objects.update(&tgid, &d);
}
#endif

KRETFUNC_PROBE(anon_vma_fork, u64 vma, u64 pvma, int ret)
{
#ifndef EMPTY
    if (ret)
        return 0;
    u64 av = 0;
    bpf_probe_read_kernel(&av, sizeof(av), (void *)(vma + OFF_VMA_ANON_VMA));
    if (!av)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    vmas.update(&vma, &tgid);
    if (owner.insert(&av, &tgid) == 0) {   // new, not a reused ancestor
        count(tgid, 1);
        own();
    }
#endif
    return 0;
}

KFUNC_PROBE(unlink_anon_vmas, u64 vma)
{
#ifndef EMPTY
    if (vmas.lookup(&vma))
        vmas.delete(&vma);
#endif
    return 0;
}

KRETFUNC_PROBE(anon_vma_clone) { return 0; }
KFUNC_PROBE_X(RMAP_FUNC, u64 a0) { return 0; }

RAW_TRACEPOINT_PROBE(kmem_cache_free)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (!(ip >= SITE_PUT_START && ip < SITE_PUT_END))
        return 0;
    u64 ptr = ctx->args[1];
    u32 *o = owner.lookup(&ptr);
    if (!o)
        return 0;
    count(*o, -1);
    owner.delete(&ptr);
#endif
    return 0;
}

RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }
