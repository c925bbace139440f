// SPDX-License-Identifier: GPL-2.0
//
// What anontrace.bpf.c (the tracer) and census.bpf.c (the VMA census) share:
// the event record and the reads that fill it. Member offsets are the OFF_*
// macros from tracer/kernel/bpf_source.py (BTF of the running kernel).
#ifndef ANONTRACE_COMMON_H
#define ANONTRACE_COMMON_H

#include "anontrace_compat.h"

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
#define C_LOST_SCRATCH 5     // per-task scratch not created (SCRATCH_PER_TASK)
#define NR_COUNTERS 6

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
    u64 num_children;   // or degree (anontrace_compat.h: anon_vma_degree)
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

// Each struct is read with one bpf_probe_read_kernel() of the byte range
// that covers the members we need (SPAN_*: tracer/kernel/layout.py); a fork makes
// dozens of events and each helper call costs more than the bytes it copies.
struct spans {
    u8 vma[SPAN_VMA_LEN];
    u8 av[SPAN_AV_LEN];
    u8 avc[SPAN_AVC_LEN];
};

// The per-CPU scratch every program builds its event in: the event, then the
// span copies its reads fill. BCC rewrites map calls only in the main file,
// so each program looks its scratch up and the helpers below reach the
// spans through the event (always the first member of a struct work).
struct work {
    struct event e;
    struct spans sp;
};

static __always_inline struct spans *spans_of(struct event *e)
{
    return &((struct work *)e)->sp;
}

// On a failed read the helper zeroes the copy: every member then reads 0,
// as rd() gives.
#define READ_SPAN(dst, ptr, prefix) \
    bpf_probe_read_kernel((dst), SPAN_##prefix##_LEN, (void *)((ptr) + SPAN_##prefix##_LO))
#define SPAN_U64(buf, prefix, key) (*(u64 *)((buf) + OFF_##key - SPAN_##prefix##_LO))
#define SPAN_NUM(buf, prefix, key) \
    (SZ_##key == 8 ? SPAN_U64(buf, prefix, key) : \
     SZ_##key == 4 ? (u64)*(u32 *)((buf) + OFF_##key - SPAN_##prefix##_LO) : \
     SZ_##key == 2 ? (u64)*(u16 *)((buf) + OFF_##key - SPAN_##prefix##_LO) : \
     (u64)*(u8 *)((buf) + OFF_##key - SPAN_##prefix##_LO))

// Fill parent, root, depth and fan-out of an anon_vma.
static __always_inline void fill_anon_vma(struct event *e, u64 av)
{
    e->anon_vma = av;
    if (!av)
        return;
    struct spans *sp = spans_of(e);
    READ_SPAN(sp->av, av, AV);
    e->root = SPAN_U64(sp->av, AV, AV_ROOT);
    e->parent = SPAN_U64(sp->av, AV, AV_PARENT);
    READ_AV_FANOUT(e, sp->av);   // anontrace_compat.h: anon_vma_num_children
    // A root anon_vma is its own parent (anon_vma_alloc()).
    u64 cur = av;
    u64 p = e->parent;
    u32 depth = 1;
    int i;
    for (i = 0; i < MAX_DEPTH; i++) {
        if (p == 0 || p == cur)
            break;
        cur = p;
        depth++;
        p = rd64(cur + OFF_AV_PARENT);
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
    struct spans *sp = spans_of(e);
    READ_SPAN(sp->vma, vma, VMA);
    e->vm_start = SPAN_U64(sp->vma, VMA, VMA_START);
    e->vm_end = SPAN_U64(sp->vma, VMA, VMA_END);
    e->mm = SPAN_U64(sp->vma, VMA, VMA_MM);
    u64 av = SPAN_U64(sp->vma, VMA, VMA_ANON_VMA);
    u64 head = vma + OFF_VMA_AVC;
    u64 n = SPAN_U64(sp->vma, VMA, VMA_AVC);
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
    fill_anon_vma(e, av);
}

// An anon_vma_chain's VMA and anon_vma, in one read.
static __always_inline u64 read_avc(struct event *e, u64 avc, u64 *anon_vma)
{
    struct spans *sp = spans_of(e);
    READ_SPAN(sp->avc, avc, AVC);
    *anon_vma = SPAN_U64(sp->avc, AVC, AVC_ANON_VMA);
    return SPAN_U64(sp->avc, AVC, AVC_VMA);
}

// Context of the task_vma iterator (kernel/bpf/task_iter.c; not in any
// header BCC compiles with). The layout is the iterator's ABI.
struct bpf_iter_meta {
    struct seq_file *seq;
    u64 session_id;
    u64 seq_num;
};

struct bpf_iter__task_vma {
    union { struct bpf_iter_meta *meta; };
    union { struct task_struct *task; };
    union { struct vm_area_struct *vma; };
};

// The census (anontrace_compat.h: task_vma_iter): the process whose VMA ``vma`` is,
// or 0 when there is nothing to read: a thread's visit (threads share their
// leader's mm, so each mm is visited once) or a VMA without an anon_vma.
static __always_inline u32 census_tgid(u64 task, u64 vma)
{
    if (!task || !vma)
        return 0;
    u32 tgid = rd(task + OFF_TASK_TGID, 4);
    if (rd(task + OFF_TASK_PID, 4) != tgid)
        return 0;
    if (!rd64(vma + OFF_VMA_ANON_VMA))
        return 0;
    return tgid;
}

// A census record of ``vma`` for process ``tgid``, read in its own mm (so
// the process owns it).
static __always_inline void census_fill(struct event *e, u32 tgid, u64 task, u64 vma)
{
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->kind = K_CENSUS_VMA;
    e->tgid = tgid;
    e->tid = tgid;
    bpf_probe_read_kernel(&e->comm, sizeof(e->comm), (void *)(task + OFF_TASK_COMM));
    fill_vma(e, vma);
    e->cur_mm = e->mm;
}

#endif /* ANONTRACE_COMMON_H */
