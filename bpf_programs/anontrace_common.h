// SPDX-License-Identifier: GPL-2.0
//
// What anontrace.bpf.c (the tracer) and census.bpf.c (the VMA census) share:
// the event record and the reads that fill it. Member offsets are the OFF_*
// macros from tracer/bpf_source.py (BTF of the running kernel).
#ifndef ANONTRACE_COMMON_H
#define ANONTRACE_COMMON_H

#define K_ANON_VMA_FORK 1
#define K_ANON_VMA_CLONE 2
#define K_UNLINK_ANON_VMAS 3
#define K_PAGE_SET_ANON_RMAP 4
#define K_AV_ALLOC 5
#define K_AV_FREE 6
#define K_AVC_ALLOC 7
#define K_AVC_FREE 8
#define K_PROC_FORK 9
#define K_PROC_EXEC 10
#define K_PROC_EXIT 11
#define K_SYNC 12          // derived backend: the task's pending operation ended
#define K_CENSUS_VMA 13    // a VMA that existed when tracing began (census.bpf.c)

// Event flags.
#define F_DEPTH_TRUNCATED 1  // parent walk hit MAX_DEPTH
#define F_CHAIN_TRUNCATED 2  // chain walk hit MAX_CHAIN
#define F_DEFERRED 4         // facts read after the allocating operation finished
#define F_THREAD 8           // PROC_FORK/EXIT of a thread, not a process

// Allocation/free call sites (kmem events, field `site`).
#define S_FORK 1
#define S_CLONE 2
#define S_PREPARE 3
#define S_UNLINK 4
#define S_PUT 5
#define S_OTHER 6

// Loss counters, surfaced by the loader.
#define C_LOST_OUTPUT 0      // ring/perf buffer full
#define C_LOST_ARGS 1        // kprobe entry args map full
#define C_LOST_NO_ENTRY 2    // kretprobe without a recorded entry
#define C_LOST_PENDING 3     // derived backend: pending map full
#define C_LOST_FILTER 4      // PID filter map full: a descendant was not added
#define NR_COUNTERS 5

#ifndef MAX_DEPTH
#define MAX_DEPTH 128
#endif
#ifndef MAX_CHAIN
#define MAX_CHAIN 128
#endif

struct event {
    u64 ts;
    u64 mm;          // mm of the VMA (or of the process, for PROC_*)
    u64 cur_mm;      // current->mm when the event fired
    u64 vma;
    u64 vm_start;
    u64 vm_end;
    u64 anon_vma;    // vma->anon_vma after the operation, or the object itself
    u64 parent;
    u64 root;
    u64 aux;         // clone: src vma; rmap: page/folio; kmem: the avc; fork: child mm
    u64 aux2;        // rmap: address; kmem: avc->anon_vma; proc: ppid-side mm
    u64 num_children;   // or degree on kernels before 2555283eb40d
    u64 num_active_vmas;
    u32 kind;
    u32 tgid;
    u32 tid;
    u32 depth;       // 1 = root; 0 = no anon_vma
    u32 chain_len;   // anon_vma_chain entries on the VMA
    s32 ret;
    u32 pid2;        // PROC_FORK: child tgid; PROC_EXEC: old pid
    u32 tid2;        // PROC_FORK: child tid
    u32 site;
    u32 flags;
    char comm[16];
};

static __always_inline u64 rd(u64 addr, u32 size)
{
    u64 v = 0;
    if (addr)
        bpf_probe_read_kernel(&v, size & 15, (void *)addr);
    return v;
}
#define rd64(a) rd((a), 8)

// Fill parent, root, depth and fan-out of an anon_vma.
static __always_inline void fill_anon_vma(struct event *e, u64 av)
{
    e->anon_vma = av;
    if (!av)
        return;
    e->root = rd64(av + OFF_AV_ROOT);
    e->parent = rd64(av + OFF_AV_PARENT);
#ifdef AV_HAS_DEGREE
    // Before 2555283eb40d (v6.0) one `degree` counted children + VMAs.
    e->num_children = rd(av + OFF_AV_DEGREE, SZ_AV_DEGREE);
#else
    e->num_children = rd(av + OFF_AV_NUM_CHILDREN, SZ_AV_NUM_CHILDREN);
    e->num_active_vmas = rd(av + OFF_AV_NUM_ACTIVE_VMAS, SZ_AV_NUM_ACTIVE_VMAS);
#endif
    // A root anon_vma is its own parent (anon_vma_alloc()).
    u64 cur = av;
    u32 depth = 1;
    int i;
    for (i = 0; i < MAX_DEPTH; i++) {
        u64 p = rd64(cur + OFF_AV_PARENT);
        if (p == 0 || p == cur)
            break;
        cur = p;
        depth++;
    }
    if (i == MAX_DEPTH)
        e->flags |= F_DEPTH_TRUNCATED;
    e->depth = depth;
}

// Fill the VMA's range, mm, chain length and anon_vma facts.
static __always_inline void fill_vma(struct event *e, u64 vma)
{
    e->vma = vma;
    if (!vma)
        return;
    e->vm_start = rd64(vma + OFF_VMA_START);
    e->vm_end = rd64(vma + OFF_VMA_END);
    e->mm = rd64(vma + OFF_VMA_MM);
    u64 head = vma + OFF_VMA_AVC;
    u64 n = rd64(head);
    u32 len = 0;
    int i;
    for (i = 0; i < MAX_CHAIN; i++) {
        if (n == head || n == 0)
            break;
        len++;
        n = rd64(n);
    }
    if (i == MAX_CHAIN)
        e->flags |= F_CHAIN_TRUNCATED;
    e->chain_len = len;
    fill_anon_vma(e, rd64(vma + OFF_VMA_ANON_VMA));
}

#endif /* ANONTRACE_COMMON_H */
