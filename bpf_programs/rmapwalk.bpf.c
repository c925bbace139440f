// SPDX-License-Identifier: GPL-2.0
//
// rmapwalk: what the kernel's rmap walks of anonymous folios really visit.
//
// rmap_walk_anon() (mm/rmap.c) runs the walk's rmap_one on every VMA that
// the folio's anon_vma interval tree returns for the folio's offset
// (anon_vma_interval_tree_iter_first/next, mm/interval_tree.c). Reused
// anon_vmas put VMAs in that tree that can never map the folio ("false
// aliasing"). Per walk this program counts the iterator's non-NULL results
// (VMAs visited) and reads the folio's mapcount (VMAs mapping it), and adds
// the walk to walk_stats, keyed by the root anon_vma of the folio's anon_vma.
// docs/rmap-walks.md explains the figures; tracer/format/rmapwalk.py is the
// Python side of struct walk_stats.
//
// Compiled by BCC with -D definitions from tracer/kernel/rmapwalk.py
// (walk_cflags(), the only place that parameterises this file): member
// offsets (OFF_*) and PG_HEAD come from the running kernel's BTF
// (tracer/kernel/layout.py, read_walk_layout), the functions and their
// parameter lists from kallsyms and BTF.
//   WALK_METHOD 1: fentry/fexit on WALK_FUNC, fexit on the two iterators
//   WALK_METHOD 2: kprobe/kretprobe on WALK_FUNC, kretprobes on the iterators

#include <uapi/linux/ptrace.h>

#ifndef NBINS
#define NBINS 16
#endif
#ifndef MAX_ROOTS
#define MAX_ROOTS 16384
#endif
#ifndef MAX_WALKERS
#define MAX_WALKERS 4096
#endif
// VMAs a walk examines, at most, to find the one that uses the root
// anon_vma itself (the family's owner); the VMA of the root is usually
// first in the tree, being linked into it first.
#ifndef OWNER_TRIES
#define OWNER_TRIES 32
#endif

// The low bits of folio->mapping: PAGE_MAPPING_ANON (the pointer is an
// anon_vma), both bits for KSM folios, which rmap_walk() never sends to
// rmap_walk_anon(). Preprocessor constants of the kernel, not in BTF.
#define MAPPING_ANON 1UL
#define MAPPING_FLAGS 3UL

// Loss counters (tracer/kernel/rmapwalk.py names them).
#define C_ROOTS_FULL 0     // walk_stats full: a walk of a new root not counted
#define C_WALKERS_FULL 1   // walking full: a walk not followed
#define NR_WALK_COUNTERS 2

struct walk_stats {
    u64 walks;
    u64 visited;
    u64 measured_visited;
    u64 mapped;
    u64 unmapped;
    u64 unmeasured;
    u64 below_one;
    u64 hist[NBINS];
    u32 owner_tgid;
    u32 pad;
    char owner_comm[16];
};

// A walk in progress, per task.
struct walk {
    u64 folio;
    u64 root;
    u32 visited;
    u32 mapped;          // at entry
    u32 owner_tgid;
    u16 owner_tries;
    u8 unmeasured;
    u8 pad;
    char owner_comm[16];
};

BPF_HASH(walk_stats, u64, struct walk_stats, MAX_ROOTS);
BPF_HASH(walking, u64, struct walk, MAX_WALKERS);
BPF_PERCPU_ARRAY(walk_counters, u64, NR_WALK_COUNTERS);

static __always_inline void count(int idx)
{
    u64 *c = walk_counters.lookup(&idx);
    if (c)
        (*c)++;
}

