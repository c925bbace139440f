// Floors for bench/fork_overhead.py on the tracepoint backend's hooks.
// bench/floors.py loads floor_common.h and this file as one text (BCC turns
// map calls into helper calls only in the text it is given) and substitutes
// every -D.
//
// EMPTY: programs that return at once, the price of having the hooks enabled.
// Otherwise each anon_vma and anon_vma_chain allocated at an rmap call site
// gets an owner, and each one freed gives it back: exact per-process object
// counts, nothing else (no depth, chains, VMAs or events).
//
// SITE_<K>_START/_END: call-site ranges (tracer.kernel.bpf_source.site_defines,
// as the tool's); SITE_OTHER_*: an out-of-line helper, where the compiler
// emitted one.

RAW_TRACEPOINT_PROBE(kmem_cache_alloc)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (IN_SITE(FORK, ip) || IN_SITE(CLONE, ip) || IN_SITE(PREPARE, ip) || IN_SITE(OTHER, ip))
        give(ctx->args[1], bpf_get_current_pid_tgid() >> 32);
#endif
    return 0;
}

RAW_TRACEPOINT_PROBE(kmem_cache_free)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (IN_SITE(UNLINK, ip) || IN_SITE(PUT, ip) || IN_SITE(FORK, ip) || IN_SITE(CLONE, ip) ||
        IN_SITE(OTHER, ip))
        take_back(ctx->args[1]);
#endif
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    // The bench's children are reaped whole: a process's count can go.
#ifndef EMPTY
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    objects.delete(&tgid);
#endif
    return 0;
}
