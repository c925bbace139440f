// SPDX-License-Identifier: GPL-2.0
//
// anontrace census: the anon_vma facts of every VMA of the traced processes
// that were running before tracing began, read once with a task_vma BPF
// iterator (anontrace_compat.h: task_vma_iter). Each record is a K_CENSUS_VMA struct event, written to the
// iterator's seq_file.

#include "anontrace_common.h"

BPF_HASH(census_tgids, u32, u8, CENSUS_MAX);
BPF_PERCPU_ARRAY(census_scratch, struct work, 1);

BPF_ITER(task_vma)
{
    u64 task = (u64)ctx->task;
    u64 vma = (u64)ctx->vma;
    u32 tgid = census_tgid(task, vma);
    if (!tgid)
        return 0;
#ifndef CENSUS_ALL
    if (!census_tgids.lookup(&tgid))
        return 0;
#endif
    int zero = 0;
    struct work *w = census_scratch.lookup(&zero);
    if (!w)
        return 0;
    census_fill(&w->e, tgid, task, vma);
    bpf_seq_write(ctx->meta->seq, &w->e, sizeof(w->e));
    return 0;
}
