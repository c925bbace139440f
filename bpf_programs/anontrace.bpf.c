// SPDX-License-Identifier: GPL-2.0
//
// anontrace: anon_vma lifecycle events.
//
// Compiled by BCC with -D definitions from tracer/kernel/bpf_source.py (the only
// place that parameterises this file). Struct member offsets come from the
// running kernel's BTF (OFF_* macros): this file never dereferences a kernel
// struct through the headers BCC compiles with, because on header-less hosts
// those headers describe a different kernel.
//
// Logical probes and how each can be built:
//   anon_vma_fork       fexit | kretprobe           | derived from kmem (tracepoint)
//   anon_vma_clone      fexit | kretprobe           | derived from kmem (tracepoint)
//   unlink_anon_vmas    fentry | kprobe             | derived from kmem (tracepoint)
//   page_set_anon_rmap  fentry | kprobe on the first attachable successor
// kmem:kmem_cache_alloc/free (filtered by call_site) report anon_vma and
// anon_vma_chain objects on every backend; raw sched tracepoints report
// process fork, exec and exit.

#include <uapi/linux/ptrace.h>
#include "anontrace_common.h"


#ifdef WITH_EVENTS
#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
#endif
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);
#ifndef SCRATCH_PER_TASK
BPF_PERCPU_ARRAY(scratch, struct work, 1);
#endif
BPF_HASH(filter, u32, u8, FILTER_MAX);

// Per-CPU values are added to atomically: where the kernel can preempt a
// task inside a BPF program (docs/state.md, "Preemption"), another task on
// the same CPU may update the same value between a read and its write.
static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
}

// The scratch a program builds its event in. Per CPU where no program of
// ours can be preempted: one program at a time runs on a CPU (interrupts
// aside, which never reach the scratch: see handle_free). Where the kernel
// can preempt a task inside a program (SCRATCH_PER_TASK, set from the
// preemption model: tracer.kernel.compat.programs_preemptible), another task
// would run another of our programs on that CPU and overwrite the preempted
// one's event; there each task has its own (task-local storage, freed with
// the task).
#ifdef SCRATCH_PER_TASK
BPF_TASK_STORAGE(scratch_task, struct work);

static __always_inline struct work *scratch_get(void)
{
    struct work *w = scratch_task.task_storage_get(bpf_get_current_task_btf(), 0,
                                                   BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!w)
        count(C_LOST_SCRATCH);
    return w;
}
#else
static __always_inline struct work *scratch_get(void)
{
    int zero = 0;
    return scratch.lookup(&zero);
}
#endif


// The current task's mm (0 for a kernel thread, or a task past exit_mm()).
static __always_inline u64 current_mm(void)
{
    return rd64((u64)bpf_get_current_task() + OFF_TASK_MM);
}

static __always_inline int wanted_tgid(u32 tgid)
{
#ifdef FILTER_ENABLED
    return filter.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

static __always_inline int wanted(void)
{
    return wanted_tgid(bpf_get_current_pid_tgid() >> 32);
}

// ------------------------------------------------------------ state maps
// With WITH_STATE the programs keep, in maps, every figure the reports and
// /metrics give (README "Definitions"), and user space reads the maps when it
// reports or is scraped: no VMA operation crosses to user space. Layouts are
// mirrored in tracer/kernel/kstate.py (checked by a unit test against this file).
#ifdef WITH_STATE
#define NB 64              // histogram bins: 0..NB-2 exact, NB-1 = "NB-1 or more"
#define NO_PROBE 4

// Global figures and counters (per CPU, summed by user space; signed: an
// anon_vma may be counted up on one CPU and down on another).
#define G_AVS 0            // live anon_vmas
#define G_CHAINS 1         // anon_vma_chain entries on tracked VMAs
#define G_ORPHANS 2        // live anon_vmas no tracked VMA points at
#define G_EVENTS 3         // 3..6: logical probe events (fork, clone, unlink, rmap)
#define G_ANOMALIES 7      // facts that contradict the state (see docs/state.md)
#define G_FULL 8           // 8..12: inserts refused by a full map, per map
#define G_FULL_VMA 8
#define G_FULL_AV 9
#define G_FULL_MM 10
#define G_FULL_PROC 11
#define G_FULL_FAM 12
#define G_NR 13

struct vstate {            // per VMA with (or that had) an anon_vma
    u64 mm;
    u64 av;
    u32 chain;
    u32 pad;
};

struct avstate {           // per live anon_vma
    u64 parent;
    u64 root;
    u64 owner;             // the mm whose VMAs point at it (see av_vma)
    u32 depth;
    u32 children;          // live children learned while tracing
    u32 active;            // tracked VMAs pointing at it (all in ``owner``)
    u32 fam;               // family: tgid that created its root (0: unknown)
    u32 serial;
    u32 pserial;           // the parent's serial when counted as its child (0: not counted)
    u32 dead;              // freed while a tracked VMA still pointed at it
    u32 pad;
};

struct mmstate {           // per address space
    u32 tgid;              // owner (0: not known)
    u32 nvmas;
    u32 avs;               // distinct anon_vmas its VMAs point at
    u32 chains;
    u32 events[4];
    u32 big[3];            // max value seen in the top bin (depth, chain, degree)
    u32 exit_seen;         // its teardown's first unlink was looked at (st_exit_begins)
    u32 depth[NB];         // distinct anon_vmas by depth
    u32 chain[NB];         // VMAs by chain length
    u32 degree[NB];        // distinct anon_vmas by live children
};

#define P_ALIVE 1
#define P_UNSEEN 2         // first seen mid-life (not forked while tracing)
#define P_CENSUS 4         // seeded by the census
#define P_EXITING 8        // its exit teardown began before its exit event:
                           // ``exit`` holds its figures from just before

struct pstate {            // per process (tgid)
    u64 mm;
    u64 exit_ns;
    u32 ppid;
    u32 flags;
    u32 ev_prev[4];        // events of the mms it had before (exec)
    char comm[16];
    struct mmstate exit;   // its mm's state when its exit was seen (user
                           // space makes the figures: no loops here)
};

struct famstate {          // per family (the tgid that created the roots)
    u32 avs;
    u32 orphans;
    u32 big;
    u32 pad;
    u32 depth[NB];
};

BPF_F_TABLE("hash", u64, struct vstate, st_vma, ST_VMA_MAX, ST_MAP_FLAGS);
BPF_F_TABLE("hash", u64, struct avstate, st_av, ST_AV_MAX, ST_MAP_FLAGS);
BPF_F_TABLE("hash", u64, struct mmstate, st_mm, ST_MM_MAX, ST_MAP_FLAGS);
BPF_F_TABLE("hash", u32, struct pstate, st_proc, ST_PROC_MAX, ST_MAP_FLAGS);
BPF_F_TABLE("hash", u32, struct famstate, st_fam, ST_FAM_MAX, ST_MAP_FLAGS);
BPF_PERCPU_ARRAY(st_global, s64, G_NR);
// Zeroed values to insert from: the structs are too big for the 512-byte
// BPF stack. Never written.
struct zeros {
    struct mmstate mm;
    struct famstate fam;
};
BPF_ARRAY(st_zero, struct zeros, 1);
// A process entry is built here, then inserted whole: user space never sees
// a half-made one.
// Per task where programs can be preempted (see scratch_get).
#ifdef SCRATCH_PER_TASK
BPF_TASK_STORAGE(st_new_proc_task, struct pstate);
#else
BPF_PERCPU_ARRAY(st_new_proc, struct pstate, 1);
#endif
BPF_PERCPU_ARRAY(st_depths, u64, MAX_DEPTH + 1);   // depth of each anon_vma as created
BPF_ARRAY(st_serial, u32, 1);

// ------------------------------------------------------ entry recycling
// Under a fork storm every fork inserts, and every exit deletes, an st_vma
// and an st_av entry per anon VMA. The slab hands a freed object's address
// out again almost at once (under bench/workloads/forkloop.c, 99.97% of VMA
// and of anon_vma allocations reuse an address freed less than about a
// thousand allocations before, nearly all within 256), so an entry is not
// deleted when its object goes: it is made a tombstone (st_vma: mm 0;
// st_av: serial 0) and overwritten when the address comes back, with no
// trip through the kernel's BPF allocator (bench/fork_overhead.py
// --bpf-stats: about 8 of the programs' 64 us per fork for st_vma, then 7
// of 60 for st_av). Each CPU keeps its last ST_RECYCLE tombstones of each
// map in a ring; a tombstone pushed out of the ring while still one is
// deleted then, so a map holds at most ST_RECYCLE of them per CPU
// (tracer.kernel.bpf_source.recycle_slots sizes the rings from the maps).
//
// A tombstone deleted as its address comes back on another CPU would take
// the new entry with it: the reviver looks the entry up again after writing
// it and the deleter reads it again after deleting it; whichever sees the
// other counts an anomaly, so the reports say partial.
struct recycle {
    u32 pos;
    u32 pad;
    u64 key[ST_RECYCLE];
};
#define RING_VMA 0
#define RING_AV 1
BPF_PERCPU_ARRAY(st_recycle, struct recycle, 1);      // st_vma's
BPF_PERCPU_ARRAY(st_av_recycle, struct recycle, 1);   // st_av's

static __always_inline void gadd(int idx, s64 v)
{
    s64 *c = st_global.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, v);
}

