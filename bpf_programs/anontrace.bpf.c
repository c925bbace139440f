// SPDX-License-Identifier: GPL-2.0
//
// anontrace: anon_vma lifecycle events.
//
// Compiled by BCC with -D definitions from tracer/bpf_source.py (the only
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


#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);
BPF_PERCPU_ARRAY(scratch, struct work, 1);
BPF_HASH(filter, u32, u8, FILTER_MAX);

static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
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

static __always_inline struct event *new_event(u32 kind)
{
    int zero = 0;
    struct work *w = scratch.lookup(&zero);
    if (!w)
        return 0;
    struct event *e = &w->e;
    __builtin_memset(e, 0, sizeof(*e));
    u64 id = bpf_get_current_pid_tgid();
    e->ts = bpf_ktime_get_ns();
    e->kind = kind;
    e->tgid = id >> 32;
    e->tid = (u32)id;
    e->cur_mm = rd64((u64)bpf_get_current_task() + OFF_TASK_MM);
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void submit(void *ctx, struct event *e)
{
#ifdef USE_RINGBUF
    if (events.ringbuf_output(e, sizeof(*e), 0))
        count(C_LOST_OUTPUT);
#else
    if (events.perf_submit(ctx, e, sizeof(*e)))
        count(C_LOST_OUTPUT);
#endif
}


static __always_inline void emit_vma_event(void *ctx, u32 kind, u64 vma, u64 aux, u64 aux2, s32 ret)
{
    if (!wanted())
        return;
    struct event *e = new_event(kind);
    if (!e)
        return;
    fill_vma(e, vma);
    // dup_mmap() calls anon_vma_fork() for every VMA, __split_vma() calls
    // anon_vma_clone() and teardown calls unlink_anon_vmas() for VMAs that
    // never had an anon_vma: those calls change nothing, and the derived
    // backend cannot see them either, so they are not events.
    if (!e->anon_vma && !e->chain_len && !ret)
        return;
    e->aux = aux;
    e->aux2 = aux2;
    e->ret = ret;
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
#if CLONE_NARGS == 3
// 7.0 ("mm: clean up anon_vma implementation") adds enum vma_operation.
KRETFUNC_PROBE(anon_vma_clone, u64 dst, u64 src, u64 op, int ret)
#else
KRETFUNC_PROBE(anon_vma_clone, u64 dst, u64 src, int ret)
#endif
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

static __always_inline void emit_avc(void *ctx, u32 kind, u32 site, u64 avc, u32 flags)
{
    struct event *e = new_event(kind);
    if (!e)
        return;
    u64 anon_vma;
    u64 vma = read_avc(e, avc, &anon_vma);
    fill_vma(e, vma);
    e->aux = avc;
    e->aux2 = anon_vma;
    e->site = site;
    e->flags |= flags;
    submit(ctx, e);
}

static __always_inline void emit_av(void *ctx, u32 kind, u32 site, u64 av, u32 flags)
{
    struct event *e = new_event(kind);
    if (!e)
        return;
    fill_anon_vma(e, av);
    e->site = site;
    e->flags |= flags;
    submit(ctx, e);
}

#ifdef DERIVE_FROM_KMEM
// Tracepoint backend. At kmem_cache_alloc the object is not initialised yet,
// so each allocation waits in `pending` until the operation that made it has
// finished: the task's next rmap allocation of the same kind at the same site
// (a new operation), a clone-site allocation (anon_vma_clone links each chain
// entry right after allocating it), a free, the end of fork
// (sched_process_fork), a syscall exit, or task exit. Facts are read then.
struct pending {
    u64 clone_avc;
    u64 fork_av;
    u64 fork_avc;
    u64 prep_av;
    u64 prep_avc;
    u64 sync;   // an unlink is in progress: tell user space when it ends
    u64 live;   // the task has an operation open (the fields above may all be 0)
};

#ifdef HAVE_TASK_STORAGE
// Task-local storage (v5.11: 4cf1bc1f1045, tracing programs a10787e6d58c):
// found through the task, no hash, no bucket lock, freed with the task. A
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

static __always_inline void flush_clone(void *ctx, struct pending *p)
{
    if (p->clone_avc)
        emit_avc(ctx, K_AVC_ALLOC, S_CLONE, p->clone_avc, F_DEFERRED);
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
        emit_avc(ctx, K_AVC_ALLOC, S_FORK, p->fork_avc, F_DEFERRED);
    p->fork_av = 0;
    p->fork_avc = 0;
}

static __always_inline void flush_prep(void *ctx, struct pending *p)
{
    if (p->prep_av)
        emit_av_alloc(ctx, S_PREPARE, p->prep_av);
    if (p->prep_avc)
        emit_avc(ctx, K_AVC_ALLOC, S_PREPARE, p->prep_avc, F_DEFERRED);
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
    flush_clone(ctx, p);
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
    flush_clone(ctx, p);
    if (site == S_CLONE) {
        if (fork_done(p))
            flush_fork(ctx, p);
        flush_prep(ctx, p);
        p->clone_avc = ptr;
    } else if (site == S_FORK) {
        if ((is_av && p->fork_av) || (!is_av && p->fork_avc))
            flush_fork(ctx, p);
        flush_prep(ctx, p);
        if (is_av)
            p->fork_av = ptr;
        else
            p->fork_avc = ptr;
    } else if (site == S_PREPARE) {
        if ((is_av && p->prep_av) || (!is_av && p->prep_avc))
            flush_prep(ctx, p);
        if (fork_done(p))
            flush_fork(ctx, p);
        if (is_av)
            p->prep_av = ptr;
        else
            p->prep_avc = ptr;
    } else {
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
    struct event *e = new_event(K_SYNC);
    if (e)
        submit(ctx, e);
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    end_operation(ctx);
    return 0;
}

#ifdef HAVE_EXIT_MMAP_TP
// Since v6.16 a task's exit event precedes exit_mm(); exit_mmap ends the
// teardown (tracepoint mmap:exit_mmap, v6.1).
RAW_TRACEPOINT_PROBE(exit_mmap)
{
    end_operation(ctx);
    return 0;
}
#endif
#endif /* DERIVE_FROM_KMEM */

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
#elif defined(OBJECT_EVENTS)
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

static __always_inline void handle_free(void *ctx, u32 site, int is_av, u64 ptr)
{
#ifdef DERIVE_FROM_KMEM
    flush_all(ctx);
#endif
    // The object is still intact at kmem_cache_free: read it. The model needs
    // every anon_vma free; chain-entry frees only feed the derived backend's
    // unlink grouping (or --raw output).
    if (is_av) {
        emit_av(ctx, K_AV_FREE, site, ptr, 0);
    } else {
#if defined(DERIVE_FROM_KMEM) || defined(OBJECT_EVENTS)
        emit_avc(ctx, K_AVC_FREE, site, ptr, 0);
#endif
    }
#ifdef DERIVE_FROM_KMEM
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
// Raw tracepoints skip building the trace record (the perf-style
// tracepoint copies the cache name on every slab operation system-wide).
// Arguments since v6.1 ("mm/tracing: add 'accounted' entry into output of
// allocation tracepoints" era): call_site, ptr, struct kmem_cache *s, ...;
// the position of `s` comes from BTF (btf_trace_kmem_cache_*).
RAW_TRACEPOINT_PROBE(kmem_cache_alloc)
{
    u32 site = site_of(ctx->args[0]);
    if (!site || !wanted())
        return 0;
    u64 cache = ctx->args[KMEM_ALLOC_CACHE_ARG];
    handle_alloc(ctx, site, rd(cache + OFF_KMEM_CACHE_SIZE, 4), ctx->args[1]);
    return 0;
}

RAW_TRACEPOINT_PROBE(kmem_cache_free)
{
    u32 site = site_of(ctx->args[0]);
    if (!site || !wanted())
        return 0;
    u64 cache = ctx->args[KMEM_FREE_CACHE_ARG];
    // The anon_vma cache is never merged (it has a constructor), so its
    // object size identifies it among the objects rmap functions free.
    handle_free(ctx, site, rd(cache + OFF_KMEM_CACHE_SIZE, 4) == AV_SLAB_SIZE, ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kmem_cache_alloc)
{
    u32 site = site_of(args->call_site);
    if (!site || !wanted())
        return 0;
    handle_alloc(args, site, args->bytes_alloc, (u64)args->ptr);
    return 0;
}

TRACEPOINT_PROBE(kmem, kmem_cache_free)
{
    u32 site = site_of(args->call_site);
    if (!site || !wanted())
        return 0;
    int is_av;
#ifdef KMEM_FREE_HAS_NAME
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
    handle_free(args, site, is_av, (u64)args->ptr);
    return 0;
}
#endif

// ------------------------------------------------------ process lifecycle
RAW_TRACEPOINT_PROBE(sched_process_fork)
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
    bpf_probe_read_kernel(&e->comm, sizeof(e->comm), (void *)(child + OFF_TASK_COMM));
    submit(ctx, e);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    if (!wanted())
        return 0;
    struct event *e = new_event(K_PROC_EXEC);
    if (!e)
        return 0;
    e->mm = e->cur_mm;
    e->pid2 = (u32)ctx->args[1];
    submit(ctx, e);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
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
    submit(ctx, e);
    return 0;
}

#ifdef FILTER_ENABLED
// Forget a traced process only when its task is freed: since v6.16 the exit
// tracepoint fires before exit_mm(), and the mm teardown (the frees we want)
// comes after it.
RAW_TRACEPOINT_PROBE(sched_process_free)
{
    u64 task = ctx->args[0];
    u32 tgid = rd(task + OFF_TASK_TGID, 4);
    if (rd(task + OFF_TASK_PID, 4) == tgid)
        filter.delete(&tgid);
    return 0;
}
#endif
