"""Every kernel difference anontrace handles, in one place.

Each difference is a :class:`KernelChange`: the mainline commit that made it
(abbreviated hash, subject, first release), the feature test that decides it
on a running kernel (BTF, kallsyms, tracefs; never the version number), and
what anontrace does on either side. The feature tests are the functions
below; the BPF side of the same differences is
``bpf_programs/anontrace_compat.h``, and docs/kernels.md explains each one.

Where a hash could not be established from the sources this project was
built from, ``commit`` is None and the subject and release identify the
change (docs/kernels.md says so too); a hash is never guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.kernel_env import Kallsyms


@dataclass(frozen=True)
class KernelChange:
    """One upstream change that anontrace must tell apart at run time."""

    key: str
    commit: str | None      # 12-digit abbreviated mainline hash, None if not known to us
    title: str              # the commit's subject (or the series', for a series)
    release: str            # first mainline release that has it
    detected_by: str        # the feature test
    effect: str             # what anontrace does differently

    def cite(self) -> str:
        """``commit 2555283eb40d ("subject") (v6.0)``, the drgn way."""
        what = self.commit or "(hash not established)"
        return f'commit {what} ("{self.title}") ({self.release})'


CHANGES: tuple[KernelChange, ...] = (
    KernelChange(
        "anon_vma_degree", "7a3ef208e662",
        "mm: prevent endless growth of anon_vma hierarchy", "v3.19",
        "BTF: struct anon_vma has `degree`",
        "fork reuses an ancestor anon_vma of degree < 2; the one counter is read as fan-out"),
    KernelChange(
        "anon_vma_num_children", "2555283eb40d",
        "mm/rmap: Fix anon_vma->degree ambiguity leading to double-reuse", "v6.0",
        "BTF: struct anon_vma has `num_children` and `num_active_vmas` "
        "(also in several stable series)",
        "children and VMAs are counted apart; reuse needs num_children < 2 and "
        "num_active_vmas == 0"),
    KernelChange(
        "kmem_free_name", "3544de8ee6e4",
        "mm, tracing: record slab name for kmem_cache_free()", "v5.12",
        "tracefs: kmem:kmem_cache_free has a `name` field",
        "the perf-style free tracepoint tells anon_vma frees by cache name, not only by call site"),
    KernelChange(
        "kmem_cache_arg", "2c1d697fb8ba",
        "mm/slab_common: drop kmem_alloc & avoid dereferencing fields when not using", "v6.1",
        "BTF: btf_trace_kmem_cache_alloc/free take a `struct kmem_cache *`",
        "raw kmem tracepoints (no trace record built) read the object size from the cache"),
    KernelChange(
        "exit_mmap_tracepoint", "d4af56c5c7c6",
        "mm: start tracking VMAs with maple tree", "v6.1",
        "tracefs: mmap:exit_mmap exists",
        "the end of an mm's teardown is an event; without it an mm is forgotten at its "
        "owner's exit"),
    KernelChange(
        "folio_set_anon", None,
        "mm/rmap: move folio_test_anon() check out of __folio_set_anon()", "v6.7",
        "kallsyms + BTF: the first attachable of RMAP_CANDIDATES",
        "__page_set_anon_rmap became __folio_set_anon (static, usually inlined); the page "
        "probe falls back to the add_new_anon_rmap callers"),
    KernelChange(
        "exit_event_before_exit_mm", None,
        "exit: move trace_sched_process_exit earlier in do_exit()", "v6.16",
        "none needed: both orders are handled as they happen",
        "the exit event comes before exit_mm() instead of after the mm's teardown; a "
        "process's figures are taken just before its teardown on both orders"),
    KernelChange(
        "anon_vma_rework", None,
        "mm: clean up anon_vma implementation", "v7.0",
        "BTF: anon_vma_clone() has a third parameter (enum vma_operation)",
        "anon_vma_fork() allocates its anon_vma and chain entry before cloning and frees "
        "both when the clone reused an ancestor: a fork-site allocation is no proof of a "
        "new level; a VMA's chain list is no longer newest first (`tree` orders it by "
        "depth)"),
    KernelChange(
        "lookup_batch", "cb4d03ab499d",
        "bpf: Add generic support for lookup batch op", "v5.6",
        "the BPF_MAP_LOOKUP_BATCH call itself (ENOTSUPP/EINVAL fall back)",
        "state maps are read in batches of a few thousand entries"),
    KernelChange(
        "ringbuf", "457f44363a88",
        "bpf: Implement BPF ring buffer and verifier support for it", "v5.8",
        "kallsyms: bpf_ringbuf_output",
        "events go through a ring buffer; without it, per-CPU perf buffers"),
    KernelChange(
        "task_storage", "4cf1bc1f1045",
        "bpf: Implement task local storage", "v5.11",
        "kallsyms: bpf_task_storage_get and bpf_get_current_task_btf (a10787e6d58c, "
        "3ca1032ab7ab, same release)",
        "an operation's pending state lives in task storage instead of a hash keyed by pid"),
    KernelChange(
        "task_vma_iter", "3a7b35b899de",
        "bpf: Introduce task_vma bpf_iter", "v5.12",
        "loading census.bpf.c",
        "the census walks every VMA of existing processes; without it, no census"),
    KernelChange(
        "recursion_misses", "9ed9e9ba2337",
        "bpf: Count the number of times recursion was prevented", "v5.12",
        "fdinfo of each program has recursion_misses",
        "program runs the kernel skipped are counted as losses"),
    KernelChange(
        "no_prealloc_tracing", "96da3f7d489d",
        "bpf: Remove tracing program restriction on map types", "v6.1",
        "kallsyms: bpf_mem_alloc (the allocator of 7c8199e24fa0, same release)",
        "tracing programs may use hash maps that allocate as entries come "
        "(BPF_F_NO_PREALLOC); before, the state maps are preallocated"),
    KernelChange(
        "preemptible_tracepoints", None,
        "tracing: Guard __DECLARE_TRACE() use of __DO_TRACE_CALL() with SRCU-fast", "v7.0",
        "kallsyms: init_srcu_struct_fast (the SRCU-fast API of the same series), and the "
        "preemption model in /sys/kernel/debug/sched/preempt",
        "tracepoint programs run with migration, not preemption, disabled: on a full or "
        "lazy preemption model a task preempted inside one makes the next task on that CPU "
        "skip it: the tracepoint programs get second copies that run the calls the first "
        "skipped (TP_AGAIN)"),
    KernelChange(
        "preemptible_trampoline", None,
        "bpf: Use migrate_disable/enable in trampoline code", "v5.7",
        "the preemption model in /sys/kernel/debug/sched/preempt; where that is closed, the "
        "build configuration and preempt= on the command line; failing both, "
        "preempt_schedule in kallsyms",
        "fentry/fexit and iterator programs run with migration, not preemption, disabled: "
        "on a full or lazy model a task preempted inside an fentry program makes the next "
        "task on that CPU skip it (counted lost), so auto prefers kprobes, which run with "
        "preemption disabled, and every program builds its event in per-task scratch"),
)

_BY_KEY = {c.key: c for c in CHANGES}


def change(key: str) -> KernelChange:
    """The change recorded under ``key`` (KeyError names an unknown key)."""
    return _BY_KEY[key]


# ------------------------------------------------------------ feature tests

def anon_vma_counters(btf: Btf) -> str:
    """``"num_children"`` (2555283eb40d) or ``"degree"`` (7a3ef208e662)."""
    if btf.has_member("anon_vma", "num_children"):
        return "num_children"
    if btf.has_member("anon_vma", "degree"):
        return "degree"
    raise BtfError("struct anon_vma has neither num_children nor degree: "
                   "an anon_vma design this version of anontrace does not know")


def anon_vma_clone_nargs(btf: Btf | None) -> int:
    """anon_vma_clone()'s parameter count: 3 after the anon_vma rework."""
    if btf is not None and btf.has_func("anon_vma_clone"):
        return len(btf.func_params("anon_vma_clone"))
    return 2