// ``key`` has just become a tombstone of ring ``ring``'s map: returns the
// key it pushes out of this CPU's ring (``key`` itself when there is no
// ring), for the caller to delete if still a tombstone. Key 0 is never in a
// map: no object is at address 0.
static __always_inline u64 ring_push(int ring, u64 key)
{
    int zero = 0;
    struct recycle *r = ring == RING_AV ? st_av_recycle.lookup(&zero)
                                        : st_recycle.lookup(&zero);
    if (!r)
        return key;
    u32 i = r->pos & (ST_RECYCLE - 1);
    u64 old = r->key[i];
    r->key[i] = key;
    r->pos = i + 1;
    return old;
}

// VMA ``vma``'s entry ``v`` becomes a tombstone.
static __always_inline void vma_bury(u64 vma, struct vstate *v)
{
    v->mm = 0;
    u64 old = ring_push(RING_VMA, vma);
    struct vstate *o = st_vma.lookup(&old);
    if (!o || o->mm)
        return;
    st_vma.delete(&old);
    // Revived on another CPU between the lookup and the delete?
    if (*(volatile u64 *)&o->mm)
        gadd(G_ANOMALIES, 1);
}

// anon_vma ``av``'s entry ``a`` becomes a tombstone. Its fields are cleared
// so that most readers take it for no entry with no test of their own: no
// live VMA (av_vma does nothing), no counted parent (pserial), no family,
// and a serial no child's pserial names. av_drop and one re-lookup in
// st_apply_vma test serial 0; av_learn revives it.
static __always_inline void av_bury(u64 av, struct avstate *a)
{
    a->serial = 0;
    a->depth = 0;
    a->pserial = 0;
    a->active = 0;
    a->children = 0;
    a->dead = 0;
    a->fam = 0;
    u64 old = ring_push(RING_AV, av);
    struct avstate *o = st_av.lookup(&old);
    if (!o || o->serial)
        return;
    st_av.delete(&old);
    if (*(volatile u32 *)&o->serial)
        gadd(G_ANOMALIES, 1);
}

static __always_inline u32 bin_of(u32 v)
{
    u32 b = v < NB - 1 ? v : NB - 1;
    // Hide the clamp from the optimiser so that the mask, which the
    // verifier can follow, stays in the code.
    asm volatile("" : "+r"(b));
    return b & (NB - 1);
}

// Histogram bin update; the top bin also remembers the largest value in it.
static __always_inline void hist_add(u32 *h, u32 *big, u32 v, int delta)
{
    u32 b = bin_of(v);
    __sync_fetch_and_add(&h[b], delta);
    if (b == NB - 1) {
        if (delta > 0 && v > *big)
            *big = v;
        else if (delta < 0 && h[b] == 0)
            *big = 0;
    }
}

static __always_inline struct mmstate *mm_get(u64 mm, int create)
{
    struct mmstate *m = st_mm.lookup(&mm);
    if (m || !create)
        return m;
    int idx = 0;
    struct zeros *z = st_zero.lookup(&idx);
    if (!z)
        return 0;
    if (st_mm.insert(&mm, &z->mm) && !st_mm.lookup(&mm)) {
        gadd(G_FULL_MM, 1);
        return 0;
    }
    return st_mm.lookup(&mm);
}

// Build a process entry in per-CPU memory, then put it in whole (user space
// never sees a half-made one). ``comm`` may be a kernel address (a child's
// task) or BPF memory. ``replace``: over an existing entry (pid reuse).
static __always_inline void proc_put(u32 tgid, u64 mm, u32 ppid, u32 flags, const void *comm,
                                     int replace)
{
#ifdef SCRATCH_PER_TASK
    struct pstate *n = st_new_proc_task.task_storage_get(bpf_get_current_task_btf(), 0,
                                                         BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!n)
        count(C_LOST_SCRATCH);
#else
    int idx = 0;
    struct pstate *n = st_new_proc.lookup(&idx);
#endif
    if (!n)
        return;
    // Only the fields below are ever written here; the rest (the exit
    // figures, most of the entry) stay as the map made them, zero.
    n->exit_ns = 0;
    __builtin_memset(n->ev_prev, 0, sizeof(n->ev_prev));
    n->mm = mm;
    n->ppid = ppid;
    n->flags = P_ALIVE | flags;
    bpf_probe_read_kernel(&n->comm, sizeof(n->comm), comm);
    int err = replace ? st_proc.update(&tgid, n) : st_proc.insert(&tgid, n);
    if (err && (replace || !st_proc.lookup(&tgid)))
        gadd(G_FULL_PROC, 1);
}

static __always_inline struct pstate *proc_get(u32 tgid, u64 mm, int create, u32 flags,
                                               const char *comm)
{
    struct pstate *p = st_proc.lookup(&tgid);
    if (p || !create)
        return p;
    proc_put(tgid, mm, 0, flags, comm, 0);
    return st_proc.lookup(&tgid);
}

static __always_inline void fam_add(u32 fam, u32 depth, int delta, int orphan)
{
    if (!fam)
        return;
    struct famstate *f = st_fam.lookup(&fam);
    if (!f) {
        if (delta < 0)
            return;
        int idx = 0;
        struct zeros *z = st_zero.lookup(&idx);
        if (!z)
            return;
        if (st_fam.insert(&fam, &z->fam) && !st_fam.lookup(&fam)) {
            gadd(G_FULL_FAM, 1);
            return;
        }
        f = st_fam.lookup(&fam);
        if (!f)
            return;
    }
    __sync_fetch_and_add(&f->avs, delta);
    if (orphan)
        __sync_fetch_and_add(&f->orphans, delta);
    hist_add(f->depth, &f->big, depth, delta);
    if (delta < 0 && f->avs == 0)
        st_fam.delete(&fam);
}

static __always_inline void fam_orphan(u32 fam, int delta)
{
    if (!fam)
        return;
    struct famstate *f = st_fam.lookup(&fam);
    if (f)
        __sync_fetch_and_add(&f->orphans, delta);
}

// An anon_vma gained (delta 1) or lost (-1) a live child: move it between
// degree bins in the histogram of the mm whose VMAs point at it.
static __always_inline void av_children(struct avstate *a, int delta)
{
    u32 old = a->children;
    if (delta < 0 && old == 0)
        return;
    __sync_fetch_and_add(&a->children, delta);
    if (!a->active || !a->owner)
        return;
    struct mmstate *m = st_mm.lookup(&a->owner);
    if (!m)
        return;
    hist_add(m->degree, &m->big[2], old, -1);
    hist_add(m->degree, &m->big[2], old + delta, 1);
}

// An anon_vma enters (delta 1) or leaves (-1) the figures of the mm its VMAs
// are in: distinct anon_vmas, by depth and by live children.
static __always_inline void mm_av(struct mmstate *m, struct avstate *a, int delta)
{
    if (!m)
        return;
    __sync_fetch_and_add(&m->avs, delta);
    hist_add(m->depth, &m->big[0], a->depth, delta);
    hist_add(m->degree, &m->big[2], a->children, delta);
}

#define AV_DEFER 1         // wait while tracked VMAs point at it
#define AV_NOT_ORPHANED 2  // its last VMA just went, not yet counted as an orphan

