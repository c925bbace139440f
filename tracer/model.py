"""The anon_vma hierarchy rebuilt from events: pure Python, no BPF.

It runs the same on a live stream and on a recording. Kernel pointers key
everything; processes are learned from fork/exec events and from the mm of
events that fire in a process's own context (fork runs in the parent before
the child has a pid: KERNEL-NOTES section 4).

Lost or missing events never crash it or drive a count negative: the state is
marked partial, with the reason, and later events overwrite stale records
(pointer reuse, PID reuse, a missed free).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from tracer.events import F_THREAD, LOGICAL_KINDS, Event, Kind

MAX_RETIRED = 100_000  # exited processes kept for the final report
PROBE_INDEX = {kind: i for i, kind in enumerate(LOGICAL_KINDS)}
PROBE_NAMES = tuple(LOGICAL_KINDS.values())


class AnonVma:
    """A live anon_vma. ``parent``/``root`` are objects when known, else the
    raw pointer (an ancestor allocated before tracing began), else None."""

    __slots__ = ("ptr", "parent", "root", "depth", "children", "active", "mm")

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.parent: AnonVma | int | None = None
        self.root: AnonVma | int | None = None
        self.depth = 0          # 0: not known yet
        self.children = 0       # live child anon_vmas (the root's self-link excluded)
        self.active = 0         # VMAs whose vma->anon_vma is this one
        self.mm: Mm | None = None  # the mm it was created for


class Vma:
    """A VMA that has (or had) an anon_vma."""

    __slots__ = ("ptr", "mm", "start", "end", "anon_vma", "chain")

    def __init__(self, ptr: int, mm: "Mm") -> None:
        self.ptr = ptr
        self.mm = mm
        self.start = 0
        self.end = 0
        self.anon_vma: AnonVma | None = None
        self.chain = 0


class Mm:
    """An address space, its VMAs and the probe events attributed to it."""

    __slots__ = ("ptr", "tgid", "vmas", "events")

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.tgid = 0
        self.vmas: dict[int, Vma] = {}
        self.events = [0, 0, 0, 0]


@dataclass
class Process:
    """A traced process (tgid)."""

    pid: int
    ppid: int = 0
    comm: str = ""
    alive: bool = True
    mm: Mm | None = None
    mms: list[Mm] = field(default_factory=list)
    preexisting: bool = False   # running before tracing began: its state is partial
    exited_ts: int = 0
    at_exit: "ProcessFigures | None" = None  # figures when its exit was seen


@dataclass(frozen=True)
class ProcessFigures:
    """The per-process figures (README "Definitions")."""

    anon_vmas: int
    anon_vma_chains: int
    max_depth: int
    max_degree: int
    max_chain: int
    events: dict[str, int]


class Model:
    """Apply events with :meth:`apply`; read figures with :meth:`figures`,
    :meth:`totals` and :attr:`processes`."""

    def __init__(self, ppid_of: Callable[[int], int] | None = None) -> None:
        self.anon_vmas: dict[int, AnonVma] = {}
        self.vmas: dict[int, Vma] = {}
        self.mms: dict[int, Mm] = {}
        self.processes: dict[int, Process] = {}
        self.exited: list[Process] = []   # left the process table since the last report
        self.retired: list[Process] = []  # every exited process, for the final report
        self.retired_dropped = 0
        self._reasons: set[str] = set()
        self.lost_events = 0
        self.events_applied = 0
        self.anomalies = 0
        self._ppid_of = ppid_of or (lambda pid: 0)
        self._dispatch: dict[Kind, Callable[[Event], None]] = {
            Kind.ANON_VMA_FORK: self._vma_event,
            Kind.ANON_VMA_CLONE: self._vma_event,
            Kind.PAGE_SET_ANON_RMAP: self._vma_event,
            Kind.UNLINK_ANON_VMAS: self._unlink,
            Kind.AV_ALLOC: self._av_alloc,
            Kind.AV_FREE: self._av_free,
            Kind.AVC_ALLOC: self._avc_alloc,
            Kind.AVC_FREE: self._ignore,
            Kind.PROC_FORK: self._proc_fork,
            Kind.PROC_EXEC: self._proc_exec,
            Kind.PROC_EXIT: self._proc_exit,
            Kind.SYNC: self._ignore,
        }

    # -- input ------------------------------------------------------------
    def add_process(self, pid: int, comm: str, ppid: int = 0, preexisting: bool = False
                    ) -> Process:
        """Declare a process before its events arrive (the traced COMMAND, or
        -p PIDs that were already running)."""
        proc = self.processes[pid] = Process(pid, ppid or self._ppid_of(pid), comm,
                                             preexisting=preexisting)
        if preexisting:
            self._reasons.add(
                "processes running before tracing began: anon_vmas of their VMAs that no "
                "event touched since are unknown")
        return proc

    def apply(self, ev: Event) -> None:
        """Apply one event (any order, any validity: never raises on data)."""
        self.events_applied += 1
        self._dispatch[ev.kind](ev)

    def apply_all(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.apply(ev)

    def add_reason(self, reason: str) -> None:
        """Mark the state partial for a reason found outside the event stream."""
        self._reasons.add(reason)

    def note_lost(self, total: int) -> None:
        """The kernel counted ``total`` lost events so far."""
        self.lost_events = total

    @property
    def partial_reasons(self) -> list[str]:
        """Why the figures may be incomplete; empty when they are exact."""
        out = sorted(self._reasons)
        if self.lost_events:
            out.insert(0, f"{self.lost_events} events lost: figures may be stale or "
                       "missing until later events repair them")
        return out

    @property
    def partial(self) -> bool:
        return bool(self._reasons) or self.lost_events > 0

    # -- objects ----------------------------------------------------------
    def _mm(self, ptr: int) -> Mm:
        mm = self.mms.get(ptr)
        if mm is None:
            mm = self.mms[ptr] = Mm(ptr)
        return mm

    def _process(self, tgid: int, comm: str) -> Process:
        proc = self.processes.get(tgid)
        if proc is None:
            # First seen mid-life: it existed before tracing began, or its
            # fork event was lost.
            proc = self.processes[tgid] = Process(tgid, self._ppid_of(tgid), comm,
                                                  preexisting=True)
            self._reasons.add(
                "processes running before tracing began: anon_vmas of their VMAs that no "
                "event touched since are unknown")
        return proc

    def _own(self, mm: Mm, tgid: int, comm: str) -> None:
        """Record that ``mm`` belongs to process ``tgid``."""
        if mm.tgid == tgid:
            proc = self.processes.get(tgid)
            # Done unless a later exec got this (recycled) mm pointer back.
            if proc is None or proc.mm is mm:
                return
        mm.tgid = tgid
        proc = self._process(tgid, comm)
        if proc.mm is not mm:
            proc.mm = mm
            if mm not in proc.mms:
                proc.mms.append(mm)

    def _anon_vma(self, ev: Event, mm: Mm | None) -> AnonVma:
        """The anon_vma an event's facts describe, created or refreshed."""
        ptr = ev.anon_vma
        av = self.anon_vmas.get(ptr)
        parent_ptr = ev.parent
        if av is not None and av.depth and ev.depth and av.depth != ev.depth:
            # Same pointer, another object: its free was lost (slab reuse).
            self.anomalies += 1
            self._reasons.add("an anon_vma free was missed (pointer reused)")
            self._drop_av(av)
            av = None
        if av is None:
            av = self.anon_vmas[ptr] = AnonVma(ptr)
        if av.mm is None:
            av.mm = mm
        if not av.depth and ev.depth:
            av.depth = ev.depth
            if parent_ptr and parent_ptr != ptr:
                parent = self.anon_vmas.get(parent_ptr)
                if parent is not None:
                    parent.children += 1
                    av.parent = parent
                else:
                    av.parent = parent_ptr
            root = self.anon_vmas.get(ev.root)
            av.root = root if root is not None else (ev.root or None)
        return av

    def _drop_av(self, av: AnonVma) -> None:
        if self.anon_vmas.get(av.ptr) is av:
            del self.anon_vmas[av.ptr]
        parent = av.parent
        if isinstance(parent, AnonVma) and parent.children > 0:
            parent.children -= 1
        if av.active:
            # VMAs still point at it: a teardown event was lost. Detach them.
            self.anomalies += 1
            for vma in self.vmas.values():
                if vma.anon_vma is av:
                    vma.anon_vma = None
            av.active = 0

    # -- handlers ---------------------------------------------------------
    def _ignore(self, ev: Event) -> None:
        pass

    def _vma_event(self, ev: Event) -> None:
        self._learn_vma(ev)
        idx = PROBE_INDEX[ev.kind]
        if ev.mm:
            self._mm(ev.mm).events[idx] += 1

    def _avc_alloc(self, ev: Event) -> None:
        # Derived (tracepoint) backend: the chain entry's VMA, read once the
        # operation finished. Other backends carry only the pointer.
        if ev.vma and ev.mm:
            self._learn_vma(ev)

    def _learn_vma(self, ev: Event) -> None:
        if not ev.vma or not ev.mm:
            return
        mm = self._mm(ev.mm)
        if ev.cur_mm == ev.mm and ev.tgid:
            self._own(mm, ev.tgid, ev.comm)
        vma = self.vmas.get(ev.vma)
        if vma is not None and vma.mm is not mm:
            # The VMA pointer was freed and reused by another mm.
            self._forget_vma(vma)
            vma = None
        if vma is None:
            vma = self.vmas[ev.vma] = Vma(ev.vma, mm)
            mm.vmas[ev.vma] = vma
        vma.start, vma.end, vma.chain = ev.vm_start, ev.vm_end, ev.chain_len
        av = self._anon_vma(ev, mm) if ev.anon_vma else None
        if vma.anon_vma is not av:
            if vma.anon_vma is not None and vma.anon_vma.active > 0:
                vma.anon_vma.active -= 1
            if av is not None:
                av.active += 1
            vma.anon_vma = av

    def _forget_vma(self, vma: Vma) -> None:
        self.vmas.pop(vma.ptr, None)
        vma.mm.vmas.pop(vma.ptr, None)
        if vma.anon_vma is not None and vma.anon_vma.active > 0:
            vma.anon_vma.active -= 1
        vma.anon_vma = None

    def _unlink(self, ev: Event) -> None:
        if ev.mm:
            self._mm(ev.mm).events[PROBE_INDEX[Kind.UNLINK_ANON_VMAS]] += 1
        vma = self.vmas.get(ev.vma)
        if vma is not None:
            self._forget_vma(vma)

    def _av_alloc(self, ev: Event) -> None:
        if not ev.anon_vma:
            return
        old = self.anon_vmas.get(ev.anon_vma)
        if old is not None:
            # Allocated again while we think it lives: its free was missed
            # (e.g. freed by an untraced task).
            self.anomalies += 1
            self._reasons.add("an anon_vma free was missed (pointer reused)")
            self._drop_av(old)
        # The mm it is created for is the VMA's, learned with the VMA: a
        # fork allocates in the parent's context (KERNEL-NOTES section 4).
        if ev.depth:
            self._anon_vma(ev, None)   # derived backend: facts already read
        else:
            self.anon_vmas[ev.anon_vma] = AnonVma(ev.anon_vma)

    def _av_free(self, ev: Event) -> None:
        av = self.anon_vmas.get(ev.anon_vma)
        if av is not None:
            self._drop_av(av)

    def _proc_fork(self, ev: Event) -> None:
        if ev.flags & F_THREAD:
            return
        old = self.processes.get(ev.pid2)
        if old is not None:
            # PID reuse: the old holder's exit was not seen.
            self._retire(old, ev.ts)
        proc = self.processes[ev.pid2] = Process(ev.pid2, ev.tgid, ev.comm)
        self._process(ev.tgid, ev.comm)  # the parent, if first seen here
        if ev.mm:
            mm = self._mm(ev.mm)
            mm.tgid = ev.pid2
            proc.mm = mm
            proc.mms.append(mm)

    def _proc_exec(self, ev: Event) -> None:
        proc = self._process(ev.tgid, ev.comm)
        proc.comm = ev.comm
        if ev.mm:
            self._own(self._mm(ev.mm), ev.tgid, ev.comm)

    def _proc_exit(self, ev: Event) -> None:
        if ev.flags & F_THREAD:
            return
        proc = self.processes.get(ev.tgid)
        if proc is not None and proc.alive:
            self._retire(proc, ev.ts)

    def _retire(self, proc: Process, ts: int) -> None:
        # Since v6.16 the exit tracepoint precedes exit_mm(), so the figures
        # are still there; on older kernels the mm is already torn down.
        proc.at_exit = self.figures(proc)
        proc.alive = False
        proc.exited_ts = ts
        if self.processes.get(proc.pid) is proc:
            del self.processes[proc.pid]
        self.exited.append(proc)
        if len(self.retired) < MAX_RETIRED:
            self.retired.append(proc)
        else:
            self.retired_dropped += 1

    # -- output -----------------------------------------------------------
    def figures(self, proc: Process) -> ProcessFigures:
        """The README's per-process figures, from the process's current mm
        (for an exited process, as they were when its exit was seen)."""
        if not proc.alive and proc.at_exit is not None:
            return proc.at_exit
        vmas = list(proc.mm.vmas.values()) if proc.mm is not None else []
        avs = {id(v.anon_vma): v.anon_vma for v in vmas if v.anon_vma is not None}
        events = [0, 0, 0, 0]
        for mm in proc.mms:
            for i, n in enumerate(mm.events):
                events[i] += n
        return ProcessFigures(
            anon_vmas=len(avs),
            anon_vma_chains=sum(v.chain for v in vmas),
            max_depth=max((a.depth for a in avs.values()), default=0),
            max_degree=max((a.children for a in avs.values()), default=0),
            max_chain=max((v.chain for v in vmas), default=0),
            events=dict(zip(PROBE_NAMES, events)))

    def totals(self) -> dict[str, int]:
        """System (traced-scope) totals."""
        return {
            "anon_vmas": len(self.anon_vmas),
            "anon_vma_chains": sum(v.chain for v in self.vmas.values()),
            "orphaned_anon_vmas": sum(1 for a in self.anon_vmas.values() if a.active == 0),
        }

    def take_exited(self) -> list[Process]:
        """Processes that exited since the last call (for interval reports)."""
        out, self.exited = self.exited, []
        return out

    def forget_mm_if_dead(self) -> None:
        """Drop mms with no VMAs and no live owner (bounded memory)."""
        live = {p.mm.ptr for p in self.processes.values() if p.mm is not None}
        for ptr in [p for p, mm in self.mms.items() if not mm.vmas and p not in live]:
            del self.mms[ptr]
