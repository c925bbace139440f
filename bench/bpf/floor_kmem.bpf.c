// Floors for bench/fork_overhead.py on the tracepoint backend's hooks
// (bench/floors.py substitutes every -D below).
//
// EMPTY: programs that return at once, the price of having the hooks enabled.
// Otherwise the cheapest tracer that keeps per-object state in maps, as the
// state design must: each anon_vma and anon_vma_chain allocated at an rmap
// call site gets its owner (object -> tgid) and its process a count; each
// such object freed finds its owner, takes the count down and goes. Exact
// per-process object counts, nothing else: no depth, chains, VMAs or events.
//
// SITE_<K>_START/_END: call-site ranges (tracer.kernel.probes.KMEM_SITES);
// SITE_OTHER_*: an out-of-line helper, where the compiler emitted one.

#ifndef EMPTY
#define IN(k, ip) ((ip) >= SITE_##k##_START && (ip) < SITE_##k##_END)

BPF_HASH(owner, u64, u32, 1048576);
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

RAW_TRACEPOINT_PROBE(kmem_cache_alloc)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (!(IN(FORK, ip) || IN(CLONE, ip) || IN(PREPARE, ip) || IN(OTHER, ip)))
        return 0;
    u64 ptr = ctx->args[1];
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    owner.update(&ptr, &tgid);
    count(tgid, 1);
    own();
#endif
    return 0;
}

RAW_TRACEPOINT_PROBE(kmem_cache_free)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (!(IN(UNLINK, ip) || IN(PUT, ip) || IN(FORK, ip) || IN(CLONE, ip) || IN(OTHER, ip)))
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

RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
#ifndef EMPTY
    // The bench's children are reaped whole; a thread's exit drops nothing
    // the counts need to be right for here.
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    objects.delete(&tgid);
#endif
    return 0;
}
