// Floors for bench/fork_overhead.py on the kprobe backend's hooks
// (bench/floors.py substitutes every -D below and attaches the kp_/kr_
// functions as the tool does: a kprobe on each rmap function, a kretprobe
// on anon_vma_fork and anon_vma_clone).
//
// EMPTY: programs that return at once, the price of the hooks.
// Otherwise the same cheapest per-object design as floor_fentry.bpf.c; a
// kretprobe does not see the arguments, so the entry keeps the VMA for it
// (one more map entry per call, as the tool's own kprobe backend pays).
//
// OFF_VMA_ANON_VMA: vm_area_struct.anon_vma (BTF); SITE_PUT_*: __put_anon_vma.

#include <uapi/linux/ptrace.h>

#ifndef EMPTY
BPF_HASH(owner, u64, u32, 1048576);
BPF_HASH(vmas, u64, u32, 1048576);
BPF_HASH(objects, u32, s64, 65536);
BPF_HASH(fork_vma, u64, u64, 10240);   // thread -> the VMA its anon_vma_fork got
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

int kp_fork_entry(struct pt_regs *ctx)
{
#ifndef EMPTY
    u64 id = bpf_get_current_pid_tgid();
    u64 vma = PT_REGS_PARM1(ctx);
    fork_vma.update(&id, &vma);
#endif
    return 0;
}

int kr_fork_exit(struct pt_regs *ctx)
{
#ifndef EMPTY
    u64 id = bpf_get_current_pid_tgid();
    u64 *v = fork_vma.lookup(&id);
    if (!v)
        return 0;
    u64 vma = *v;
    fork_vma.delete(&id);
    if (PT_REGS_RC(ctx))
        return 0;
    u64 av = 0;
    bpf_probe_read_kernel(&av, sizeof(av), (void *)(vma + OFF_VMA_ANON_VMA));
    if (!av)
        return 0;
    u32 tgid = id >> 32;
    vmas.update(&vma, &tgid);
    if (owner.insert(&av, &tgid) == 0) {   // new, not a reused ancestor
        count(tgid, 1);
        own();
    }
#endif
    return 0;
}

int kp_clone_entry(struct pt_regs *ctx) { return 0; }
int kr_clone_exit(struct pt_regs *ctx) { return 0; }
int kp_rmap_entry(struct pt_regs *ctx) { return 0; }

int kp_unlink_entry(struct pt_regs *ctx)
{
#ifndef EMPTY
    u64 vma = PT_REGS_PARM1(ctx);
    if (vmas.lookup(&vma))
        vmas.delete(&vma);
#endif
    return 0;
}

RAW_TRACEPOINT_PROBE(kmem_cache_free)
{
#ifndef EMPTY
    u64 ip = ctx->args[0];
    if (!(ip >= SITE_PUT_START && ip < SITE_PUT_END))
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

RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }
