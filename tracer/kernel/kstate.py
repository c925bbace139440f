"""The figures the BPF programs keep in maps (WITH_STATE), decoded.

The programs update the state as the kernel works (bpf_programs/
anontrace.bpf.c, section "state maps"); user space only reads it, when it
reports or is scraped. This module is pure Python: it decodes the raw bytes
of the maps (as :meth:`tracer.kernel.bpf_session.TraceSession.read_state` dumps
them) into :class:`KernelState`, with the same definitions as
:class:`tracer.model.hierarchy.Model` (README "Definitions"), so unit tests run it on
dumps recorded from real kernels and compare it with a replay.

Layouts mirror the C structs; ``tests/unit/test_kstate.py`` checks them
against the C source.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from tracer.format.events import comm_text
from tracer.model.types import PROBE_NAMES, ProcessFigures

NB = 64                       # histogram bins (C: NB)

# struct vstate / avstate / mmstate / pstate / famstate
VSTATE = struct.Struct("<QQII")
AVSTATE = struct.Struct("<QQQ8I")
MMSTATE_FMT = f"4I4I3II{NB}I{NB}I{NB}I"
MMSTATE = struct.Struct("<" + MMSTATE_FMT)
PSTATE = struct.Struct("<QQII4I16s" + MMSTATE_FMT)
FAMSTATE = struct.Struct(f"<4I{NB}I")
PSTATE_HEAD = struct.Struct("<QQII")   # mm, exit_ns, ppid, flags
MM_HEAD = struct.Struct("<4I4I3II")     # struct mmstate up to its histograms
PROC_HEAD = struct.Struct("<QQII4I16s")  # struct pstate up to its exit copy
FAM_HEAD = struct.Struct("<4I")         # struct famstate up to its histogram
HIST_BYTES = 4 * NB

P_ALIVE, P_UNSEEN, P_CENSUS, P_EXITING = 1, 2, 4, 8

# st_global indexes (C: G_*)
G_AVS, G_CHAINS, G_ORPHANS, G_EVENTS, G_ANOMALIES, G_FULL = 0, 1, 2, 3, 7, 8
G_NR = 13
MAP_NAMES = ("vmas", "anon_vmas", "mms", "processes", "families")

PREEXISTING_REASON = ("processes running before tracing began: anon_vmas of their VMAs that no "
                      "event touched since are unknown")


def hist_max_at(raw: bytes, offset: int, big: int) -> int:
    """The largest value the NB-bin u32 histogram at ``offset`` of ``raw``
    holds (C: hist_max): bins 0..NB-2 are exact; the top bin holds "NB-1 or
    more", whose largest value is ``big``. The last non-empty bin is found
    from the histogram read as one little-endian integer, whose highest set
    bit is in that bin (a fifth of the time of unpacking it)."""
    bits = int.from_bytes(raw[offset:offset + HIST_BYTES], "little").bit_length()
    top = (bits - 1) // 32 if bits else 0
    return big if top == NB - 1 else top


@dataclass(frozen=True, slots=True)
class MmRow:
    """One address space's figures (struct mmstate)."""

    mm: int
    tgid: int
    vmas: int
    anon_vmas: int
    anon_vma_chains: int
    events: tuple[int, int, int, int]
    max_depth: int
    max_chain: int
    max_degree: int

    @staticmethod
    def decode(mm: int, raw: bytes, offset: int = 0) -> MmRow:
        """The struct mmstate at ``offset`` of ``raw``. serve decodes every
        mm once a second: the histograms are not unpacked, only their last
        non-empty bin is found (:func:`hist_max_at`)."""
        f = MM_HEAD.unpack_from(raw, offset)
        at = offset + MM_HEAD.size
        depth, chain, degree = (hist_max_at(raw, at + i * HIST_BYTES, f[8 + i]) for i in range(3))
        return MmRow(mm, f[0], f[1], f[2], f[3], (f[4], f[5], f[6], f[7]), depth, chain, degree)


@dataclass(frozen=True, slots=True)
class ProcRow:
    """One process (struct pstate): alive with its mm's figures, or exited
    with its figures as of the exit event."""

    pid: int
    ppid: int
    comm: str
    alive: bool
    flags: int
    mm: int
    exit_ns: int
    figures: ProcessFigures

    @property
    def exited(self) -> bool:
        """Its exit was seen (an entry without an exit time and not alive is
        one a program is still filling in: neither alive nor gone yet)."""
        return not self.alive and self.exit_ns != 0

    @property
    def unseen(self) -> bool:
        """First seen mid-life and not covered by a census."""
        return bool(self.flags & P_UNSEEN) and not self.flags & P_CENSUS


def _figures(events: Iterable[int], mm: MmRow | None) -> ProcessFigures:
    ev = list(events)
    if mm is not None:
        ev = [a + b for a, b in zip(ev, mm.events, strict=True)]
    names = dict(zip(PROBE_NAMES, ev, strict=True))
    if mm is None:
        return ProcessFigures(0, 0, 0, 0, 0, names)
    return ProcessFigures(mm.anon_vmas, mm.anon_vma_chains, mm.max_depth, mm.max_degree,
                          mm.max_chain, names)


def decode_proc(pid: int, raw: bytes, mms: dict[int, MmRow]) -> ProcRow:
    """A struct pstate; a live process's figures come from its mm's row."""
    f = PROC_HEAD.unpack_from(raw)
    mm, exit_ns, ppid, flags = f[0], f[1], f[2], f[3]
    ev_prev = f[4:8]
    comm = comm_text(f[8])
    alive = bool(flags & P_ALIVE)
    if alive and not flags & P_EXITING:
        figures = _figures(ev_prev, mms.get(mm) if mm else None)
    else:
        # The snapshot of its mm at exit, or, for a process whose teardown
        # began before its exit event (compat: exit_event_before_exit_mm), at that start.
        figures = _figures(ev_prev, MmRow.decode(mm, raw, PROC_HEAD.size))
    return ProcRow(pid, ppid, comm, alive, flags, mm, exit_ns, figures)


def torn_reads(procs: dict[int, bytes], mms: dict[int, bytes]) -> list[int]:
    """Processes listed alive in an mm the mm dump does not hold.

    The maps are dumped one after the other, not as one snapshot: the mms
    first, then the processes, so that a process still alive (and not
    exiting) in the later dump had its mm intact in the earlier one (its
    exit figures are copied before its teardown begins). A process created
    or exec'd in between has an mm the mm dump missed: read that mm, then
    the process again (it may have exited meanwhile)."""
    out = []
    for pid, raw in procs.items():
        mm, _, _, flags = PSTATE_HEAD.unpack_from(raw)
        if mm and flags & P_ALIVE and not flags & P_EXITING and mm not in mms:
            out.append(pid)
    return out


def torn_rows(procs: dict[int, ProcRow], mms: dict[int, MmRow]) -> list[int]:
    """:func:`torn_reads` on decoded rows (a streamed read keeps no bytes)."""
    return [pid for pid, r in procs.items()
            if r.mm and r.flags & P_ALIVE and not r.flags & P_EXITING and r.mm not in mms]


@dataclass(frozen=True, slots=True)
class FamilyState:
    """A family (struct famstate): the anon_vmas whose roots one process
    created, by that process's pid."""

    pid: int
    anon_vmas: int
    orphaned_anon_vmas: int
    max_depth: int

    @staticmethod
    def decode(pid: int, raw: bytes) -> FamilyState:
        avs, orphans, big, _ = FAM_HEAD.unpack_from(raw)
        return FamilyState(pid, avs, orphans, hist_max_at(raw, FAM_HEAD.size, big))


@dataclass
class Globals:
    """The per-CPU counters of st_global and st_depths, summed."""

    anon_vmas: int = 0
    anon_vma_chains: int = 0
    orphaned_anon_vmas: int = 0
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBE_NAMES, 0))
    anomalies: int = 0
    map_full: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MAP_NAMES, 0))
    learned_depths: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def from_sums(sums: list[int], depths: list[int]) -> Globals:
        """``sums``: st_global summed over CPUs; ``depths``: st_depths."""
        g = Globals(anon_vmas=max(0, sums[G_AVS]), anon_vma_chains=max(0, sums[G_CHAINS]),
                    orphaned_anon_vmas=max(0, sums[G_ORPHANS]), anomalies=sums[G_ANOMALIES])
        g.events = {name: sums[G_EVENTS + i] for i, name in enumerate(PROBE_NAMES)}
        g.map_full = {name: sums[G_FULL + i] for i, name in enumerate(MAP_NAMES)}
        g.learned_depths = {d: n for d, n in enumerate(depths) if n}
        return g

    @property
    def map_full_total(self) -> int:
        return sum(self.map_full.values())


@dataclass
class StateDump:
    """The raw contents of the state maps (keys as ints, values as bytes)."""

    mms: dict[int, bytes]
    procs: dict[int, bytes]
    families: dict[int, bytes]
    global_sums: list[int]
    depths: list[int]


