// SPDX-License-Identifier: GPL-2.0
//
// anontrace_compat.h: every kernel difference the BPF programs handle, in
// one place. User space decides each one by a feature test (BTF, kallsyms,
// tracefs; never the version number: tracer/kernel/compat.py) and passes the
// answer as a -D flag (tracer/kernel/bpf_source.py). This header turns those
// answers into the names the programs use. docs/kernels.md explains each.
//
// The changes, by the key tracer/kernel/compat.py files them under (a test
// checks that both lists agree):
//
// anon_vma_degree: commit 7a3ef208e662 ("mm: prevent endless growth of anon_vma hierarchy") (v3.19)
// anon_vma_num_children: commit 2555283eb40d ("mm/rmap: Fix anon_vma->degree ambiguity leading to double-reuse") (v6.0)
// kmem_free_name: commit 3544de8ee6e4 ("mm, tracing: record slab name for kmem_cache_free()") (v5.12)
// kmem_cache_arg: commit 2c1d697fb8ba ("mm/slab_common: drop kmem_alloc & avoid dereferencing fields when not using") (v6.1)
// exit_mmap_tracepoint: commit d4af56c5c7c6 ("mm: start tracking VMAs with maple tree") (v6.1)
// folio_set_anon: commit (hash not established) ("mm/rmap: move folio_test_anon() check out of __folio_set_anon()") (v6.7)
// exit_event_before_exit_mm: commit (hash not established) ("exit: move trace_sched_process_exit earlier in do_exit()") (v6.16)
// anon_vma_rework: commit (hash not established) ("mm: clean up anon_vma implementation") (v7.0)
// lookup_batch: commit cb4d03ab499d ("bpf: Add generic support for lookup batch op") (v5.6)
// ringbuf: commit 457f44363a88 ("bpf: Implement BPF ring buffer and verifier support for it") (v5.8)
// task_storage: commit 4cf1bc1f1045 ("bpf: Implement task local storage") (v5.11)
// task_vma_iter: commit 3a7b35b899de ("bpf: Introduce task_vma bpf_iter") (v5.12)
// recursion_misses: commit 9ed9e9ba2337 ("bpf: Count the number of times recursion was prevented") (v5.12)
// no_prealloc_tracing: commit 96da3f7d489d ("bpf: Remove tracing program restriction on map types") (v6.1)
// preemptible_tracepoints: commit (hash not established) ("tracing: Guard __DECLARE_TRACE() use of __DO_TRACE_CALL() with SRCU-fast") (v7.0)
// preemptible_trampoline: commit (hash not established) ("bpf: Use migrate_disable/enable in trampoline code") (v5.7)
//
// Only macros live here: BCC rewrites map calls in the main source file
// alone, so code that touches a map stays in anontrace.bpf.c and names the
// key of the change it handles.
#ifndef ANONTRACE_COMPAT_H
#define ANONTRACE_COMPAT_H

// anon_vma_degree / anon_vma_num_children (-DAV_HAS_DEGREE from BTF): one
// `degree` counted children and VMAs together; since 2555283eb40d (also in
// several stable series) `num_children` and `num_active_vmas` count them
// apart. ``buf`` holds the anon_vma span read by fill_anon_vma().
#ifdef AV_HAS_DEGREE
#define READ_AV_FANOUT(e, buf) \
    do { (e)->num_children = SPAN_NUM(buf, AV, AV_DEGREE); } while (0)
#else
#define READ_AV_FANOUT(e, buf) \
    do { \
        (e)->num_children = SPAN_NUM(buf, AV, AV_NUM_CHILDREN); \
        (e)->num_active_vmas = SPAN_NUM(buf, AV, AV_NUM_ACTIVE_VMAS); \
    } while (0)
#endif

// anon_vma_rework (-DCLONE_NARGS from BTF: anon_vma_clone() grew a third
// parameter, enum vma_operation, in the same series). The rework also made
// anon_vma_fork() allocate its anon_vma and chain entry *before* cloning the
// parent's chain and free both when the clone reused an ancestor (seen in
// 7.2: two kmem_cache_alloc calls, anon_vma_clone, the anon_vma's free from
// put_anon_vma, then the entry's free from anon_vma_fork). Until the
// operation ends those objects are not initialised: nothing may be read
// from them, and their free means "reused".
#if CLONE_NARGS >= 3
#define ANON_VMA_CLONE_PARAMS u64 dst, u64 src, u64 op
#define FORK_ALLOCATES_FIRST
#else
#define ANON_VMA_CLONE_PARAMS u64 dst, u64 src
#endif

// kmem_cache_arg (-DKMEM_RAW, with the argument positions of the cache from
// BTF's btf_trace_kmem_cache_alloc/free): the raw kmem tracepoints pass
// `struct kmem_cache *`, so the object size can be read from the cache
// without the perf-style tracepoint building its record (which copies the
// cache name on every slab operation system-wide).
#ifdef KMEM_RAW
#define KMEM_ALLOC_CACHE(ctx) ((ctx)->args[KMEM_ALLOC_CACHE_ARG])
#define KMEM_FREE_CACHE(ctx) ((ctx)->args[KMEM_FREE_CACHE_ARG])
#endif

// kmem_free_name (-DKMEM_FREE_HAS_NAME from the tracefs format): the
// perf-style kmem_cache_free record names the cache. Without it a free is
// an anon_vma's only at the put site.

// exit_mmap_tracepoint (-DHAVE_EXIT_MMAP_TP from tracefs): mmap:exit_mmap
// marks the end of an mm's teardown. Without it the state forgets an mm at
// its owner's exit event when the mm is already empty.

// exit_event_before_exit_mm: no flag. Older kernels run exit_mm() (which
// clears current->mm and, as the last user, tears the mm down VMA by VMA)
// before the sched_process_exit tracepoint; newer ones fire the tracepoint
// first. The programs handle both orders as they happen: the first unlink
// of a process's own teardown (current->mm already 0) takes its exit
// figures on the older order, the exit event on the newer one, so "figures
// at exit" mean "just before its teardown" everywhere.

// task_storage (-DHAVE_TASK_STORAGE from kallsyms): an operation's pending
// state lives in task-local storage, else in a hash keyed by pid.

// task_vma_iter: the census (census.bpf.c and the BPF_ITER in
// anontrace.bpf.c) is a TRACING program: kernels that refuse fentry may
// still run it, and kernels without the iterator run no census.

// ringbuf (-DUSE_RINGBUF from kallsyms): events go through a BPF ring
// buffer, else through per-CPU perf buffers.

#endif /* ANONTRACE_COMPAT_H */