// Forget a live anon_vma (freed, or its pointer found reused). unlink_anon_vmas
// puts (and may free) a VMA's anon_vmas before freeing the chain entry that
// tells the tracepoint backend which VMA is going: a free while a tracked VMA
// still points at it waits for that VMA to go (AV_DEFER). ``a``: its entry,
// if the caller has it.
static __always_inline void av_drop(u64 av, struct avstate *a, int how)
{
    if (!a)
        a = st_av.lookup(&av);
    if (!a || !a->serial)   // none, or a tombstone (entry recycling)
        return;
    if ((how & AV_DEFER) && a->active) {
        a->dead = 1;
        return;
    }
    if (a->pserial) {
        struct avstate *pa = st_av.lookup(&a->parent);
        // The parent at that pointer is the one that counted us.
        if (pa && pa->serial == a->pserial)
            av_children(pa, -1);
    }
    int orphan = a->active == 0 && !(how & AV_NOT_ORPHANED);
    if (a->active) {
        gadd(G_ANOMALIES, 1);   // freed while tracked VMAs point at it
        if (a->owner)
            mm_av(st_mm.lookup(&a->owner), a, -1);
    }
    fam_add(a->fam, a->depth, -1, orphan);
    gadd(G_AVS, -1);
    if (orphan)
        gadd(G_ORPHANS, -1);
    av_bury(av, a);
}

// The anon_vma an event's facts describe, created when first seen.
static __always_inline struct avstate *av_learn(struct event *e, struct mmstate *m, int census)
{
    u64 av = e->anon_vma;
    struct avstate *a = st_av.lookup(&av);
    // A tombstone (entry recycling) has depth 0, which no anon_vma has: it
    // takes this path too, as no anomaly (serial 0), and is revived below.
    // (Testing for it apart made the verifier explore what follows once
    // more, past its limit in the kmem programs.)
    if (a && e->depth && a->depth != e->depth) {
        // Same pointer, another object: its free was not seen.
        gadd(G_ANOMALIES, ((u64)a->serial + 0xffffffffULL) >> 32);   // serial ? 1 : 0
        av_drop(av, a, 0);   // nothing for a tombstone; a tombstone after
        a = 0;
    }
    if (a)
        return a;
    struct avstate n = {};
    n.parent = e->parent;
    n.root = e->root;
    n.depth = e->depth;
    int zero = 0;
    u32 *ser = st_serial.lookup(&zero);
    if (ser) {
        // Not atomic (BCC's default BPF target cannot use an atomic's
        // result): two CPUs may hand out one serial, which only weakens the
        // check that a parent pointer still names the same anon_vma.
        *ser += 1;
        n.serial = *ser ? *ser : 1;   // 0 marks a tombstone
    }
    struct avstate *pa = 0;
    if (e->parent && e->parent != av)
        pa = st_av.lookup(&e->parent);
    if (e->depth <= 1 || e->root == av)
        n.fam = m->tgid;            // a root: its family is the process faulting it
    else {
        // A child of the root (a fork's first generation) looks one entry up.
        // (A tombstone's family is 0: no entry.)
        struct avstate *ra = e->root == e->parent ? pa : st_av.lookup(&e->root);
        u32 rfam = ra ? ra->fam : 0;
        n.fam = rfam ? rfam : pa ? pa->fam : 0;
    }
    if (pa)
        n.pserial = pa->serial;   // 0 for a tombstone: not counted
    int revived = 0;
    // Looked up again rather than kept from above: every path that gets
    // here has ``a`` 0, so the verifier explores what follows once.
    a = st_av.lookup(&av);
    if (a && !a->serial) {
        // A tombstone: overwritten (entry recycling, above), unless it was
        // deleted meanwhile. (A live entry here was learned on another CPU
        // meanwhile: the insert below fails and is counted.)
        *a = n;
        revived = st_av.lookup(&av) == a;
        if (!revived)
            gadd(G_ANOMALIES, 1);
    }
    if (!revived && st_av.insert(&av, &n)) {
        gadd(G_FULL_AV, 1);
        return 0;
    }
    if (pa && n.pserial)
        av_children(pa, 1);
    gadd(G_AVS, 1);
    gadd(G_ORPHANS, 1);
    fam_add(n.fam, n.depth, 1, 1);
    if (!census) {
        u32 d = e->depth <= MAX_DEPTH ? e->depth : MAX_DEPTH;
        u64 *c = st_depths.lookup(&d);
        if (c)
            __sync_fetch_and_add(c, 1);
    }
    return st_av.lookup(&av);
}

// A VMA of mm ``mm`` (entry ``m``) points at anon_vma ``av`` (entry ``a``)
// (delta 1) or no longer (-1). Every VMA pointing at one anon_vma is in one
// mm: the kernel gives a forked VMA a new anon_vma, or reuses one that no VMA
// points at (num_active_vmas, anon_vma_clone()). So an anon_vma is counted
// once, for its owner, while ``active``; a VMA of a second mm is an anomaly.
static __always_inline void av_vma(u64 mm, struct mmstate *m, u64 av, struct avstate *a,
                                   int delta)
{
    if (!a)
        return;
    u32 was = a->active;
    if (delta < 0 && was == 0)
        return;
    __sync_fetch_and_add(&a->active, delta);
    if (delta > 0) {
        if (was == 0) {
            a->owner = mm;
            mm_av(m, a, 1);
            gadd(G_ORPHANS, -1);
            fam_orphan(a->fam, -1);
        } else if (a->owner != mm) {
            gadd(G_ANOMALIES, 1);
        }
        return;
    }
    if (was != 1)
        return;
    // Its last VMA went.
    mm_av(a->owner == mm ? m : st_mm.lookup(&a->owner), a, -1);
    if (a->dead) {
        av_drop(av, a, AV_NOT_ORPHANED);
        return;
    }
    gadd(G_ORPHANS, 1);
    fam_orphan(a->fam, 1);
}

// Add (delta 1) or remove (-1) a VMA's contribution to its mm ``mm``
// (entry ``m``, 0 if it has none) and its anon_vma ``av`` (entry ``a``).
static __always_inline void vma_account(u64 mm, struct mmstate *m, u64 av, struct avstate *a,
                                        u32 chain, int delta)
{
    if (m) {
        __sync_fetch_and_add(&m->nvmas, delta);
        __sync_fetch_and_add(&m->chains, delta * (s32)chain);
        hist_add(m->chain, &m->big[1], chain, delta);
    }
    gadd(G_CHAINS, delta * (s64)chain);
    if (av)
        av_vma(mm, m, av, a, delta);
}

static __always_inline void st_count(struct mmstate *m, u32 probe)
{
    if (probe >= NO_PROBE)
        return;
    if (m)
        __sync_fetch_and_add(&m->events[probe], 1);
    gadd(G_EVENTS + probe, 1);
}

// An event in the process's own context (current's mm is ``mm``) tells
// whose mm it is and, from its main thread, the name it has now (prctl
// PR_SET_NAME since fork or exec).
static __always_inline void st_owner(u64 mm, struct mmstate *m, u64 cur_mm, u32 tgid, u32 tid,
                                     const char *comm, int census)
{
    if (cur_mm != mm || !tgid)
        return;
    if (m->tgid == tgid) {
        if (tid != tgid)
            return;
        struct pstate *p = st_proc.lookup(&tgid);
        if (p && p->mm == mm && (*(u64 *)p->comm != *(u64 *)comm ||
                                 *(u64 *)(p->comm + 8) != *(u64 *)(comm + 8)))
            __builtin_memcpy(p->comm, comm, sizeof(p->comm));
        return;
    }
    m->tgid = tgid;
    struct pstate *p = proc_get(tgid, mm, 1, census ? P_CENSUS | P_UNSEEN : P_UNSEEN, comm);
    if (p) {
        p->mm = mm;
        if (census)
            p->flags |= P_CENSUS;
    }
}

// A page was mapped in VMA ``vma`` (anon_vma ``av``): if the state holds the
// VMA as it is, count the event and return 1, with no more to read. Only a
// fork, clone or unlink changes a VMA's chain, and those are traced; a VMA
// that just got its anon_vma (anon_vma_prepare, which is not) is not held
// with it yet, and takes the full path.
static __always_inline int st_rmap_known(u64 vma, u64 av)
{
    struct vstate *v = st_vma.lookup(&vma);
    if (!v || !av || v->av != av)
        return 0;
    u64 mm = v->mm;   // 0: a tombstone
    if (!mm || rd64(vma + OFF_VMA_MM) != mm)
        return 0;
    struct mmstate *m = st_mm.lookup(&mm);
    if (!m)
        return 0;
    st_count(m, K_PAGE_SET_ANON_RMAP - K_ANON_VMA_FORK);
    u64 id = bpf_get_current_pid_tgid();
    char comm[16];
    bpf_get_current_comm(&comm, sizeof(comm));
    st_owner(mm, m, current_mm(), id >> 32, (u32)id, comm, 0);
    return 1;
}

// An operation left a VMA as ``e`` describes it (mm, anon_vma, chain and the
// anon_vma's facts): update the state. ``probe`` is the logical probe to
// count for the VMA's mm (NO_PROBE: none).
static __always_inline void st_apply_vma(struct event *e, u32 probe, int census)
{
    u64 vma = e->vma, mm = e->mm;
    if (!vma || !mm)
        return;
    struct mmstate *m = mm_get(mm, 1);
    if (!m)
        return;
    st_count(m, probe);
    st_owner(mm, m, e->cur_mm, e->tgid, e->tid, e->comm, census);
    u64 av = e->anon_vma;
    struct avstate *a = 0;
    if (av) {
        a = av_learn(e, m, census);
        if (!a)
            return;
    }
    u32 chain = e->chain_len;
    struct vstate *v = st_vma.lookup(&vma);
    if (v && v->mm) {
        u64 omm = v->mm, oav = v->av;
        u32 ochain = v->chain;
        if (omm == mm && oav == av) {
            if (ochain == chain)
                return;   // nothing changed
            // Only its chain changed (a clone that added entries).
            v->chain = chain;
            __sync_fetch_and_add(&m->chains, (s32)chain - (s32)ochain);
            hist_add(m->chain, &m->big[1], ochain, -1);
            hist_add(m->chain, &m->big[1], chain, 1);
            gadd(G_CHAINS, (s64)chain - (s64)ochain);
            return;
        }
        v->mm = mm;
        v->av = av;
        v->chain = chain;
        vma_account(omm, omm == mm ? m : st_mm.lookup(&omm), oav,
                    oav ? st_av.lookup(&oav) : 0, ochain, -1);
        if (av && oav == av) {
            a = st_av.lookup(&av);   // the removal may have dropped it
            if (a && !a->serial)
                a = 0;
        }
    } else {
        struct vstate n = {mm, av, chain, 0};
        int revived = 0;
        if (v) {
            // A tombstone: overwritten (entry recycling, above), unless it
            // was deleted meanwhile.
            *v = n;
            revived = st_vma.lookup(&vma) == v;
            if (!revived)
                gadd(G_ANOMALIES, 1);
        }
        if (!revived && st_vma.insert(&vma, &n)) {
            gadd(G_FULL_VMA, 1);
            return;
        }
    }
    vma_account(mm, m, av, a, chain, 1);
}

// anontrace_compat.h: exit_event_before_exit_mm. Where exit_mm() runs before
// the exit event, the first unlink of a process's own teardown takes its exit
// figures, so that a report made before its exit event does not show it alive
// with a half-emptied mm, and its figures at exit mean "before its teardown"
// on every kernel (README "Definitions"). Every unlink of a teardown runs with
// no mm; the first one run by the mm's process decides (``exit_seen``), so the
// others skip the process lookup.
static __always_inline void st_exit_begins(u64 mm, struct mmstate *m)
{
    if (!m || m->exit_seen)
        return;
    if (current_mm())
        return;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct pstate *p = st_proc.lookup(&tgid);
    if (!p || p->mm != mm)
        return;
    m->exit_seen = 1;
    if ((p->flags & (P_ALIVE | P_EXITING)) != P_ALIVE)
        return;
    bpf_probe_read_kernel(&p->exit, sizeof(p->exit), m);
    p->flags |= P_EXITING;
}

// unlink_anon_vmas: the VMA's chain is torn down. Applied whoever runs it,
// when the VMA is tracked (a VMA the state does not hold has nothing to
// undo); returns whether it was. ``count``: count the unlink for the VMA's
// mm here (fentry and kprobe count every traced unlink of a VMA with an
// anon_vma, as the model does, an untracked VMA's from its mm; the
// tracepoint backend cannot tell an untracked VMA's unlink apart).
static __always_inline int st_unlink_vma(u64 vma, int count)
{
    struct vstate *v = st_vma.lookup(&vma);
    if (!v || !v->mm)   // untracked, or a tombstone
        return 0;
    u64 omm = v->mm, oav = v->av;
    u32 ochain = v->chain;
    struct mmstate *m = st_mm.lookup(&omm);
    st_exit_begins(omm, m);
    vma_bury(vma, v);
    if (count)
        st_count(m, 2);
    vma_account(omm, m, oav, oav ? st_av.lookup(&oav) : 0, ochain, -1);
    return 1;
}

// An mm is torn down (exit_mmap, or an exit/exec after an empty teardown):
// its events stay with the process, its entry goes.
static __always_inline void st_mm_gone(u64 mm)
{
    struct mmstate *m = st_mm.lookup(&mm);
    if (!m)
        return;
    u32 tgid = m->tgid;
    struct pstate *p = tgid ? st_proc.lookup(&tgid) : 0;
    // An exited (or exiting) owner's figures, events included, were taken
    // at its exit.
    if (p && p->mm == mm && (p->flags & (P_ALIVE | P_EXITING)) == P_ALIVE) {
        for (int i = 0; i < 4; i++)
            p->ev_prev[i] += m->events[i];
        p->mm = 0;
    }
    st_mm.delete(&mm);
}
#endif /* WITH_STATE */

