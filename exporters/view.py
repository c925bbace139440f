"""What `anontrace serve` exports, computed from the model: totals, the
top-K processes and the top-K families.

Pure Python over :class:`tracer.model.hierarchy.Model` (no BPF, no HTTP), so it runs on
recorded event streams in the unit tests. Series stay bounded: only the top-K
processes and families get labelled series, whatever comes and goes.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from tracer.format.events import safe_comm
from tracer.kernel.kstate import KernelState, ProcRow
from tracer.model.hierarchy import Model
from tracer.model.rmap import RmapFigures, RmapSummary
from tracer.model.types import Process


@dataclass(frozen=True, slots=True)
class ProcessRow:
    pid: int
    comm: str
    anon_vmas: int
    anon_vma_chains: int
    max_depth: int
    max_degree: int
    alive: bool
    # At the last rmap census; None when none ran or the process exited.
    rmap_max_width: int | None = None
    rmap_links: int | None = None


@dataclass(frozen=True, slots=True)
class FamilyRow:
    family: str          # the pid that created the root anon_vmas
    comm: str
    anon_vmas: int
    orphaned_anon_vmas: int
    max_depth: int
    rmap_max_width: int | None = None
    rmap_links: int | None = None


@dataclass
class Snapshot:
    """One scrape's worth of figures."""

    anon_vmas: int = 0
    anon_vma_chains: int = 0
    orphaned_anon_vmas: int = 0
    tracked_processes: int = 0
    processes: list[ProcessRow] = field(default_factory=list)
    families: list[FamilyRow] = field(default_factory=list)
    learned_depths: dict[int, int] = field(default_factory=dict)
    rmap: RmapSummary | None = None    # the last rmap census's figures, if any
    rmap_time: float = 0.0             # when it ran (Unix time)



class Named(Protocol):
    """What selection looks at: a live process (tracer.model.hierarchy.Process) or a
    row read from the state maps (tracer.kernel.kstate.ProcRow)."""

    @property
    def pid(self) -> int: ...
    @property
    def comm(self) -> str: ...

