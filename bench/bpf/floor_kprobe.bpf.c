// Floors for bench/fork_overhead.py on the kprobe backend's hooks.
// bench/floors.py loads floor_common.h and this file as one text (BCC turns
// map calls into helper calls only in the text it is given), substitutes
// every -D and attaches the kp_/kr_ functions as the tool does: a kprobe on
// each rmap function, a kretprobe on anon_vma_fork and anon_vma_clone.
//
// The same floors as floor_fentry.bpf.c; a kretprobe does not see the
// arguments, so the entry keeps the VMA for it (one more map entry per
// call, as the tool's kprobe backend pays).

#include <uapi/linux/ptrace.h>

#ifndef EMPTY
BPF_HASH(fork_vma, u64, u64, 10240);   // thread -> the VMA its anon_vma_fork got
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
    if (!PT_REGS_RC(ctx))
        vma_forked(vma, id >> 32);
#endif
    return 0;
}

int kp_unlink_entry(struct pt_regs *ctx)
{
#ifndef EMPTY
    vma_unlinked(PT_REGS_PARM1(ctx));
#endif
    return 0;
}

int kp_clone_entry(struct pt_regs *ctx) { return 0; }
int kr_clone_exit(struct pt_regs *ctx) { return 0; }
int kp_rmap_entry(struct pt_regs *ctx) { return 0; }

PUT_FREES_AND_PROCESS_HOOKS