static __always_inline struct event *new_event(u32 kind)
{
    struct work *w = scratch_get();
    if (!w)
        return 0;
    struct event *e = &w->e;
    __builtin_memset(e, 0, sizeof(*e));
    u64 id = bpf_get_current_pid_tgid();
    e->ts = bpf_ktime_get_ns();
    e->kind = kind;
    e->tgid = id >> 32;
    e->tid = (u32)id;
    e->cur_mm = current_mm();
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void submit(void *ctx, struct event *e)
{
#ifndef WITH_EVENTS
    return;
#elif defined(USE_RINGBUF)
    if (events.ringbuf_output(e, sizeof(*e), 0))
        count(C_LOST_OUTPUT);
#else
    if (events.perf_submit(ctx, e, sizeof(*e)))
        count(C_LOST_OUTPUT);
#endif
}


static __always_inline void emit_vma_event(void *ctx, u32 kind, u64 vma, u64 aux, u64 aux2, s32 ret)
{
    // dup_mmap() calls anon_vma_fork() for every VMA, __split_vma() calls
    // anon_vma_clone() and teardown calls unlink_anon_vmas() for VMAs that
    // never had an anon_vma: those calls change nothing (the state holds no
    // such VMA), and the derived backend cannot see them either, so they are
    // not events. Most of a process's VMAs are such (file mappings, guard
    // pages): two words tell, before anything else is looked at.
    u64 av = rd64(vma + OFF_VMA_ANON_VMA);
    if (!ret && !av) {
        u64 first = rd64(vma + OFF_VMA_AVC);   // the chain's list head
        if (!first || first == vma + OFF_VMA_AVC)
            return;
    }
#ifdef WITH_STATE
    if (kind == K_UNLINK_ANON_VMAS) {
        // A teardown undoes state whoever runs it (an untraced task may free
        // what a traced one built); a traced one's is counted.
        int traced = wanted();
        if (!st_unlink_vma(vma, traced) && traced) {
            // A VMA the state does not hold (see st_exit_begins).
            u64 mm = rd64(vma + OFF_VMA_MM);
            struct mmstate *m = st_mm.lookup(&mm);
            st_exit_begins(mm, m);
            st_count(m, K_UNLINK_ANON_VMAS - K_ANON_VMA_FORK);
        }
#ifndef WITH_EVENTS
        return;
#endif
    }
#endif
    if (!wanted())
        return;
#if defined(WITH_STATE) && !defined(WITH_EVENTS)
    // Most page mappings find their VMA as the state holds it.
    if (kind == K_PAGE_SET_ANON_RMAP && st_rmap_known(vma, av))
        return;
    if (kind == K_ANON_VMA_CLONE && !ret) {
        // A clone into another mm than current's is anon_vma_fork()'s
        // (dup_mmap() runs in the parent): the fork's own event, right
        // after it, applies the VMA's final state, so this one only counts,
        // as the tracepoint backend's superseded clone entries do.
        u64 mm = rd64(vma + OFF_VMA_MM);
        if (mm != current_mm()) {
            st_count(mm_get(mm, 1), K_ANON_VMA_CLONE - K_ANON_VMA_FORK);
            return;
        }
    }
#endif
    struct event *e = new_event(kind);
    if (!e)
        return;
    fill_vma(e, vma);
    e->aux = aux;
    e->aux2 = aux2;
    e->ret = ret;
#ifdef WITH_STATE
    if (kind != K_UNLINK_ANON_VMAS)
        st_apply_vma(e, kind - K_ANON_VMA_FORK, 0);
#endif
    submit(ctx, e);
}

// ---------------------------------------------------------------- fentry
#define KFUNC_PROBE_X(fn, ...) KFUNC_PROBE(fn, __VA_ARGS__)
#define KRETFUNC_PROBE_X(fn, ...) KRETFUNC_PROBE(fn, __VA_ARGS__)

#if FORK_METHOD == 1
KRETFUNC_PROBE(anon_vma_fork, u64 vma, u64 pvma, int ret)
{
    emit_vma_event(ctx, K_ANON_VMA_FORK, vma, pvma, 0, ret);
    return 0;
}
#endif

#if CLONE_METHOD == 1
// anontrace_compat.h: anon_vma_rework (the parameter list).
KRETFUNC_PROBE_X(anon_vma_clone, ANON_VMA_CLONE_PARAMS, int ret)
{
    emit_vma_event(ctx, K_ANON_VMA_CLONE, dst, src, 0, ret);
    return 0;
}
#endif

#if UNLINK_METHOD == 1
KFUNC_PROBE(unlink_anon_vmas, u64 vma)
{
    emit_vma_event(ctx, K_UNLINK_ANON_VMAS, vma, 0, 0, 0);
    return 0;
}
#endif

#if RMAP_METHOD == 1
KFUNC_PROBE_X(RMAP_FUNC, RMAP_FENTRY_ARGS)
{
    emit_vma_event(ctx, K_PAGE_SET_ANON_RMAP, RMAP_VMA, RMAP_PAGE, RMAP_ADDR, 0);
    return 0;
}
#endif

// ---------------------------------------------------------------- kprobe
#if FORK_METHOD == 2 || CLONE_METHOD == 2 || UNLINK_METHOD == 2 || RMAP_METHOD == 2
struct entry_args {
    u64 a0;
    u64 a1;
};
BPF_HASH(fork_args, u64, struct entry_args, 10240);
BPF_HASH(clone_args, u64, struct entry_args, 10240);

static __always_inline u64 kp_arg(struct pt_regs *ctx, int n)
{
    switch (n) {
    case 0: return PT_REGS_PARM1(ctx);
    case 1: return PT_REGS_PARM2(ctx);
    case 2: return PT_REGS_PARM3(ctx);
    case 3: return PT_REGS_PARM4(ctx);
    case 4: return PT_REGS_PARM5(ctx);
    }
    return 0;
}

#endif

#if FORK_METHOD == 2
static __always_inline int save_args(struct pt_regs *ctx, struct entry_args *a)
{
    if (!wanted())
        return 0;
    a->a0 = PT_REGS_PARM1(ctx);
    a->a1 = PT_REGS_PARM2(ctx);
    return 1;
}

int kp_fork_entry(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct entry_args a = {};
    if (save_args(ctx, &a) && fork_args.update(&id, &a))
        count(C_LOST_ARGS);
    return 0;
}

int kr_fork_exit(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct entry_args *a = fork_args.lookup(&id);
    if (!a) {
        if (wanted())
            count(C_LOST_NO_ENTRY);
        return 0;
    }
    u64 vma = a->a0, pvma = a->a1;
    fork_args.delete(&id);
    emit_vma_event(ctx, K_ANON_VMA_FORK, vma, pvma, 0, (s32)PT_REGS_RC(ctx));
    return 0;
}
#endif

#if CLONE_METHOD == 2
int kp_clone_entry(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct entry_args a = {};
    if (save_args(ctx, &a) && clone_args.update(&id, &a))
        count(C_LOST_ARGS);
    return 0;
}

int kr_clone_exit(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct entry_args *a = clone_args.lookup(&id);
    if (!a) {
        if (wanted())
            count(C_LOST_NO_ENTRY);
        return 0;
    }
    u64 dst = a->a0, src = a->a1;
    clone_args.delete(&id);
    emit_vma_event(ctx, K_ANON_VMA_CLONE, dst, src, 0, (s32)PT_REGS_RC(ctx));
    return 0;
}
#endif

#if UNLINK_METHOD == 2
int kp_unlink_entry(struct pt_regs *ctx)
{
    emit_vma_event(ctx, K_UNLINK_ANON_VMAS, PT_REGS_PARM1(ctx), 0, 0, 0);
    return 0;
}
#endif

#if RMAP_METHOD == 2
int kp_rmap_entry(struct pt_regs *ctx)
{
    u64 addr = RMAP_ADDR_IDX >= 0 ? kp_arg(ctx, RMAP_ADDR_IDX) : 0;
    emit_vma_event(ctx, K_PAGE_SET_ANON_RMAP, kp_arg(ctx, RMAP_VMA_IDX),
                   kp_arg(ctx, RMAP_PAGE_IDX), addr, 0);
    return 0;
}
#endif

// ------------------------------------------------------ kmem tracepoints
static __always_inline u32 site_of(u64 ip)
{
    if (ip >= SITE_FORK_START && ip < SITE_FORK_END) return S_FORK;
    if (ip >= SITE_CLONE_START && ip < SITE_CLONE_END) return S_CLONE;
    if (ip >= SITE_PREPARE_START && ip < SITE_PREPARE_END) return S_PREPARE;
    if (ip >= SITE_UNLINK_START && ip < SITE_UNLINK_END) return S_UNLINK;
    if (ip >= SITE_PUT_START && ip < SITE_PUT_END) return S_PUT;
#ifdef SITE_OTHER_START
    if (ip >= SITE_OTHER_START && ip < SITE_OTHER_END) return S_OTHER;
#endif
    return 0;
}

// A chain entry's VMA and the facts of both, read once the operation that
// allocated it has finished (tracepoint backend), or at its free.
static __always_inline struct event *avc_event(u32 kind, u32 site, u64 avc, u32 flags)
{
    struct event *e = new_event(kind);
    if (!e)
        return 0;
    u64 anon_vma;
    u64 vma = read_avc(e, avc, &anon_vma);
    fill_vma(e, vma);
    e->aux = avc;
    e->aux2 = anon_vma;
    e->site = site;
    e->flags |= flags;
    return e;
}

// emit_avc, emit_av and the K_SYNC event exist only to be submitted: built
// for nothing when the state maps are all there is (about 80 per fork).
static __always_inline void emit_avc(void *ctx, u32 kind, u32 site, u64 avc, u32 flags)
{
#ifndef WITH_EVENTS
    return;
#endif
    struct event *e = avc_event(kind, site, avc, flags);
    if (e)
        submit(ctx, e);
}

static __always_inline void emit_av(void *ctx, u32 kind, u32 site, u64 av, u32 flags)
{
#ifndef WITH_EVENTS
    return;
#endif
    struct event *e = new_event(kind);
    if (!e)
        return;
    fill_anon_vma(e, av);
    e->site = site;
    e->flags |= flags;
    submit(ctx, e);
}

// ------------------------------------------------ tracepoint program copies
// Where the kernel can preempt a task inside a tracepoint program
// (docs/state.md, "Recursion misses"), it skips that program for every other
// task on the CPU until the preempted one finishes it: a skipped kmem run can
// be an anon_vma's or a chain entry's allocation or free, a skipped
// process-event run a fork, exec, exit or teardown. So each such program has
// a second copy, attached after it (tracer.kernel.bpf_session), that runs the
// body of every call the first did not run (TP_AGAIN). The first marks each
// call it runs in the task's storage (the call's object: the slab object, the
// child, the exec's binprm, the exiting or freed task, the mm) before its
// body; the second takes the mark back, or, finding none, runs the body
// itself and counts a takeover. kmem calls elsewhere than at an rmap site
// (other caches, interrupts) are ignored by both; a call the first copy could
// not mark (no storage) is left to the second. One task's calls of one program never interleave (interrupts make
// no rmap-site slab calls and no process events), so each call runs once. A
// call both copies skip (two tasks preempted on one CPU, one inside each
// copy) is not seen: docs/state.md says so.
#define TPI_ALLOC 0
#define TPI_FREE 1
#define TPI_FORK 2
#define TPI_EXEC 3
#define TPI_EXIT 4
#define TPI_EXIT_MMAP 5
#define TPI_TASK_FREE 6
#define TPI_NR 8
#ifdef TP_AGAIN
struct tp_marks {
    u64 key[TPI_NR];       // per program: the object of the call marked
};
BPF_TASK_STORAGE(tp_marks, struct tp_marks);
BPF_PERCPU_ARRAY(tp_taken, u64, TPI_NR);

// The first copy, before a call's body: run it (marked)?
static __always_inline int tp_claim(int idx, u64 key)
{
    struct tp_marks *m = tp_marks.task_storage_get(bpf_get_current_task_btf(), 0,
                                                   BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!m)
        return 0;
    m->key[idx & (TPI_NR - 1)] = key;
    return 1;
}

// The second copy: the first did not run this call's body.
static __always_inline int tp_unclaimed(int idx, u64 key)
{
    struct tp_marks *m = tp_marks.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (m && m->key[idx & (TPI_NR - 1)] == key) {
        m->key[idx & (TPI_NR - 1)] = 0;
        return 0;
    }
    u64 *t = tp_taken.lookup(&idx);
    if (t)
        __sync_fetch_and_add(t, 1);
    return 1;
}

// ``relevant(ctx)``: the call concerns us; ``key``: its object, an argument
// of the tracepoint; ``body(ctx)`` handles it.
#define TP_PROGRAMS(tp, idx, relevant, key, body)                           \
RAW_TRACEPOINT_PROBE(tp)                                                   \
{                                                                          \
    if (relevant(ctx) && tp_claim(idx, ctx->args[key]))                    \
        body(ctx);                                                         \
    return 0;                                                              \
}                                                                          \
int tp_again__##tp(struct bpf_raw_tracepoint_args *ctx)                   \
{                                                                          \
    if (relevant(ctx) && tp_unclaimed(idx, ctx->args[key]))                \
        body(ctx);                                                         \
    return 0;                                                              \
}
#else
#define TP_PROGRAMS(tp, idx, relevant, key, body)                           \
RAW_TRACEPOINT_PROBE(tp)                                                   \
{                                                                          \
    if (relevant(ctx))                                                     \
        body(ctx);                                                         \
    return 0;                                                              \
}
#endif

static __always_inline int tp_always(struct bpf_raw_tracepoint_args *ctx)
{
    return 1;
}

#ifdef DERIVE_FROM_KMEM
// Tracepoint backend. At kmem_cache_alloc the object is not initialised yet,
// so each allocation waits in `pending` until the operation that made it has
// finished: the task's next rmap allocation of the same kind at the same site
// (a new operation), a clone-site allocation (anon_vma_clone links each chain
// entry right after allocating it), a free, the end of fork
// (sched_process_fork), a syscall exit, or task exit. Facts are read then.
//
// The logical probes are rebuilt from those allocations (tracer/pipeline/derive.py
// does the same from the event stream, for recordings; both must agree):
//   clone-site entries for one VMA, in a row  -> one anon_vma_clone
//   a fork-site entry                         -> one anon_vma_fork
//   a clone run into another mm (a fork) with no fork-site allocation right
//   after it                                  -> one anon_vma_fork that reused
//                                                an ancestor anon_vma
//   unlink-site entry frees of one VMA        -> one unlink_anon_vmas
// Where anon_vma_fork() allocates before cloning (FORK_ALLOCATES_FIRST,
// anontrace_compat.h: anon_vma_rework), its objects are held unread until the
// operation ends, and their free means "reused".

struct pending {
    u64 clone_avc;
    u64 fork_av;
    u64 fork_avc;
    u64 prep_av;
    u64 prep_avc;
    u64 sync;   // an unlink is in progress: tell user space when it ends
    u64 live;   // the task has an operation open (the fields above may all be 0)
    u64 grp_vma;  // the VMA of the clone run in progress (state)
    u64 grp_mm;   // its mm, when the run clones into another mm (a fork)
};

#ifdef HAVE_TASK_STORAGE
// Task-local storage (anontrace_compat.h: task_storage): found through the task, no hash, no bucket lock, freed with the task. A
// fork's teardown touches the pending state about 150 times, and hash map
// updates and deletes were most of what tracing cost it.
BPF_TASK_STORAGE(pending, struct pending);

static __always_inline struct pending *pending_get(int create)
{
    struct pending *p = pending.task_storage_get(bpf_get_current_task_btf(), 0,
                                                 create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
    if (!p && create)
        count(C_LOST_PENDING);
    return p;
}

static __always_inline void pending_drop(struct pending *p)
{
    __builtin_memset(p, 0, sizeof(*p));
}
#else
BPF_HASH(pending_map, u32, struct pending, 16384);

static __always_inline struct pending *pending_get(int create)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending *p = pending_map.lookup(&tid);
    if (p || !create)
        return p;
    struct pending zero = {};
    if (pending_map.update(&tid, &zero)) {
        count(C_LOST_PENDING);
        return 0;
    }
    return pending_map.lookup(&tid);
}

static __always_inline void pending_drop(struct pending *p)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    pending_map.delete(&tid);
}
#endif

// A clone run ends. ``fork_follows``: the next allocation is fork-site, so
// the fork made a new anon_vma rather than reusing one.
static __always_inline void close_run(struct pending *p, int fork_follows)
{
#ifdef FORK_ALLOCATES_FIRST
    // Its fork-site entry came before the run, and is still held unless the
    // clone reused an ancestor (then it was freed and dropped).
    fork_follows = p->fork_avc != 0;
#endif
#ifdef WITH_STATE
    if (p->grp_mm && !fork_follows)
        st_count(st_mm.lookup(&p->grp_mm), 0);
#endif
    p->grp_vma = 0;
    p->grp_mm = 0;
}

// A clone-site entry of another VMA: the previous run ends and one on ``vma``
// (of mm ``mm``) begins; a run into an mm other than the current task's is
// part of a fork.
static __always_inline void begin_run(struct pending *p, u64 vma, u64 mm, u64 cur_mm)
{
    close_run(p, 0);
    p->grp_vma = vma;
    if (mm && cur_mm && mm != cur_mm)
        p->grp_mm = mm;
}

// A deferred chain-entry allocation: its facts are final now.
// ``superseded``: a fork-site entry for the same VMA follows (or, after the
// anon_vma rework, is held), whose apply will take the VMA's final state; this
// clone-site entry then only counts its run. Applying it too would move the
// VMA through a chain length it keeps for microseconds, at several map
// updates: under a fork storm that was half of what the state cost.
static __always_inline void derived_avc(void *ctx, struct pending *p, u32 site, u64 avc,
                                        int superseded)
{
#if defined(WITH_STATE) && !defined(WITH_EVENTS)
    if (superseded && site == S_CLONE) {
        // No event to build: the entry's VMA and that VMA's mm are enough.
        struct work *w = scratch_get();
        if (!w)
            return;
        u64 anon_vma;
        u64 vma = read_avc(&w->e, avc, &anon_vma);
        if (vma && vma != p->grp_vma) {
            u64 mm = rd64(vma + OFF_VMA_MM);
            begin_run(p, vma, mm, current_mm());
            st_count(mm_get(mm, 1), K_ANON_VMA_CLONE - K_ANON_VMA_FORK);
        }
        return;
    }
#endif
    struct event *e = avc_event(K_AVC_ALLOC, site, avc, F_DEFERRED);
    if (!e)
        return;
#ifdef WITH_STATE
    u32 probe = NO_PROBE;
    if (site == S_CLONE) {
        if (e->vma != p->grp_vma) {
            begin_run(p, e->vma, e->mm, e->cur_mm);
            probe = K_ANON_VMA_CLONE - K_ANON_VMA_FORK;
        }
    } else if (site == S_FORK) {
        probe = 0;
    }
    if (superseded && site == S_CLONE)
        st_count(mm_get(e->mm, 1), probe);
    else
        st_apply_vma(e, probe, 0);
#endif
    submit(ctx, e);
}

// A pending clone-site entry is flushed. ``fork_next``: the allocation
// that flushes it is fork-site (before the anon_vma rework anon_vma_fork
// allocates its own entry right after cloning).
static __always_inline void flush_clone(void *ctx, struct pending *p, int fork_next)
{
#ifdef FORK_ALLOCATES_FIRST
    int superseded = p->fork_avc != 0;
#else
    int superseded = fork_next;
#endif
    if (p->clone_avc)
        derived_avc(ctx, p, S_CLONE, p->clone_avc, superseded);
    p->clone_avc = 0;
}

// Deferred anon_vma allocations are only reported with OBJECT_EVENTS: the
// chain entry allocated with each carries the same facts plus its VMA.
#ifdef OBJECT_EVENTS
#define emit_av_alloc(ctx, site, av) emit_av(ctx, K_AV_ALLOC, site, av, F_DEFERRED)
#else
#define emit_av_alloc(ctx, site, av) do {} while (0)
#endif

static __always_inline void flush_fork(void *ctx, struct pending *p)
{
    if (p->fork_av)
        emit_av_alloc(ctx, S_FORK, p->fork_av);
    if (p->fork_avc)
        derived_avc(ctx, p, S_FORK, p->fork_avc, 0);
    p->fork_av = 0;
    p->fork_avc = 0;
}

