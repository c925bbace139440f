// SPDX-License-Identifier: GPL-2.0
//
// anontrace census: the anon_vma facts of every VMA of the traced processes
// that were running before tracing began, read once with a task_vma BPF
// iterator (v5.12+; a TRACING program, so kernels that refuse fentry refuse
// it too). Each record is a K_CENSUS_VMA struct event, written to the
// iterator's seq_file.

#include "anontrace_common.h"

BPF_HASH(census_tgids, u32, u8, CENSUS_MAX);
BPF_PERCPU_ARRAY(census_scratch, struct work, 1);

BPF_ITER(task_vma)
{
    struct seq_file *seq = ctx->meta->seq;
    u64 task = (u64)ctx->task;
    u64 vma = (u64)ctx->vma;
    if (!task || !vma)
        return 0;
    u32 tgid = rd(task + OFF_TASK_TGID, 4);
    // Threads share the leader's mm: visit each mm once.
    if (rd(task + OFF_TASK_PID, 4) != tgid)
        return 0;
#ifndef CENSUS_ALL
    if (!census_tgids.lookup(&tgid))
        return 0;
#endif
    if (!rd64(vma + OFF_VMA_ANON_VMA))
        return 0;
    int zero = 0;
    struct work *w = census_scratch.lookup(&zero);
    if (!w)
        return 0;
    struct event *e = &w->e;
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->kind = K_CENSUS_VMA;
    e->tgid = tgid;
    e->tid = tgid;
    bpf_probe_read_kernel(&e->comm, sizeof(e->comm), (void *)(task + OFF_TASK_COMM));
    fill_vma(e, vma);
    e->cur_mm = e->mm;  // read in the process's own mm: the model may own it
    bpf_seq_write(seq, e, sizeof(*e));
    return 0;
}