# The page-joins-anon_vma function, newest name first among the static ones
# (folio_set_anon); the exported callers for new private pages are the
# fallback where both are inlined.
RMAP_CANDIDATES = ("__page_set_anon_rmap", "__folio_set_anon",
                   "folio_add_new_anon_rmap", "page_add_new_anon_rmap")


def kmem_free_has_name(free_format_fields: set[str] | frozenset[str]) -> bool:
    """kmem_cache_free's trace record names the cache (kmem_free_name)."""
    return "name" in free_format_fields


def kmem_raw_cache_args(btf: Btf | None) -> tuple[int, int] | None:
    """Raw-tracepoint argument positions of ``struct kmem_cache *`` in
    kmem_cache_alloc and kmem_cache_free (kmem_cache_arg), or None where the
    tracepoints do not pass the cache or BTF cannot tell."""
    if btf is None or not btf.has_member("kmem_cache", "size"):
        return None
    found = []
    for tp in ("btf_trace_kmem_cache_alloc", "btf_trace_kmem_cache_free"):
        try:
            params = btf.typedef_proto_params(tp)
        except BtfError:
            return None
        # params[0] is the tracepoint's private data; raw args start after it.
        idx = [i - 1 for i, p in enumerate(params) if i and p.type_name == "struct kmem_cache *"]
        if not idx or params[1].type_name != "long unsigned int":
            return None
        found.append(idx[0])
    return found[0], found[1]


