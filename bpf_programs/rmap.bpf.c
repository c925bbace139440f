// SPDX-License-Identifier: GPL-2.0
//
// anontrace rmap census: the rmap width of every anon_vma on the host, read
// with a task_vma BPF iterator (anontrace_compat.h: task_vma_iter).
//
// The rmap width of an anon_vma is the number of anon_vma_chain entries that
// name it: the VMAs in its interval tree, every one of which an rmap walk of
// one of its pages may visit. The kernel keeps no such count, so each run
// walks the chain of every VMA of every process and counts, per anon_vma,
// the entries naming it (rmap_av). A VMA's chain holds its own anon_vma and
// all its ancestors, so every anon_vma a chain reaches gets an entry with its
// parent, and user space can follow parents to the root.
//
// The VMAs of the processes in rmap_targets are also written out, one record
// per chain entry (anontrace tree).
//
// Entries carry the run's generation (rmap_gen[0], set by user space before
// each run) instead of being cleared: clearing a large hash costs one
// syscall per key, an entry of an older generation is simply reset here, and
// user space deletes the stale ones it reads.

#include "anontrace_common.h"

#ifndef RMAP_AV_MAX
#define RMAP_AV_MAX 1048576
#endif
#ifndef RMAP_MM_MAX
#define RMAP_MM_MAX 65536
#endif

// One anon_vma (tracer/kernel/rmap_census.py: AV_VALUE).
struct rmap_av {
    u64 parent;
    u64 root;
    u32 width;      // anon_vma_chain entries naming it this run
    u32 active;     // VMAs pointing at it (vma->anon_vma) this run
    u32 owner;      // the first process seen with a VMA pointing at it, 0 if none
    u32 children;   // its child anon_vmas (anontrace_compat.h: anon_vma_num_children)
    u32 gen;
    u32 pad;
};

// One chain entry of a target process's VMA (rmap_census.py: LINK).
struct rmap_link {
    u64 vm_start;
    u64 vm_end;
    u64 anon_vma;   // the VMA's own
    u64 chain_av;   // the anon_vma this entry links the VMA to
    u32 tgid;
    u32 index;      // position in the VMA's chain, newest first
};

// The process whose VMAs of one mm were counted this run.
struct rmap_mm {
    u32 tgid;
    u32 gen;
};

// RMAP_MAP_FLAGS: BPF_F_NO_PREALLOC where tracing programs may use such maps
// (compat: no_prealloc_tracing), so memory follows the host's anon_vmas.
BPF_F_TABLE("hash", u64, struct rmap_av, rmap_av, RMAP_AV_MAX, RMAP_MAP_FLAGS);
BPF_F_TABLE("hash", u64, struct rmap_mm, rmap_mm, RMAP_MM_MAX, RMAP_MAP_FLAGS);
BPF_HASH(rmap_targets, u32, u8, CENSUS_MAX);
BPF_ARRAY(rmap_gen, u32, 1);
// VMAs counted, chain entries counted, chains cut at MAX_CHAIN, inserts
// refused by a full map, VMAs skipped as another process's mm.
BPF_ARRAY(rmap_stats, u64, 5);
BPF_PERCPU_ARRAY(rmap_scratch, struct work, 1);

static __always_inline void stat_add(int idx, u64 v)
{
    u64 *c = rmap_stats.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, v);
}

// The entry of ``av`` for this run, reset (and its facts read) if it is
// new or of an older run; NULL if the map is full.
static __always_inline struct rmap_av *av_entry(struct event *scratch, u64 av, u32 gen)
{
    struct rmap_av *a = rmap_av.lookup(&av);
    if (a && a->gen == gen)
        return a;
    struct rmap_av fresh = {};
    struct spans *sp = spans_of(scratch);
    READ_SPAN(sp->av, av, AV);
    fresh.parent = SPAN_U64(sp->av, AV, AV_PARENT);
    fresh.root = SPAN_U64(sp->av, AV, AV_ROOT);
    READ_AV_FANOUT(scratch, sp->av);   // anontrace_compat.h: anon_vma_num_children
    fresh.children = scratch->num_children;
    fresh.gen = gen;
    if (a) {
        *a = fresh;
        return a;
    }
    if (rmap_av.update(&av, &fresh) != 0) {
        stat_add(3, 1);
        return NULL;
    }
    return rmap_av.lookup(&av);
}

BPF_ITER(task_vma)
{
    u64 task = (u64)ctx->task;
    u64 vma = (u64)ctx->vma;
    u32 tgid = census_tgid(task, vma);
    if (!tgid)
        return 0;
    int zero = 0;
    u32 *genp = rmap_gen.lookup(&zero);
    struct work *w = rmap_scratch.lookup(&zero);
    if (!genp || !w)
        return 0;
    u32 gen = *genp;
    // Count each address space once: a vfork child (its own process on
    // its parent's mm) is visited with the same VMAs.
    u64 mm = rd64(vma + OFF_VMA_MM);
    struct rmap_mm *seen = rmap_mm.lookup(&mm);
    if (seen && seen->gen == gen && seen->tgid != tgid) {
        stat_add(4, 1);
        return 0;
    }
    if (!seen || seen->gen != gen) {
        struct rmap_mm mine = {.tgid = tgid, .gen = gen};
        rmap_mm.update(&mm, &mine);
    }
    stat_add(0, 1);
    u8 *target = rmap_targets.lookup(&tgid);
    u64 own = rd64(vma + OFF_VMA_ANON_VMA);
    u64 vm_start = rd64(vma + OFF_VMA_START);
    u64 vm_end = rd64(vma + OFF_VMA_END);
    u64 head = vma + OFF_VMA_AVC;
    u64 n = rd64(head);
    u32 i;
    #pragma clang loop unroll(disable)
    for (i = 0; i < MAX_CHAIN; i++) {
        if (n == head || n == 0)
            break;
        u64 av = rd64(n - OFF_AVC_SAME_VMA + OFF_AVC_ANON_VMA);
        if (av) {
            struct rmap_av *a = av_entry(&w->e, av, gen);
            if (a)
                a->width++;
            stat_add(1, 1);
            if (target) {
                struct rmap_link l = {.vm_start = vm_start, .vm_end = vm_end,
                                      .anon_vma = own, .chain_av = av,
                                      .tgid = tgid, .index = i};
                bpf_seq_write(ctx->meta->seq, &l, sizeof(l));
            }
        }
        n = rd64(n);
    }
    if (i == MAX_CHAIN && n != head && n != 0)
        stat_add(2, 1);
    if (own) {
        struct rmap_av *a = av_entry(&w->e, own, gen);
        if (a) {
            a->active++;
            if (!a->owner)
                a->owner = tgid;
        }
    }
    return 0;
}