static __always_inline void flush_prep(void *ctx, struct pending *p)
{
    if (p->prep_av)
        emit_av_alloc(ctx, S_PREPARE, p->prep_av);
    if (p->prep_avc)
        derived_avc(ctx, p, S_PREPARE, p->prep_avc, 0);
    p->prep_av = 0;
    p->prep_avc = 0;
}

// A fork-site anon_vma is complete once anon_vma_fork set its parent.
static __always_inline int fork_done(struct pending *p)
{
    return p->fork_av && rd64(p->fork_av + OFF_AV_PARENT) != p->fork_av;
}

// Flush what the current task has pending; returns whether it had an
// operation open.
static __always_inline int flush_all(void *ctx)
{
    struct pending *p = pending_get(0);
    if (!p || !p->live)
        return 0;
    flush_clone(ctx, p, 0);
    close_run(p, 0);
    flush_fork(ctx, p);
    flush_prep(ctx, p);
    pending_drop(p);
    return 1;
}

static __always_inline void derive_alloc(void *ctx, u32 site, int is_av, u64 ptr)
{
    struct pending *p = pending_get(1);
    if (!p)
        return;
    p->live = 1;
    flush_clone(ctx, p, site == S_FORK);
    if (site == S_CLONE) {
#ifndef FORK_ALLOCATES_FIRST
        if (fork_done(p))
            flush_fork(ctx, p);
#endif
        flush_prep(ctx, p);
        p->clone_avc = ptr;
#ifdef FORK_ALLOCATES_FIRST
    } else if (site == S_FORK) {
        // An anon_vma allocation opens the next fork operation: the previous
        // one (its clone run, then its own entry) is complete.
        if (is_av || p->fork_avc) {
            close_run(p, 0);
            flush_fork(ctx, p);
        }
        flush_prep(ctx, p);
        if (is_av)
            p->fork_av = ptr;
        else
            p->fork_avc = ptr;
#else
    } else if (site == S_FORK) {
        close_run(p, 1);
        if ((is_av && p->fork_av) || (!is_av && p->fork_avc))
            flush_fork(ctx, p);
        flush_prep(ctx, p);
        if (is_av)
            p->fork_av = ptr;
        else
            p->fork_avc = ptr;
#endif
    } else if (site == S_PREPARE) {
        close_run(p, 0);
        if ((is_av && p->prep_av) || (!is_av && p->prep_avc))
            flush_prep(ctx, p);
        if (fork_done(p))
            flush_fork(ctx, p);
        if (is_av)
            p->prep_av = ptr;
        else
            p->prep_avc = ptr;
    } else {
        close_run(p, 0);
        // An allocation we cannot attribute to an operation: report as is.
        if (is_av)
            emit_av(ctx, K_AV_ALLOC, site, ptr, 0);
        else
            emit_avc(ctx, K_AVC_ALLOC, site, ptr, 0);
    }
}

// The task's operation is over (syscall exit, or its mm torn down): flush
// what is pending and tell user space, so the grouping of its last
// allocations and frees need not wait for the task's next event.
static __always_inline void end_operation(void *ctx)
{
    if (!flush_all(ctx))
        return;
#ifndef WITH_EVENTS
    return;
#endif
    struct event *e = new_event(K_SYNC);
    if (e)
        submit(ctx, e);
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    end_operation(ctx);
    return 0;
}
#endif /* DERIVE_FROM_KMEM */

#if defined(DERIVE_FROM_KMEM) || defined(OBJECT_EVENTS)
static __always_inline void handle_alloc(void *ctx, u32 site, u64 bytes, u64 ptr)
{
    int is_av;
    if (bytes == AV_SLAB_SIZE)
        is_av = 1;
    else if (bytes == AVC_SLAB_SIZE)
        is_av = 0;
    else
        return;
    if (!ptr)
        return;
#ifdef DERIVE_FROM_KMEM
    derive_alloc(ctx, site, is_av, ptr);
#else
    struct event *e = new_event(is_av ? K_AV_ALLOC : K_AVC_ALLOC);
    if (!e)
        return;
    // Not initialised yet: only the pointer and the site are facts.
    if (is_av)
        e->anon_vma = ptr;
    else
        e->aux = ptr;
    e->site = site;
    submit(ctx, e);
#endif
}
#endif

// A free at an rmap call site. The object is still intact: read it.
// ``traced``: the freeing task is one we trace (the state is undone whoever
// frees; events and the derivation concern traced tasks only).
static __always_inline void handle_free(void *ctx, u32 site, int is_av, u64 ptr, int traced)
{
#ifdef DERIVE_FROM_KMEM
#ifdef FORK_ALLOCATES_FIRST
    if (traced) {
        // The clone reused an ancestor: the anon_vma and entry allocated
        // ahead were never used. 7.2 frees them one at a time and from two
        // call sites (put_anon_vma first, then the entry in anon_vma_fork),
        // so match the held pointers, not the site. Drop each unread, with
        // no event (its allocation was never reported); once both are gone
        // the run closes as a reusing fork.
        struct pending *p = pending_get(0);
        if (p && ptr && ((is_av && p->fork_av == ptr) || (!is_av && p->fork_avc == ptr))) {
            if (is_av)
                p->fork_av = 0;
            else
                p->fork_avc = 0;
            if (!p->fork_av && !p->fork_avc)
                flush_all(ctx);
            return;
        }
    }
#endif
    if (traced)
        flush_all(ctx);
#endif
    if (is_av) {
#ifdef WITH_STATE
        av_drop(ptr, 0, AV_DEFER);
#endif
        if (traced)
            emit_av(ctx, K_AV_FREE, site, ptr, 0);
        return;
    }
#if defined(WITH_STATE) && defined(DERIVE_FROM_KMEM)
    if (site == S_UNLINK) {
        // unlink_anon_vmas frees the VMA's entries one by one: the first
        // free of a tracked VMA ends it (and counts the unlink). (fentry and
        // kprobe see unlink_anon_vmas itself.)
        // Only the entry's VMA is needed: the scratch's span, no event.
        u64 anon_vma;
        struct work *w = scratch_get();
        if (w)
            st_unlink_vma(read_avc(&w->e, ptr, &anon_vma), 1);
    }
#endif
    if (!traced)
        return;
    // Chain-entry frees only feed the derived backend's unlink grouping (or
    // --raw output).
#if defined(DERIVE_FROM_KMEM) || defined(OBJECT_EVENTS)
    emit_avc(ctx, K_AVC_FREE, site, ptr, 0);
#endif
#if defined(DERIVE_FROM_KMEM) && defined(WITH_EVENTS)
    // User space groups the unlink's frees and needs to hear when it ends
    // (K_SYNC). The state needs no pending entry for it: creating one per
    // exiting task cost a task-storage allocation under a fork storm.
    if (site == S_UNLINK) {
        struct pending *p = pending_get(1);
        if (p) {
            p->sync = 1;
            p->live = 1;
        }
    }
#endif
}

#ifdef KMEM_RAW
// Raw tracepoints skip building the trace record (anontrace_compat.h:
// kmem_cache_arg). Arguments: call_site, ptr, then the cache at the position
// BTF gave.
#if defined(DERIVE_FROM_KMEM) || defined(OBJECT_EVENTS)
static __always_inline int kmem_alloc_relevant(struct bpf_raw_tracepoint_args *ctx)
{
    return site_of(ctx->args[0]) && wanted();
}

static __always_inline void kmem_alloc_body(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cache = KMEM_ALLOC_CACHE(ctx);
    handle_alloc(ctx, site_of(ctx->args[0]), rd(cache + OFF_KMEM_CACHE_SIZE, 4), ctx->args[1]);
}
TP_PROGRAMS(kmem_cache_alloc, TPI_ALLOC, kmem_alloc_relevant, 1, kmem_alloc_body)
#endif

static __always_inline int kmem_free_relevant(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef WITH_STATE
    return site_of(ctx->args[0]) != 0;   // the state is undone whoever frees
#else
    return site_of(ctx->args[0]) && wanted();
#endif
}

static __always_inline void kmem_free_body(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cache = KMEM_FREE_CACHE(ctx);
    // The anon_vma cache is never merged (it has a constructor), so its
    // object size identifies it among the objects rmap functions free.
#ifdef WITH_STATE
    int traced = wanted();
#else
    int traced = 1;   // kmem_free_relevant asked
#endif
    handle_free(ctx, site_of(ctx->args[0]), rd(cache + OFF_KMEM_CACHE_SIZE, 4) == AV_SLAB_SIZE,
                ctx->args[1], traced);
}
TP_PROGRAMS(kmem_cache_free, TPI_FREE, kmem_free_relevant, 1, kmem_free_body)
#else
#if defined(DERIVE_FROM_KMEM) || defined(OBJECT_EVENTS)
TRACEPOINT_PROBE(kmem, kmem_cache_alloc)
{
    u32 site = site_of(args->call_site);
    if (!site || !wanted())
        return 0;
    handle_alloc(args, site, args->bytes_alloc, (u64)args->ptr);
    return 0;
}
#endif