static __always_inline u64 rd64(u64 addr)
{
    u64 v = 0;
    if (addr)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

static __always_inline u32 rd32(u64 addr)
{
    u32 v = 0;
    if (addr)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

// VMAs mapping the folio: the mapcount, which the kernel keeps -1 based.
// A large folio's is the sum over its pages' mappings; where the kernel has
// no single counter for it (HAVE_LARGE_MAPCOUNT from BTF, see layout.py)
// the walk is not measured.
static __always_inline u32 mapcount(u64 folio, u8 *unmeasured)
{
    s32 c;
    if (rd64(folio + OFF_FOLIO_FLAGS) & (1ULL << PG_HEAD)) {
#ifdef HAVE_LARGE_MAPCOUNT
        c = (s32)rd32(folio + OFF_FOLIO_LARGE_MAPCOUNT);
#else
        *unmeasured = 1;
        return 0;
#endif
    } else {
        c = (s32)rd32(folio + OFF_FOLIO_MAPCOUNT);
    }
    // Below -1: the word holds something else (a page type), not a count.
    return c < -1 ? 0 : (u32)(c + 1);
}

static __always_inline u32 ratio_bin(u32 visited, u32 mapped)
{
    u32 r = visited / mapped;
    u32 bin = 0;
#pragma unroll
    for (int i = 1; i < NBINS; i++)
        if (r >> i)
            bin = i;
    return bin;
}

static __always_inline void walk_begins(u64 folio)
{
    u64 mapping = rd64(folio + OFF_FOLIO_MAPPING);
    if ((mapping & MAPPING_FLAGS) != MAPPING_ANON)
        return;
    u64 av = mapping & ~MAPPING_FLAGS;
    struct walk w = {};
    w.folio = folio;
    w.root = rd64(av + OFF_AV_ROOT);
    if (!w.root)
        w.root = av;
    w.mapped = mapcount(folio, &w.unmeasured);
    struct walk_stats *known = walk_stats.lookup(&w.root);
    if (known && known->owner_tgid)
        w.owner_tries = OWNER_TRIES;   // named already: no reads to spend
    u64 id = bpf_get_current_pid_tgid();
    if (walking.update(&id, &w))
        count(C_WALKERS_FULL);
}

// One non-NULL result of the interval-tree iterator: the walk visits the
// VMA of this anon_vma_chain.
static __always_inline void visited_one(u64 avc)
{
    if (!avc)
        return;
    u64 id = bpf_get_current_pid_tgid();
    struct walk *w = walking.lookup(&id);
    if (!w)
        return;   // an iteration outside rmap_walk_anon() (KSM, ...)
    w->visited++;
#ifdef HAVE_MM_OWNER
    if (w->owner_tgid || w->owner_tries >= OWNER_TRIES)
        return;
    w->owner_tries++;
    u64 vma = rd64(avc + OFF_AVC_VMA);
    if (!vma || rd64(vma + OFF_VMA_ANON_VMA) != w->root)
        return;
    u64 task = rd64(rd64(vma + OFF_VMA_MM) + OFF_MM_OWNER);
    if (!task)
        return;
    w->owner_tgid = rd32(task + OFF_TASK_TGID);
    bpf_probe_read_kernel(w->owner_comm, sizeof(w->owner_comm),
                          (void *)(task + OFF_TASK_COMM));
#endif
}

static __always_inline void walk_ends(void)
{
    u64 id = bpf_get_current_pid_tgid();
    struct walk *w = walking.lookup(&id);
    if (!w)
        return;   // began before the program was attached
    u8 unmeasured = w->unmeasured;
    u32 visited = w->visited;
    u32 mapped = w->mapped;
    if (!unmeasured) {
        // Walks that unmap (try_to_unmap, try_to_migrate) find the folio
        // mapped at entry; remove_migration_ptes() maps the new folio during
        // its walk. The larger count is the VMAs mapping it during the walk.
        u32 now = mapcount(w->folio, &unmeasured);
        if (now > mapped)
            mapped = now;
    }
    u64 root = w->root;
    struct walk_stats zero = {};
    struct walk_stats *s = walk_stats.lookup_or_try_init(&root, &zero);
    if (!s) {
        count(C_ROOTS_FULL);
        walking.delete(&id);
        return;
    }
    __sync_fetch_and_add(&s->walks, 1);
    __sync_fetch_and_add(&s->visited, visited);
    if (unmeasured) {
        __sync_fetch_and_add(&s->unmeasured, 1);
    } else if (!mapped) {
        __sync_fetch_and_add(&s->unmapped, 1);
    } else {
        __sync_fetch_and_add(&s->measured_visited, visited);
        __sync_fetch_and_add(&s->mapped, mapped);
        if (visited < mapped) {
            __sync_fetch_and_add(&s->below_one, 1);
        } else {
            u32 bin = ratio_bin(visited, mapped);
            if (bin >= NBINS)
                bin = NBINS - 1;
            __sync_fetch_and_add(&s->hist[bin], 1);
        }
    }
    if (w->owner_tgid && !s->owner_tgid) {
        // Two walks may both name it: the same process either way.
        s->owner_tgid = w->owner_tgid;
        __builtin_memcpy(s->owner_comm, w->owner_comm, sizeof(s->owner_comm));
    }
    walking.delete(&id);
}

// ---------------------------------------------------------------- fentry
#define KFUNC_PROBE_X(fn, ...) KFUNC_PROBE(fn, __VA_ARGS__)
#define KRETFUNC_PROBE_X(fn, ...) KRETFUNC_PROBE(fn, __VA_ARGS__)

#if WALK_METHOD == 1
KFUNC_PROBE_X(WALK_FUNC, WALK_ARGS)
{
    walk_begins(WALK_FOLIO);
    return 0;
}

KRETFUNC_PROBE_X(WALK_FUNC, WALK_ARGS)
{
    walk_ends();
    return 0;
}

KRETFUNC_PROBE_X(anon_vma_interval_tree_iter_first, ITER_FIRST_ARGS, u64 ret)
{
    visited_one(ret);
    return 0;
}

KRETFUNC_PROBE_X(anon_vma_interval_tree_iter_next, ITER_NEXT_ARGS, u64 ret)
{
    visited_one(ret);
    return 0;
}
#endif

// ---------------------------------------------------------------- kprobe
#if WALK_METHOD == 2
static __always_inline u64 kp_arg(struct pt_regs *ctx, int n)
{
    switch (n) {
    case 0: return PT_REGS_PARM1(ctx);
    case 1: return PT_REGS_PARM2(ctx);
    case 2: return PT_REGS_PARM3(ctx);
    }
    return 0;
}

int kp_walk_entry(struct pt_regs *ctx)
{
    walk_begins(kp_arg(ctx, WALK_FOLIO_IDX));
    return 0;
}

int kr_walk_exit(struct pt_regs *ctx)
{
    walk_ends();
    return 0;
}

int kr_iter_exit(struct pt_regs *ctx)
{
    visited_one(PT_REGS_RC(ctx));
    return 0;
}
#endif