def ringbuf_available(kallsyms: Kallsyms) -> bool:
    """BPF_MAP_TYPE_RINGBUF and its output helper (ringbuf)."""
    return "bpf_ringbuf_output" in kallsyms


def task_storage_available(kallsyms: Kallsyms) -> bool:
    """Task-local storage reachable from tracing programs (task_storage)."""
    return "bpf_task_storage_get" in kallsyms and "bpf_get_current_task_btf" in kallsyms


def programs_preemptible(kallsyms: Kallsyms, preempt_model: str | None) -> bool:
    """Whether the kernel can preempt a task inside a BPF program that runs
    with migration, not preemption, disabled (fentry/fexit and iterators
    always: "bpf: Use migrate_disable/enable in trampoline code", v5.7;
    tracepoint programs since preemptible_tracepoints). Kprobe programs run
    with preemption disabled on every kernel. Under the none or voluntary
    model a BPF program has no preemption point; under full, lazy or rt it
    can be preempted anywhere. ``preempt_model`` is
    /sys/kernel/debug/sched/preempt, whose current model is in parentheses
    ("none voluntary full (lazy)"), or None where it cannot be read (no
    debugfs, or a kernel without dynamic preemption): then preempt_schedule
    in kallsyms, built only where the kernel preempts (CONFIG_PREEMPTION)."""
    current = re.search(r"\((\w+)\)", preempt_model or "")
    if current:
        return current.group(1) not in ("none", "voluntary")
    return "preempt_schedule" in kallsyms


def tracepoint_programs_preemptible(kallsyms: Kallsyms, preempt_model: str | None) -> bool:
    """Whether a task can be preempted inside a BPF program on a tracepoint
    (preemptible_tracepoints). Before that change tracepoints ran their
    callbacks with preemption disabled, so only interrupts nested in our
    programs. After it they hold SRCU-fast and BPF disables migration only,
    so the preemption model decides (programs_preemptible)."""
    if "init_srcu_struct_fast" not in kallsyms:
        return False
    return programs_preemptible(kallsyms, preempt_model)


def no_prealloc_allowed(kallsyms: Kallsyms) -> bool:
    """Tracing programs may use BPF_F_NO_PREALLOC hash maps
    (no_prealloc_tracing): the BPF memory allocator they rest on shows its
    entry point in kallsyms."""
    return "bpf_mem_alloc" in kallsyms