TRACEPOINT_PROBE(kmem, kmem_cache_free)
{
    u32 site = site_of(args->call_site);
    if (!site)
        return 0;
    int traced = wanted();
#ifndef WITH_STATE
    if (!traced)
        return 0;
#endif
    int is_av;
#ifdef KMEM_FREE_HAS_NAME   // anontrace_compat.h: kmem_free_name
    // The anon_vma cache is never merged (it has a constructor); the
    // anon_vma_chain cache is, so its name cannot be trusted alone.
    char name[10] = {};
    TP_DATA_LOC_READ_STR(&name, name, sizeof(name));
    is_av = name[0] == 'a' && name[1] == 'n' && name[2] == 'o' && name[3] == 'n' &&
            name[4] == '_' && name[5] == 'v' && name[6] == 'm' && name[7] == 'a' &&
            name[8] == 0;
#else
    is_av = site == S_PUT;
#endif
    handle_free(args, site, is_av, (u64)args->ptr, traced);
    return 0;
}
#endif


// ------------------------------------------------------ process lifecycle
static __always_inline int sched_process_fork_body(struct bpf_raw_tracepoint_args *ctx)
{
    u64 parent = ctx->args[0];
    u64 child = ctx->args[1];
    u32 ptgid = rd(parent + OFF_TASK_TGID, 4);
    u32 ctgid = rd(child + OFF_TASK_TGID, 4);
#ifdef DERIVE_FROM_KMEM
    flush_all(ctx);
#endif
#ifdef FILTER_ENABLED
    if (!wanted_tgid(ptgid))
        return 0;
#ifdef FOLLOW_CHILDREN
    u8 one = 1;
    if (filter.update(&ctgid, &one))
        count(C_LOST_FILTER);
#endif
#endif
    struct event *e = new_event(K_PROC_FORK);
    if (!e)
        return 0;
    e->mm = rd64(child + OFF_TASK_MM);
    e->pid2 = ctgid;
    e->tid2 = rd(child + OFF_TASK_PID, 4);
    if (ctgid == ptgid)
        e->flags |= F_THREAD;
#ifdef WITH_STATE
    if (ctgid != ptgid) {
        // The parent, if first seen here (its own name: current's).
        proc_get(ptgid, e->cur_mm, 1, P_UNSEEN, e->comm);
        // A dead entry under this pid not yet collected by user space is
        // replaced (pid reuse): counted, so the report can say so.
        struct pstate *old = st_proc.lookup(&ctgid);
        if (old && !(old->flags & P_ALIVE))
            gadd(G_ANOMALIES, 1);
        proc_put(ctgid, e->mm, ptgid, 0, (void *)(child + OFF_TASK_COMM), 1);
        if (e->mm) {
            struct mmstate *m = mm_get(e->mm, 1);
            if (m)
                m->tgid = ctgid;
        }
    }
#endif
    bpf_probe_read_kernel(&e->comm, sizeof(e->comm), (void *)(child + OFF_TASK_COMM));
    submit(ctx, e);
    return 0;
}
TP_PROGRAMS(sched_process_fork, TPI_FORK, tp_always, 1, sched_process_fork_body)

static __always_inline int sched_process_exec_body(struct bpf_raw_tracepoint_args *ctx)
{
    if (!wanted())
        return 0;
    struct event *e = new_event(K_PROC_EXEC);
    if (!e)
        return 0;
    e->mm = e->cur_mm;
    e->pid2 = (u32)ctx->args[1];
#ifdef WITH_STATE
    struct pstate *p = proc_get(e->tgid, e->mm, 1, P_UNSEEN, e->comm);
    if (p) {
        if (p->mm && p->mm != e->mm) {
            // The old mm outlives the exec (another reference): its
            // events so far are the process's.
            struct mmstate *om = st_mm.lookup(&p->mm);
            if (om)
                for (int i = 0; i < 4; i++)
                    p->ev_prev[i] += om->events[i];
        }
        p->mm = e->mm;
        __builtin_memcpy(p->comm, e->comm, sizeof(p->comm));
    }
    struct mmstate *m = mm_get(e->mm, 1);
    if (m)
        m->tgid = e->tgid;
#endif
    submit(ctx, e);
    return 0;
}
TP_PROGRAMS(sched_process_exec, TPI_EXEC, tp_always, 2, sched_process_exec_body)

static __always_inline int sched_process_exit_body(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
#ifdef DERIVE_FROM_KMEM
    flush_all(ctx);
#endif
    if (!wanted_tgid(tgid))
        return 0;
    struct event *e = new_event(K_PROC_EXIT);
    if (!e)
        return 0;
    if ((u32)id != tgid)
        e->flags |= F_THREAD;
#ifdef WITH_STATE
    struct pstate *p = (u32)id == tgid ? st_proc.lookup(&tgid) : 0;
    int idx = 0;
    struct zeros *z = st_zero.lookup(&idx);
    if (p && z && (p->flags & P_ALIVE)) {
        // Figures as of the exit event where it precedes the mm teardown
        // (anontrace_compat.h: exit_event_before_exit_mm; on the older order
        // st_exit_begins took them).
        u64 mm = p->mm;
        struct mmstate *m = mm ? st_mm.lookup(&mm) : 0;
        if (p->flags & P_EXITING)
            ;   // taken when its teardown began (st_exit_begins)
        else if (m)
            bpf_probe_read_kernel(&p->exit, sizeof(p->exit), m);
        else
            bpf_probe_read_kernel(&p->exit, sizeof(p->exit), &z->mm);
        p->exit_ns = e->ts;
        __builtin_memcpy(p->comm, e->comm, sizeof(p->comm));
        p->flags &= ~P_ALIVE;
#ifndef HAVE_EXIT_MMAP_TP
        // No exit_mmap tracepoint (anontrace_compat.h: exit_mmap_tracepoint):
        // an mm already torn down goes now.
        if (m && m->nvmas == 0)
            st_mm_gone(mm);
#endif
    }
#endif
    submit(ctx, e);
    return 0;
}
TP_PROGRAMS(sched_process_exit, TPI_EXIT, tp_always, 0, sched_process_exit_body)

#if defined(HAVE_EXIT_MMAP_TP) && (defined(DERIVE_FROM_KMEM) || defined(WITH_STATE))
// exit_mmap ends an mm's teardown (anontrace_compat.h: exit_mmap_tracepoint).
// Where a task's exit event precedes exit_mm() (exit_event_before_exit_mm)
// the derived backend flushes here too; the state forgets the mm.
static __always_inline int exit_mmap_body(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef DERIVE_FROM_KMEM
    end_operation(ctx);
#endif
#ifdef WITH_STATE
    st_mm_gone(ctx->args[0]);
#endif
    return 0;
}
TP_PROGRAMS(exit_mmap, TPI_EXIT_MMAP, tp_always, 0, exit_mmap_body)
#endif

#ifdef FILTER_ENABLED
// Forget a traced process only when its task is freed: where the exit
// tracepoint fires before exit_mm() (anontrace_compat.h:
// exit_event_before_exit_mm), the mm teardown (the frees we want) comes after
// it.
static __always_inline int sched_process_free_body(struct bpf_raw_tracepoint_args *ctx)
{
    u64 task = ctx->args[0];
    u32 tgid = rd(task + OFF_TASK_TGID, 4);
    if (rd(task + OFF_TASK_PID, 4) == tgid)
        filter.delete(&tgid);
    return 0;
}
TP_PROGRAMS(sched_process_free, TPI_TASK_FREE, tp_always, 0, sched_process_free_body)
#endif

#ifdef WITH_STATE
// The census: seed the state with every VMA of the processes running when
// tracing began (anontrace_compat.h: task_vma_iter). Same facts and the same update as a
// traced operation, counted as no probe event.
BPF_ITER(task_vma)
{
    u64 task = (u64)ctx->task;
    u64 vma = (u64)ctx->vma;
    u32 tgid = census_tgid(task, vma);
    if (!tgid || !wanted_tgid(tgid))
        return 0;
    struct work *w = scratch_get();
    if (!w)
        return 0;
    census_fill(&w->e, tgid, task, vma);
    st_apply_vma(&w->e, NO_PROBE, 1);
    return 0;
}
#endif