class TopView:
    """Ranks processes and families for export.

    Exited processes stay eligible for ``expiry_s`` seconds with their
    figures at exit, so a short-lived offender still shows; then they go.
    ``eligible`` (the config's comm regex and cgroup selection) decides which
    processes may get per-process series; families are named after the
    process that created their roots.
    """

    def __init__(self, top_k: int, expiry_s: float,
                 eligible: Callable[[Named], bool] = lambda p: True) -> None:
        self.top_k = top_k
        self.expiry_s = expiry_s
        self.eligible = eligible
        # pid -> (exit time, figures at exit): rows only, so an exited
        # process's address space is not kept alive here.
        self._exited: dict[int, tuple[float, ProcessRow]] = {}
        # (root anon_vma pointer, creation serial) -> (pid, comm) of its
        # creator, kept while the root lives: the creator may exit long
        # before its descendants, and the slab reuses root pointers.
        self._root_owner: dict[tuple[int, int], tuple[int, str]] = {}
        self._comms: dict[int, str] = {}
        self._families: list[FamilyRow] = []

    def reset_owners(self) -> None:
        """The model was rebuilt: its anon_vma serials start again."""
        self._root_owner.clear()

    def note_exited(self, procs: list[Process], now: float) -> None:
        """Processes that exited at ``now`` (monotonic seconds)."""
        for p in procs:
            self._comms[p.pid] = p.comm
            f = p.at_exit
            if f is not None and f.anon_vmas and self.eligible(p):
                self._exited[p.pid] = (now, ProcessRow(p.pid, safe_comm(p.comm), f.anon_vmas,
                                                       f.anon_vma_chains, f.max_depth,
                                                       f.max_degree, False))
        if len(self._exited) > 4 * self.top_k + 64:
            # A fork storm retires thousands a second: only the best can
            # ever be exported (the top-K of all is within the top-K of the
            # live plus the top-K of the exited), so keep twice K of them.
            best = heapq.nlargest(2 * self.top_k, self._exited.items(),
                                  key=lambda kv: (kv[1][1].anon_vmas, kv[1][1].max_depth,
                                                  kv[1][0]))
            self._exited = dict(best)

    def _expire(self, now: float, live: Collection[int]) -> None:
        cutoff = now - self.expiry_s
        # A live process with the same pid (reused) replaces the exited one.
        for pid in [pid for pid, (t, _) in self._exited.items() if t < cutoff or pid in live]:
            del self._exited[pid]

    def refresh_families(self, model: Model) -> None:
        """Recompute the top-K families (a pass over every live anon_vma:
        tens of ms at 100,000 of them), for snapshots that do not."""
        self._families = self._top_families(model)

    def snapshot(self, model: Model, now: float, families: bool = True) -> Snapshot:
        """The figures to export now (``now``: monotonic seconds). With
        ``families`` False the families of the last :meth:`refresh_families`
        are used: `serve` refreshes them from its event loop every two
        seconds so that a scrape never pays for that pass."""
        live = model.processes
        self._expire(now, live)
        snap = Snapshot(tracked_processes=len(live),
                        learned_depths=dict(model.learned_depths))
        snap.anon_vmas = len(model.anon_vmas)
        snap.anon_vma_chains = model.anon_vma_chain_count()
        snap.processes = self._top_processes(model)
        snap.orphaned_anon_vmas = model.orphaned_count()
        if families:
            self.refresh_families(model)
        snap.families = self._families
        return snap

    def note_exited_rows(self, rows: list[ProcRow], now: float) -> None:
        """Exited processes read from the state maps (see :meth:`note_exited`)."""
        for r in rows:
            self._comms[r.pid] = r.comm
        cands = [r for r in rows if r.figures.anon_vmas and self.eligible(r)]
        if len(cands) > 4 * self.top_k + 64:
            # A storm's thousands: only the best 2K could be kept (note_exited).
            cands = heapq.nlargest(2 * self.top_k, cands,
                                   key=lambda r: (r.figures.anon_vmas, r.figures.max_depth))
        for r in cands:
            f = r.figures
            self._exited[r.pid] = (now, ProcessRow(r.pid, safe_comm(r.comm), f.anon_vmas,
                                                   f.anon_vma_chains, f.max_depth,
                                                   f.max_degree, False))
        self.note_exited([], now)   # bound what is kept

    def snapshot_state(self, state: KernelState, now: float,
                       rmap: RmapSummary | None = None, rmap_time: float = 0.0) -> Snapshot:
        """The figures to export from the state maps (tracer.kernel.kstate): the
        same ranking, expiry and bounds as :meth:`snapshot`; the rmap widths
        of the live rows from ``rmap``, the last rmap census."""
        live = {pid: r for pid, r in state.processes.items() if r.alive}
        self._expire(now, live)
        g = state.globals
        snap = Snapshot(tracked_processes=len(live), learned_depths=dict(g.learned_depths),
                        anon_vmas=g.anon_vmas, anon_vma_chains=g.anon_vma_chains,
                        orphaned_anon_vmas=g.orphaned_anon_vmas)
        for r in live.values():
            self._comms[r.pid] = r.comm
        cands = heapq.nlargest(self.top_k, (r for r in live.values()
                                            if r.figures.anon_vmas and self.eligible(r)),
                               key=lambda r: (r.figures.anon_vmas, r.figures.max_depth, -r.pid))
        prm = rmap.processes if rmap is not None else {}
        rows = [ProcessRow(r.pid, safe_comm(r.comm), r.figures.anon_vmas,
                           r.figures.anon_vma_chains, r.figures.max_depth,
                           r.figures.max_degree, True, *_widths(prm, r.pid, rmap))
                for r in cands]
        rows.extend(row for _, row in self._exited.values())
        rows.sort(key=lambda r: (-r.anon_vmas, -r.max_depth, r.pid))
        snap.processes = rows[:self.top_k]
        fams = [f for f in state.families.values() if f.pid and f.anon_vmas]
        best = heapq.nlargest(self.top_k, fams,
                              key=lambda f: (f.anon_vmas, f.max_depth, -f.pid))
        frm = rmap.families if rmap is not None else {}
        snap.families = [FamilyRow(str(f.pid), safe_comm(self._comms.get(f.pid, "")),
                                   f.anon_vmas, f.orphaned_anon_vmas, f.max_depth,
                                   *_widths(frm, f.pid, rmap))
                         for f in best]
        snap.rmap, snap.rmap_time = rmap, rmap_time
        if len(self._comms) > len(live) + 4096:
            keep = set(live) | set(self._exited) | {f.pid for f in fams}
            self._comms = {pid: c for pid, c in self._comms.items() if pid in keep}
        self._families = snap.families
        return snap

    def _top_processes(self, model: Model) -> list[ProcessRow]:
        # Rank by tracked VMAs (a cheap stand-in for anon_vmas: every tracked
        # VMA is anonymous), then compute exact figures for a few more than K.
        def size(p: Process) -> int:
            return len(p.mm.vmas) if p.mm is not None else 0

        cands = heapq.nlargest(self.top_k * 2, (p for p in model.processes.values()
                                                if p.mm is not None and p.mm.vmas
                                                and self.eligible(p)), key=size)
        rows = []
        for p in cands:
            f = model.figures(p)
            rows.append(ProcessRow(p.pid, safe_comm(p.comm), f.anon_vmas, f.anon_vma_chains,
                                   f.max_depth, f.max_degree, True))
        rows.extend(row for _, row in self._exited.values())
        rows.sort(key=lambda r: (-r.anon_vmas, -r.max_depth, r.pid))
        return rows[:self.top_k]

    def _owner(self, model: Model, key: tuple[int, int], pid: int) -> tuple[int, str] | None:
        known = self._root_owner.get(key)
        if known is not None:
            return known
        if not pid:
            return None
        proc = model.processes.get(pid)
        comm = proc.comm if proc is not None else self._comms.get(pid, "")
        owner = self._root_owner[key] = (pid, comm)
        return owner

    def _top_families(self, model: Model) -> list[FamilyRow]:
        fams = model.families()
        by_owner: dict[tuple[int, str], list[int]] = {}
        live: set[tuple[int, int]] = set()
        for root, (n, orph, depth, pid, serial) in fams.items():
            if not root or serial < 0:
                continue    # root not tracked: no creator to name the family by
            key = (root, serial)
            live.add(key)
            owner = self._owner(model, key, pid)
            if owner is None:
                continue
            agg = by_owner.get(owner)
            if agg is None:
                by_owner[owner] = [n, orph, depth]
            else:
                agg[0] += n
                agg[1] += orph
                agg[2] = max(agg[2], depth)
        # Forget owners of roots that are gone (bounded memory).
        if len(self._root_owner) > len(live):
            self._root_owner = {k: o for k, o in self._root_owner.items() if k in live}
        if len(self._comms) > len(model.processes) + 4096:
            self._comms = {pid: c for pid, c in self._comms.items() if pid in self._exited}
        best = heapq.nlargest(self.top_k, by_owner.items(),
                              key=lambda kv: (kv[1][0], kv[1][2], -kv[0][0]))
        rows = [FamilyRow(str(pid), safe_comm(comm), n, orph, depth)
                for (pid, comm), (n, orph, depth) in best]
        return rows


def _widths(figures: dict[int, RmapFigures], pid: int, rmap: RmapSummary | None
            ) -> tuple[int | None, int | None]:
    """(max width, links) of ``pid`` in the last census; Nones when no
    census ran or it did not see ``pid`` (started since)."""
    f = figures.get(pid) if rmap is not None else None
    return (f.max_width, f.total_width) if f is not None else (None, None)
