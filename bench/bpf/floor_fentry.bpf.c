// Floors for bench/fork_overhead.py on the fentry backend's hooks.
// bench/floors.py loads floor_common.h and this file as one text (BCC turns
// map calls into helper calls only in the text it is given) and substitutes
// every -D.
//
// EMPTY: programs that return at once, the price of the hooks (trampolines
// on the rmap functions, the kmem_cache_free and process tracepoints).
// Otherwise a VMA given an anon_vma by anon_vma_fork is held, a new
// anon_vma gets an owner; unlink_anon_vmas lets the VMA go; __put_anon_vma's
// free gives the anon_vma back. Exact per-process anon_vma counts, nothing else.
//
// OFF_VMA_ANON_VMA: vm_area_struct.anon_vma (BTF); RMAP_FUNC: the function
// the tool's rmap probe attaches to here; SITE_PUT_*: __put_anon_vma.

#define KFUNC_PROBE_X(fn, ...) KFUNC_PROBE(fn, __VA_ARGS__)

KRETFUNC_PROBE(anon_vma_fork, u64 vma, u64 pvma, int ret)
{
#ifndef EMPTY
    if (!ret)
        vma_forked(vma, bpf_get_current_pid_tgid() >> 32);
#endif
    return 0;
}

KFUNC_PROBE(unlink_anon_vmas, u64 vma)
{
#ifndef EMPTY
    vma_unlinked(vma);
#endif
    return 0;
}

KRETFUNC_PROBE(anon_vma_clone) { return 0; }
KFUNC_PROBE_X(RMAP_FUNC, u64 a0) { return 0; }

PUT_FREES_AND_PROCESS_HOOKS
