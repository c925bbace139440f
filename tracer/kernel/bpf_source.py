"""The BPF program text and the one function that parameterises it."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from tracer.kernel.layout import KernelLayout
from tracer.kernel.probes import METHOD_CODES, Plan


def _bpf_dir() -> Path:
    """Where the BPF C sources are: the ``tracer.bpf`` package data of an
    installed wheel (setup.cfg maps bpf_programs/ to it), else the
    checkout's bpf_programs/ (a source tree or an editable install). BCC
    compiles from a path, so the package must be unpacked on disk (wheels
    are)."""
    try:
        spec = importlib.util.find_spec("tracer.bpf")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        here = Path(next(iter(spec.submodule_search_locations)))
        if (here / "anontrace.bpf.c").is_file():
            return here
    return Path(__file__).resolve().parents[2] / "bpf_programs"


BPF_DIR = _bpf_dir()
MAIN_PROGRAM = BPF_DIR / "anontrace.bpf.c"
CENSUS_PROGRAM = BPF_DIR / "census.bpf.c"
RMAP_PROGRAM = BPF_DIR / "rmap.bpf.c"


@dataclass(frozen=True)
class BuildOptions:
    """Knobs that change the compiled program."""

    ringbuf: bool = True
    ringbuf_pages: int = 256  # 1 MiB: one second of a fork storm
    filter_pids: bool = False
    follow_children: bool = True
    filter_max: int = 65536
    av_slab_size: int = 0
    avc_slab_size: int = 0
    kmem_free_has_name: bool = False
    exit_mmap_tracepoint: bool = False
    kmem_raw: tuple[int, int] | None = None  # cache argument positions (raw tracepoints)
    task_storage: bool = False  # per-task pending state in task storage, not a hash
    # Each task builds its events in its own scratch (task storage), not a
    # per-CPU one: where the kernel can preempt a task inside our programs.
    scratch_per_task: bool = False
    # Second copies of the tracepoint programs (tracepoint_copies): where the
    # kernel can preempt a task inside a tracepoint program.
    tp_again: bool = False
    object_events: bool = False  # every anon_vma/anon_vma_chain allocation and free
    max_depth: int = 128
    max_chain: int = 128
    census_all: bool = False  # census.bpf.c: every process, not the census_tgids map
    events: bool = True       # stream events through the ring/perf buffer
    state: bool = False       # keep the figures in maps (tracer/kernel/kstate.py reads them)
    map_sizes: MapSizes | None = None
    prealloc: bool = True     # preallocate the state maps (compat: no_prealloc_tracing)


@dataclass(frozen=True)
class MapSizes:
    """Entries of the state maps, and how they get their memory. The
    defaults hold a host with 10,000 processes and 1,000,000 live anon_vmas;
    an insert into a full map is counted (anontrace_map_full_total) and
    recovered by a census.

    ``preallocate``: allocate every entry when the maps are created, as
    older kernels must. Where the kernel lets tracing programs use maps that
    allocate as entries come (compat: no_prealloc_tracing), that is the
    default: memory follows use, but inserts and deletes go through the
    kernel's BPF allocator, a large share of what the programs cost per fork
    under a fork storm (docs/state.md, "Map memory"), most of which
    ``st_vma`` and ``st_av`` avoid by recycling their entries (see
    :func:`recycle_slots`). Preallocated, the maps hold their maxima's
    memory from the start."""

    vmas: int = 1_310_720
    anon_vmas: int = 1_048_576
    mms: int = 32_768
    processes: int = 65_536
    families: int = 32_768
    preallocate: bool = False


RECYCLE_MAX = 2048


def recycle_slots(sizes: MapSizes, cpus: int | None = None) -> int:
    """The tombstones each CPU keeps in st_vma and in st_av for reuse
    (ST_RECYCLE, anontrace.bpf.c "entry recycling"): a power of two from 16
    to RECYCLE_MAX such that all CPUs' together take at most a sixteenth of
    the smaller map where it is big enough. ``cpus``: the host's (default:
    this one's)."""
    n = max(1, cpus or os.cpu_count() or 1)
    room = min(RECYCLE_MAX, min(sizes.vmas, sizes.anon_vmas) // (16 * n))
    slots = 16
    while slots * 2 <= room:
        slots *= 2
    return slots


# Raw tracepoints whose program may have a second copy (TP_AGAIN in
# anontrace.bpf.c; docs/state.md "Recursion misses"): the kmem ones where
# they are raw tracepoints (KMEM_RAW) and the process-event ones.
COPIED_TRACEPOINTS = ("kmem_cache_alloc", "kmem_cache_free", "sched_process_fork",
                      "sched_process_exec", "sched_process_exit", "exit_mmap",
                      "sched_process_free")
COPY_SLOTS = 8   # TPI_NR: the tp_taken counters, one per copied program


def tracepoint_copies(opts: BuildOptions) -> bool:
    """Whether the tracepoint programs get second copies, attached after
    them, that run a call's body when the kernel skipped the first for a task
    preempted inside it (TP_AGAIN): asked for (``tp_again``), and task
    storage for the marks. Which programs exist depends on the build; the
    loader attaches the copies the object has."""
    return opts.tp_again and opts.task_storage


def site_defines(plan: Plan) -> dict[str, str]:
    """The kmem call-site ranges as SITE_<KEY>_START/_END macros (the
    out-of-line helper's as SITE_OTHER_*, where there is one)."""
    d = {}
    for key in ("FORK", "CLONE", "PREPARE", "UNLINK", "PUT"):
        sym = plan.sites.get(key)
        # A missing site gets an empty range: nothing matches it.
        d[f"SITE_{key}_START"] = f"{sym.start:#x}ULL" if sym else "1ULL"
        d[f"SITE_{key}_END"] = f"{sym.end:#x}ULL" if sym else "0ULL"
    if plan.other_site is not None:
        d["SITE_OTHER_START"] = f"{plan.other_site.start:#x}ULL"
        d["SITE_OTHER_END"] = f"{plan.other_site.end:#x}ULL"
    return d


def cflags(plan: Plan, layout: KernelLayout, opts: BuildOptions) -> list[str]:
    """Every substitution into anontrace.bpf.c, as -D flags."""
    d: dict[str, int | str | None] = dict(layout.defines())
    for probe, macro in (("anon_vma_fork", "FORK_METHOD"), ("anon_vma_clone", "CLONE_METHOD"),
                         ("unlink_anon_vmas", "UNLINK_METHOD"),
                         ("page_set_anon_rmap", "RMAP_METHOD")):
        choice = plan.probes[probe]
        d[macro] = METHOD_CODES[plan.backend] if choice.ok else 0
    d["CLONE_NARGS"] = plan.clone_nargs
    if plan.backend == "tracepoint":
        d["DERIVE_FROM_KMEM"] = None
    if plan.rmap is not None and plan.probes["page_set_anon_rmap"].ok:
        r = plan.rmap
        names = [f"a{i}" for i in range(r.nargs)]
        d["RMAP_FUNC"] = r.function
        d["RMAP_FENTRY_ARGS"] = ", ".join(f"u64 {n}" for n in names)
        d["RMAP_VMA"] = names[r.vma]
        d["RMAP_PAGE"] = names[r.page]
        d["RMAP_ADDR"] = names[r.addr] if r.addr >= 0 else "0"
        d["RMAP_VMA_IDX"], d["RMAP_PAGE_IDX"], d["RMAP_ADDR_IDX"] = r.vma, r.page, r.addr
    d.update(site_defines(plan))
    d["AV_SLAB_SIZE"] = opts.av_slab_size
    d["AVC_SLAB_SIZE"] = opts.avc_slab_size
    if opts.kmem_free_has_name:
        d["KMEM_FREE_HAS_NAME"] = None
    if opts.exit_mmap_tracepoint:
        d["HAVE_EXIT_MMAP_TP"] = None
    if opts.kmem_raw is not None and "KMEM_CACHE_SIZE" in layout.offsets:
        d["KMEM_RAW"] = None
        d["KMEM_ALLOC_CACHE_ARG"], d["KMEM_FREE_CACHE_ARG"] = opts.kmem_raw
    if tracepoint_copies(opts):
        d["TP_AGAIN"] = None
    if opts.task_storage:
        d["HAVE_TASK_STORAGE"] = None
    if opts.scratch_per_task:
        d["SCRATCH_PER_TASK"] = None
    if opts.object_events:
        d["OBJECT_EVENTS"] = None
    if opts.ringbuf:
        d["USE_RINGBUF"] = None
        d["RINGBUF_PAGES"] = opts.ringbuf_pages
    if opts.filter_pids:
        d["FILTER_ENABLED"] = None
        if opts.follow_children:
            d["FOLLOW_CHILDREN"] = None
    d["FILTER_MAX"] = opts.filter_max
    d["MAX_DEPTH"] = opts.max_depth
    d["MAX_CHAIN"] = opts.max_chain
    d["CENSUS_MAX"] = opts.filter_max
    if opts.census_all:
        d["CENSUS_ALL"] = None
    if opts.events:
        d["WITH_EVENTS"] = None
    if opts.state:
        sizes = opts.map_sizes or MapSizes()
        d["WITH_STATE"] = None
        d["ST_VMA_MAX"] = sizes.vmas
        d["ST_AV_MAX"] = sizes.anon_vmas
        d["ST_MM_MAX"] = sizes.mms
        d["ST_PROC_MAX"] = sizes.processes
        d["ST_FAM_MAX"] = sizes.families
        d["ST_RECYCLE"] = recycle_slots(sizes)
        # BPF_F_NO_PREALLOC: memory as entries come, not the maxima up front,
        # where tracing programs may use such maps (compat: no_prealloc_tracing).
        d["ST_MAP_FLAGS"] = 0 if opts.prealloc or sizes.preallocate else 1
    return ([f"-I{BPF_DIR}"] +
            [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted(d.items())])


@dataclass(frozen=True)
class RmapOptions:
    """Knobs of rmap.bpf.c (the rmap census)."""

    anon_vmas: int = 1_048_576   # live anon_vmas on the host it can count
    mms: int = 65_536            # address spaces
    targets: int = 65_536        # processes whose chains are written out
    max_chain: int = 256         # chain entries walked per VMA (the verifier's budget)
    prealloc: bool = True        # preallocate (compat: no_prealloc_tracing)


def rmap_cflags(layout: KernelLayout, opts: RmapOptions) -> list[str]:
    """Every substitution into rmap.bpf.c, as -D flags."""
    d: dict[str, int | str | None] = dict(layout.defines())
    d["RMAP_AV_MAX"] = opts.anon_vmas
    d["RMAP_MM_MAX"] = opts.mms
    d["CENSUS_MAX"] = opts.targets
    d["MAX_CHAIN"] = opts.max_chain
    d["RMAP_MAP_FLAGS"] = 0 if opts.prealloc else 1   # BPF_F_NO_PREALLOC
    return ([f"-I{BPF_DIR}"] +
            [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted(d.items())])
