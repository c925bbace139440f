// What the floor programs share (bench/floors.py substitutes every -D).
//
// Unless EMPTY: the cheapest per-object state a tracer can keep in maps:
// an owner per object (object -> tgid) and a live count per process;
// ``owned`` counts the objects given an owner, proof the floor did its work.
// With RMAP_HOOKS (-D, the fentry and kprobe floors): the VMAs anon_vma_fork
// gave an anon_vma are held until unlink_anon_vmas, as a tracer that keeps
// per-VMA state must.

#define IN_SITE(k, ip) ((ip) >= SITE_##k##_START && (ip) < SITE_##k##_END)
#ifndef SITE_OTHER_START   // no out-of-line rmap helper: an empty range
#define SITE_OTHER_START 1ULL
#define SITE_OTHER_END 0ULL
#endif

#ifndef EMPTY
BPF_HASH(owner, u64, u32, 1048576);
BPF_HASH(objects, u32, s64, 65536);
BPF_PERCPU_ARRAY(owned, u64, 1);

static __always_inline void count(u32 tgid, s64 d)
{
    s64 *c = objects.lookup(&tgid);
    if (c)
        __sync_fetch_and_add(c, d);
    else
        objects.update(&tgid, &d);
}

// ``tgid`` owns one more object.
static __always_inline void own(u32 tgid)
{
    count(tgid, 1);
    int zero = 0;
    u64 *n = owned.lookup(&zero);
    if (n)
        (*n)++;
}

// ``obj`` was just allocated by ``tgid``.
static __always_inline void give(u64 obj, u32 tgid)
{
    owner.update(&obj, &tgid);
    own(tgid);
}

// ``obj`` is being freed: its owner's count goes down, if it had one.
static __always_inline void take_back(u64 obj)
{
    u32 *o = owner.lookup(&obj);
    if (!o)
        return;
    count(*o, -1);
    owner.delete(&obj);
}

#ifdef RMAP_HOOKS
BPF_HASH(vmas, u64, u32, 1048576);

// anon_vma_fork() succeeded for ``vma`` in ``tgid``.
static __always_inline void vma_forked(u64 vma, u32 tgid)
{
    u64 av = 0;
    bpf_probe_read_kernel(&av, sizeof(av), (void *)(vma + OFF_VMA_ANON_VMA));
    if (!av)
        return;
    vmas.update(&vma, &tgid);
    if (owner.insert(&av, &tgid) == 0)   // new, not a reused ancestor
        own(tgid);
}

static __always_inline void vma_unlinked(u64 vma)
{
    if (vmas.lookup(&vma))
        vmas.delete(&vma);
}
#endif
#endif

// The anon_vma frees (__put_anon_vma), which the rmap-hook backends watch
// through kmem_cache_free, and the process hooks they share.
static __always_inline void put_free(struct bpf_raw_tracepoint_args *ctx)
{
#ifndef EMPTY
    if (IN_SITE(PUT, ctx->args[0]))
        take_back(ctx->args[1]);
#endif
}

#define PUT_FREES_AND_PROCESS_HOOKS                                         \
RAW_TRACEPOINT_PROBE(kmem_cache_free) { put_free(ctx); return 0; }         \
RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }                              \
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }                     \
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }                     \
RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }
