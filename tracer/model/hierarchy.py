"""The anon_vma hierarchy rebuilt from events: pure Python, no BPF.

It runs the same on a live stream and on a recording. Kernel pointers key
everything; processes are learned from fork/exec events and from the mm of
events that fire in a process's own context (fork runs in the parent before
the child has a pid: docs/kernels.md, "The fork attribution trap").

Lost or missing events never crash it or drive a count negative: the state is
marked partial, with the reason, and later events overwrite stale records
(pointer reuse, PID reuse, a missed free).

Storage (about 235 bytes per live anon_vma with its VMA, see
bench/model_memory.py): no object per anon_vma or per VMA.

* anon_vmas: a dict anon_vma pointer -> int whose low 32 bits are a small id,
  and ``array`` columns indexed by id (pointer, parent and root pointers, the
  mm it was created for, depth, live children, active VMAs, creation serial,
  whether the parent is linked). Ids of freed anon_vmas are reused.
* VMAs: per mm, a dict VMA pointer -> one packed int, ``id | chain << 32``
  (id ``NO_AV`` when the VMA has no anon_vma). When an event creates (or
  first learns) an anon_vma, the anon_vmas dict keeps the very int object its
  VMA entry holds, so the common one-VMA anon_vma pays for one int.
* Dict keys are the pointers decoded from the events (no copies).

Read it through :meth:`Model.anon_vma_info`, :attr:`Model.anon_vmas`,
:meth:`Model.vma_info`, :meth:`Model.mm_vmas` and :attr:`Model.vmas`.
VMA pointers are looked up in the event's mm only: a VMA pointer reused by
another mm while its unlink_anon_vmas event was lost stays, stale, in the old
mm until that mm goes (only after lost events, which already mark the state
partial).
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable

from tracer.format.events import F_THREAD, Event, Kind
from tracer.model.queries import ModelQueries
from tracer.model.types import (
    AV_ID,
    CHAIN_SHIFT,
    MAX_RETIRED,
    NO_AV,
    PROBE_INDEX,
    Mm,
    Process,
)

_REUSED = "an anon_vma free was missed (pointer reused)"
_PREEXISTING = ("processes running before tracing began: anon_vmas of their VMAs that no "
                "event touched since are unknown")


class Model(ModelQueries):
    """Apply events with :meth:`apply`; read figures with :meth:`figures`,
    :meth:`totals` and :attr:`processes`."""

    def __init__(self, ppid_of: Callable[[int], int] | None = None,
                 keep_retired: bool = True) -> None:
        self._avs: dict[int, int] = {}   # anon_vma pointer -> packed (low bits: id)
        # columns, indexed by anon_vma id
        self._ptr = array("Q")
        self._parent = array("Q")
        self._root = array("Q")
        self._avmm = array("Q")
        self._depth = array("I")
        self._children = array("I")
        self._active = array("I")
        self._serial = array("I")
        self._plink = array("B")
        self._free: list[int] = []       # ids of freed anon_vmas
        self._serials = 0
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
        self.keep_retired = keep_retired
        self.chains = 0                  # anon_vma_chain entries on tracked VMAs
        # anon_vmas first learned from a live event (not a census), by depth
        self.learned_depths: dict[int, int] = {}
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
            Kind.CENSUS_VMA: self._census,
        }
        for kind in Kind:   # kinds the model has no use for (never raise on data)
            self._dispatch.setdefault(kind, self._ignore)

    # -- input ------------------------------------------------------------
    def add_process(self, pid: int, comm: str, ppid: int = 0, preexisting: bool = False
                    ) -> Process:
        """Declare a process before its events arrive (the traced COMMAND, or
        -p PIDs that were already running)."""
        proc = self.processes[pid] = Process(pid, ppid or self._ppid_of(pid), comm,
                                             preexisting=preexisting)
        if preexisting:
            self._reasons.add(_PREEXISTING)
        return proc

    def apply(self, ev: Event) -> None:
        """Apply one event (any order, any validity: never raises on data)."""
        self.events_applied += 1
        self._dispatch[ev.kind](ev)

    def apply_all(self, events: Iterable[Event]) -> None:
        """Apply events in order (faster than :meth:`apply` one by one)."""
        dispatch = self._dispatch
        n = 0
        try:
            for ev in events:
                n += 1
                dispatch[ev.kind](ev)
        finally:
            self.events_applied += n

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
            self._reasons.add(_PREEXISTING)
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
            self._set_mm(proc, mm)
            if mm not in proc.mms:
                proc.mms.append(mm)

    def _new_av(self, ptr: int) -> int:
        """A fresh anon_vma record (all columns zero but ptr and serial)."""
        if self._free:
            i = self._free.pop()
            self._ptr[i] = ptr
            self._serial[i] = self._serials
        else:
            i = len(self._ptr)
            self._ptr.append(ptr)
            self._serial.append(self._serials)
            for col in (self._parent, self._root, self._avmm, self._depth, self._children,
                        self._active, self._plink):
                col.append(0)
        self._serials = (self._serials + 1) & AV_ID
        self._avs[ptr] = i
        return i

    def _learn_av(self, ev: Event, mm_ptr: int, chain: int) -> int:
        """The anon_vma an event's facts describe, created or refreshed.
        Returns ``id | chain << 32``, the packed value of a VMA pointing at it
        (chain < 0: just the id)."""
        ptr = ev.anon_vma
        d = ev.depth
        v = self._avs.get(ptr)
        depth = self._depth
        if v is not None:
            i = v & AV_ID
            if depth[i] and d and depth[i] != d:
                # Same pointer, another object: its free was lost (slab reuse).
                self.anomalies += 1
                self._reasons.add(_REUSED)
                self._drop_av(i)
                v = None
        share = v is None
        if v is None:
            i = self._new_av(ptr)
        if not self._avmm[i] and mm_ptr:
            self._avmm[i] = mm_ptr
            share = True          # its first VMA (after an AV_ALLOC)
        if not depth[i] and d:
            share = True
            depth[i] = d
            if ev.kind is not Kind.CENSUS_VMA:
                ld = self.learned_depths
                ld[d] = ld.get(d, 0) + 1
            parent_ptr = ev.parent
            if parent_ptr and parent_ptr != ptr:
                self._parent[i] = parent_ptr
                pv = self._avs.get(parent_ptr)
                if pv is not None:
                    self._children[pv & AV_ID] += 1
                    self._plink[i] = 1
            self._root[i] = ev.root
        if chain < 0:
            return i
        packed = i | chain << CHAIN_SHIFT
        if share:
            self._avs[ptr] = packed   # the same int object as the VMA's entry
        return packed

    def _drop_av(self, i: int) -> None:
        """Forget the anon_vma with id ``i`` (freed, or replaced)."""
        ptr = self._ptr[i]
        v = self._avs.get(ptr)
        if v is not None and v & AV_ID == i:
            del self._avs[ptr]
        if self._plink[i]:
            pv = self._avs.get(self._parent[i])
            if pv is not None and self._children[pv & AV_ID] > 0:
                self._children[pv & AV_ID] -= 1
        if self._children[i]:
            # Children outlive it: they keep its pointer, no longer linked (a
            # new anon_vma at this pointer is not their parent).
            n, j, parents, plink = self._children[i], 0, self._parent, self._plink
            while n:
                try:
                    j = parents.index(ptr, j)
                except ValueError:
                    break
                if plink[j] and j != i:
                    plink[j] = 0
                    n -= 1
                j += 1
        if self._active[i]:
            # VMAs still point at it: a teardown event was lost. Detach them.
            self.anomalies += 1
            self._detach_vmas(i)
        for col in (self._ptr, self._parent, self._root, self._avmm, self._depth,
                    self._children, self._active, self._plink):
            col[i] = 0
        self._free.append(i)

    def _detach_vmas(self, i: int) -> None:
        n = self._active[i]
        first = self.mms.get(self._avmm[i])
        mms = [first] if first is not None else []
        mms += [mm for mm in self.mms.values() if mm is not first]
        for mm in mms:
            vmas = mm.vmas
            for k, v in vmas.items():
                if v & AV_ID == i:
                    vmas[k] = NO_AV | (v >> CHAIN_SHIFT) << CHAIN_SHIFT
                    n -= 1
                    if not n:
                        break
            if not n:
                break
        self._active[i] = 0

    # -- handlers ---------------------------------------------------------
    def _ignore(self, ev: Event) -> None:
        pass

    def _vma_event(self, ev: Event) -> None:
        """anon_vma_fork, anon_vma_clone, page_set_anon_rmap: count the probe
        event for its mm and learn the VMA (see :meth:`_vma`, inlined here:
        these are most of the events)."""
        mm_ptr = ev.mm
        if not mm_ptr:
            return
        mm = self.mms.get(mm_ptr)
        if mm is None:
            mm = self.mms[mm_ptr] = Mm(mm_ptr)
        mm.events[PROBE_INDEX[ev.kind]] += 1
        vma = ev.vma
        if not vma:
            return
        tgid = ev.tgid
        if tgid and ev.cur_mm == mm_ptr:
            if mm.tgid != tgid:
                self._own(mm, tgid, ev.comm)
            else:
                proc = self.processes.get(tgid)
                if proc is not None:
                    if proc.mm is not mm:
                        self._own(mm, tgid, ev.comm)
                    elif proc.comm != ev.comm and ev.tid == tgid:
                        # Renamed (prctl PR_SET_NAME) since fork or exec; only
                        # the leader's name is the process's, not a thread's.
                        proc.comm = ev.comm
        chain = ev.chain_len
        av = ev.anon_vma
        if av:
            v = self._avs.get(av)
            if v is not None:
                i = v & AV_ID
                dd = self._depth[i]
                d = ev.depth
                if dd and (dd == d or not d) and self._avmm[i]:
                    new = i | chain << CHAIN_SHIFT      # known, consistent: the common case
                else:
                    new = self._learn_av(ev, mm_ptr, chain)
                    i = new & AV_ID
            else:
                new = self._learn_av(ev, mm_ptr, chain)
                i = new & AV_ID
        else:
            i = NO_AV
            new = NO_AV | chain << CHAIN_SHIFT
        self._store_vma(mm.vmas, vma, new, i)

    def _vma(self, ev: Event, mm: Mm) -> None:
        """Learn a VMA (and its anon_vma) from an event with mm and vma set."""
        if ev.cur_mm == mm.ptr:
            tgid = ev.tgid
            if tgid and mm.tgid != tgid:
                self._own(mm, tgid, ev.comm)
            elif tgid:
                proc = self.processes.get(tgid)
                if proc is not None:
                    if proc.mm is not mm:
                        self._own(mm, tgid, ev.comm)
                    elif proc.comm != ev.comm and ev.tid == tgid:
                        proc.comm = ev.comm    # renamed since fork or exec
        chain = ev.chain_len
        av = ev.anon_vma
        if av:
            v = self._avs.get(av)
            i = -1
            if v is not None:
                i = v & AV_ID
                dd = self._depth[i]
                d = ev.depth
                if not dd or (d and d != dd) or not self._avmm[i]:
                    i = -1
            if i < 0:
                new = self._learn_av(ev, mm.ptr, chain)
                i = new & AV_ID
            else:
                new = i | chain << CHAIN_SHIFT
        else:
            i = NO_AV
            new = NO_AV | chain << CHAIN_SHIFT
        # read after _learn_av: dropping a reused anon_vma detaches its VMAs
        self._store_vma(mm.vmas, ev.vma, new, i)

    def _store_vma(self, vmas: dict[int, int], key: int, new: int, i: int) -> None:
        """Point a VMA at anon_vma id ``i`` (packed value ``new``), moving the
        active-VMA count from the anon_vma it pointed at before."""
        old = vmas.get(key)
        if old is None:
            vmas[key] = new
            self.chains += new >> CHAIN_SHIFT
            if i != NO_AV:
                self._active[i] += 1
        elif old != new:
            vmas[key] = new
            self.chains += (new >> CHAIN_SHIFT) - (old >> CHAIN_SHIFT)
            j = old & AV_ID
            if j != i:
                active = self._active
                if j != NO_AV and active[j] > 0:
                    active[j] -= 1
                if i != NO_AV:
                    active[i] += 1

    def _census(self, ev: Event) -> None:
        if ev.vma:
            self._avc_alloc(ev)   # the same VMA facts, read by the iterator
        else:
            # The census of the processes running before tracing began is
            # complete: their VMAs are known.
            self._reasons.discard(_PREEXISTING)

    def _avc_alloc(self, ev: Event) -> None:
        # Derived (tracepoint) backend: the chain entry's VMA, read once the
        # operation finished. Other backends carry only the pointer.
        if ev.vma and ev.mm:
            self._vma(ev, self._mm(ev.mm))

    def _forget_vma(self, vmas: dict[int, int], key: int) -> bool:
        v = vmas.pop(key, None)
        if v is None:
            return False
        self.chains -= v >> CHAIN_SHIFT
        i = v & AV_ID
        if i != NO_AV and self._active[i] > 0:
            self._active[i] -= 1
        return True

    def _unlink(self, ev: Event) -> None:
        key = ev.vma
        if ev.mm:
            mm = self._mm(ev.mm)
            if not ev.cur_mm and ev.tgid:
                # exit_mm() cleared current->mm and tears the process's own
                # mm down; on kernels whose exit event follows exit_mm()
                # (docs/kernels.md, "Exit ordering") the exit event comes
                # only after that. Its figures are taken now, as of its exit.
                proc = self.processes.get(ev.tgid)
                if proc is not None and proc.alive and not proc.exiting and proc.mm is mm:
                    proc.at_exit = self.figures(proc)
                    proc.exiting = True
            mm.events[PROBE_INDEX[Kind.UNLINK_ANON_VMAS]] += 1
            if self._forget_vma(mm.vmas, key) and not mm.vmas:
                self._forget_mm_if_orphan(mm)
        elif ev.vma:
            # No mm (never seen from the BPF side): the VMA in any mm.
            for mm in self.mms.values():
                if self._forget_vma(mm.vmas, key):
                    break

    def _av_alloc(self, ev: Event) -> None:
        if not ev.anon_vma:
            return
        old = self._avs.get(ev.anon_vma)
        if old is not None:
            # Allocated again while we think it lives: its free was missed
            # (e.g. freed by an untraced task).
            self.anomalies += 1
            self._reasons.add(_REUSED)
            self._drop_av(old & AV_ID)
        # The mm it is created for is the VMA's, learned with the VMA: a
        # fork allocates in the parent's context (docs/kernels.md, "The fork attribution trap").
        if ev.depth:
            self._learn_av(ev, 0, -1)   # derived backend: facts already read
        else:
            self._new_av(ev.anon_vma)

    def _av_free(self, ev: Event) -> None:
        v = self._avs.get(ev.anon_vma)
        if v is not None:
            self._drop_av(v & AV_ID)

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
            self._set_mm(proc, mm)
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
            # The exit runs in the process's own context: its name now,
            # after any prctl(PR_SET_NAME) since fork or exec.
            if ev.comm:
                proc.comm = ev.comm
            self._retire(proc, ev.ts)

    @staticmethod
    def _set_mm(proc: Process, mm: Mm) -> None:
        if proc.mm is not None and proc.alive:
            proc.mm.users -= 1
        proc.mm = mm
        if proc.alive:
            mm.users += 1

    def _forget_mm_if_orphan(self, mm: Mm) -> None:
        """An mm with no VMAs left whose owner is gone (its teardown came
        after the exit event, where the exit event precedes exit_mm()): drop
        it now, not at the next sweep, so a fork storm's dead address spaces
        do not pile up."""
        if mm.users <= 0 and self.mms.get(mm.ptr) is mm:
            del self.mms[mm.ptr]

    def _retire(self, proc: Process, ts: int) -> None:
        # Where the exit tracepoint precedes exit_mm() the figures are still
        # there; where it follows, the mm is already torn down
        # (docs/kernels.md, "Exit ordering").
        proc.at_exit = self.figures(proc)
        if proc.alive and proc.mm is not None:
            proc.mm.users -= 1
        proc.alive = False
        proc.exited_ts = ts
        if self.processes.get(proc.pid) is proc:
            del self.processes[proc.pid]
        if proc.mm is not None and not proc.mm.vmas:
            # Torn down before its exit event (the older order): nothing left.
            self._forget_mm_if_orphan(proc.mm)
        self.exited.append(proc)
        if self.keep_retired:
            if len(self.retired) < MAX_RETIRED:
                self.retired.append(proc)
            else:
                self.retired_dropped += 1


    def take_exited(self) -> list[Process]:
        """Processes that exited since the last call (for interval reports)."""
        out, self.exited = self.exited, []
        return out

    def forget_mm_if_dead(self) -> None:
        """Drop mms with no VMAs and no live owner (bounded memory)."""
        live = {p.mm.ptr for p in self.processes.values() if p.mm is not None}
        for ptr in [p for p, mm in self.mms.items() if not mm.vmas and p not in live]:
            del self.mms[ptr]