class DecodeCache:
    """The rows of the last decode, by key, with a hash of the bytes each
    came from, so that the next decode reuses the rows of entries that did
    not change. At 10,000 mostly idle processes decoding every entry again
    was most of `serve`'s refresh time (about 50 of its 70 ms a second).
    A hash, not the bytes: those would hold two kilobytes per process. Two
    values of one entry with the same 64-bit hash would keep the older row:
    about one chance in 2**64 per changed entry."""

    def __init__(self) -> None:
        self.mms: dict[int, tuple[int, MmRow]] = {}
        # pid -> (hash, row, the mm row its figures came from)
        self.procs: dict[int, tuple[int, ProcRow, MmRow | None]] = {}
        self.families: dict[int, tuple[int, FamilyState]] = {}


_Row = TypeVar("_Row")


def reuse_rows(entries: Iterable[tuple[int, bytes]], old: dict[int, tuple[int, _Row]],
               decode: Callable[[int, bytes], _Row]
               ) -> tuple[dict[int, _Row], dict[int, tuple[int, _Row]]]:
    """Decode ``entries`` (key, raw value), keeping the row of ``old`` (a
    :class:`DecodeCache` dict) for a value that did not change; returns the
    rows and what the cache keeps next."""
    rows: dict[int, _Row] = {}
    kept: dict[int, tuple[int, _Row]] = {}
    for key, value in entries:
        h = hash(value)
        hit = old.get(key)
        row = hit[1] if hit is not None and hit[0] == h else decode(key, value)
        rows[key] = row
        kept[key] = (h, row)
    return rows, kept


def reuse_procs(entries: Iterable[tuple[int, bytes]], mms: dict[int, MmRow],
                old: dict[int, tuple[int, ProcRow, MmRow | None]]
                ) -> tuple[dict[int, ProcRow], dict[int, tuple[int, ProcRow, MmRow | None]]]:
    """:func:`decode_proc` with reuse (see :func:`reuse_rows`): a process's
    row is kept when its bytes and the row of its mm (the same object when
    unchanged) are."""
    rows: dict[int, ProcRow] = {}
    kept: dict[int, tuple[int, ProcRow, MmRow | None]] = {}
    for pid, value in entries:
        h = hash(value)
        hit = old.get(pid)
        if hit is not None and hit[0] == h and hit[2] is mms.get(hit[1].mm):
            row = hit[1]
        else:
            row = decode_proc(pid, value, mms)
        rows[pid] = row
        kept[pid] = (h, row, mms.get(row.mm))
    return rows, kept


def decode_entries(mms: Iterable[tuple[int, bytes]], procs: Iterable[tuple[int, bytes]],
                   families: Iterable[tuple[int, bytes]], cache: DecodeCache
                   ) -> tuple[dict[int, MmRow], dict[int, ProcRow], dict[int, FamilyState]]:
    """The mm, process and family rows of the state maps' entries (key, raw
    value), taken in that order (entries may be read lazily, one map after
    the other) and through ``cache``; what the cache keeps next is set."""
    mm_rows, cache.mms = reuse_rows(mms, cache.mms, MmRow.decode)
    proc_rows, cache.procs = reuse_procs(procs, mm_rows, cache.procs)
    fam_rows, cache.families = reuse_rows(families, cache.families, FamilyState.decode)
    return mm_rows, proc_rows, fam_rows


@dataclass
class KernelState:
    """Everything the reports need, decoded from one :class:`StateDump`."""

    mms: dict[int, MmRow]
    processes: dict[int, ProcRow]
    families: dict[int, FamilyState]
    globals: Globals

    @staticmethod
    def decode(dump: StateDump, cache: DecodeCache | None = None) -> KernelState:
        """Decode ``dump``; with ``cache`` (kept from the last decode of
        the same maps) unchanged entries keep their rows."""
        mms, procs, fams = decode_entries(dump.mms.items(), dump.procs.items(),
                                          dump.families.items(), cache or DecodeCache())
        return KernelState(mms, procs, fams, Globals.from_sums(dump.global_sums, dump.depths))

    def totals(self) -> dict[str, int]:
        g = self.globals
        return {"anon_vmas": g.anon_vmas, "anon_vma_chains": g.anon_vma_chains,
                "orphaned_anon_vmas": g.orphaned_anon_vmas}

    def partial_reasons(self, lost: int = 0) -> list[str]:
        """Why the figures may be incomplete (empty: exact), as
        :attr:`tracer.model.hierarchy.Model.partial_reasons` words them."""
        out = []
        if lost:
            out.append(f"{lost} events lost: figures may be stale or missing until later "
                       "events repair them")
        g = self.globals
        if g.map_full_total:
            full = ", ".join(f"{k} {v}" for k, v in g.map_full.items() if v)
            out.append(f"state maps full ({full}): what did not fit is missing until a census")
        if g.anomalies:
            out.append(f"{g.anomalies} state anomalies (a free or an exit the programs did "
                       "not see)")
        if any(p.unseen for p in self.processes.values()):
            out.append(PREEXISTING_REASON)
        return out
