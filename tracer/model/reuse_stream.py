"""Events to VMA operations for the reuse what-if (tracer.model.reuse).

Feed :class:`ReuseReplay` the decoded events a replay feeds the model
(on the tracepoint backend, after tracer.pipeline.derive); it applies each
VMA operation they show to one :class:`~tracer.model.reuse.World` per rule:

* ``anon_vma_clone`` into the mm it runs in: a split, merge or ``mremap``
  copy of a source VMA;
* ``anon_vma_clone`` into another mm: the chain copy of a fork (the reuse
  decision), closed by the ``anon_vma_fork`` event of the same VMA;
* a first fault (``page_set_anon_rmap``, or on the tracepoint backend a
  chain entry allocated by ``__anon_vma_prepare``) of a VMA without a chain;
* ``unlink_anon_vmas``; census VMAs (processes running before tracing).

The source VMA of a clone is the event's ``aux`` on the fentry and kprobe
backends. The tracepoint backend does not see it, so it is looked for among
the VMAs of the mm the clone copied from (a fork's: the parent's, the mm
the fork runs in; a split's: its own) that point at an anon_vma the copy
links (a fork: one its chain entries named; a split: the same anon_vma):
the one with the child's range, else the one overlapping it most, else the
nearest. Ranges are kept from the events and trimmed when a split takes a
piece off the source's end; exec moves the stack and the stack and heap
grow without an event, which is why the range alone does not do. A clone
whose source cannot be found is counted, and its VMA adopted.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tracer.format.events import F_SYNTHETIC, Event, Kind, Site
from tracer.model.reuse import RULES, VmaKey, World, WorldFigures


class _Meta:
    """What the recording says of a tracked VMA (the same in every world)."""

    __slots__ = ("start", "end", "rec", "forking")

    def __init__(self, start: int, end: int, rec: int) -> None:
        self.start = start
        self.end = end
        self.rec = rec            # recorded vma->anon_vma
        self.forking = False      # its fork's chain copy is done, its anon_vma not yet


class ReuseReplay:
    """Replays the VMA operations of an event stream under several rules."""

    def __init__(self, rules: Sequence[str] = RULES) -> None:
        if not rules:
            raise ValueError("no reuse rule given")
        self.worlds = [World(r) for r in dict.fromkeys(rules)]
        self._meta: dict[int, dict[int, _Meta]] = {}   # mm -> VMA -> meta
        self.unresolved = 0     # clones whose source VMA could not be found
        self.stale = 0          # VMAs found with another anon_vma than we knew
        self.unknown = 0        # VMAs first seen with a chain longer than a root's
        self.census_partial = 0  # census VMAs whose chain is known as a length only
        # tracepoint backend: per task, the VMA of the clone in progress and
        # the anon_vmas its chain entries linked so far
        self._clone_recs: dict[int, tuple[int, set[int]]] = {}

    # -- input --------------------------------------------------------------
    def apply_all(self, events: Iterable[Event]) -> None:
        """Apply events in stream order (any validity: never raises on data)."""
        for ev in events:
            self.apply(ev)

    def apply(self, ev: Event) -> None:
        """Apply one event."""
        kind = ev.kind
        if kind is Kind.PAGE_SET_ANON_RMAP:
            self._fault(ev)
        elif kind is Kind.AVC_ALLOC:
            if ev.site is Site.PREPARE:
                self._fault(ev)
            elif ev.site is Site.CLONE and ev.vma:
                self._clone_entry(ev)
        elif kind is Kind.ANON_VMA_CLONE:
            self._clone(ev)
        elif kind is Kind.ANON_VMA_FORK:
            self._fork(ev)
        elif kind is Kind.UNLINK_ANON_VMAS:
            self._unlink(ev)
        elif kind is Kind.CENSUS_VMA:
            self._census(ev)

    # -- figures ------------------------------------------------------------
    def figures(self) -> list[WorldFigures]:
        """Each rule's figures now, in the order the rules were given."""
        return [w.figures() for w in self.worlds]

    @property
    def partial_reasons(self) -> list[str]:
        """Why the simulated figures may be incomplete; empty when exact."""
        out = []
        if self.census_partial:
            out.append(f"{self.census_partial} VMAs of processes running before tracing: "
                       "the census gives their chains as lengths only")
        if self.unresolved:
            out.append(f"{self.unresolved} cloned or forked VMAs whose source VMA is not in "
                       "the recording")
        if self.unknown:
            out.append(f"{self.unknown} VMAs first seen with a chain the recording does not "
                       "show being built")
        if self.stale:
            out.append(f"{self.stale} VMAs found with another anon_vma than their events "
                       "gave (events lost?)")
        return out

    # -- handlers -----------------------------------------------------------
    def _key(self, ev: Event) -> VmaKey | None:
        return (ev.mm, ev.vma) if ev.mm and ev.vma else None

    def _note(self, ev: Event, key: VmaKey) -> _Meta:
        vmas = self._meta.setdefault(key[0], {})
        meta = vmas.get(key[1])
        if meta is None:
            meta = vmas[key[1]] = _Meta(ev.vm_start, ev.vm_end, ev.anon_vma)
        else:
            if ev.vm_end > ev.vm_start:
                meta.start, meta.end = ev.vm_start, ev.vm_end
            if ev.anon_vma:
                meta.rec = ev.anon_vma
        return meta

    def _fault(self, ev: Event) -> None:
        key = self._key(ev)
        if key is None or not ev.anon_vma:
            return
        meta = self._meta.get(key[0], {}).get(key[1])
        if meta is not None:
            if meta.forking:
                self._fork_done(ev, key, meta)   # its fork event was lost
            elif meta.rec and meta.rec != ev.anon_vma:
                self.stale += 1
                self._drop(key)
                meta = None
        if meta is not None:
            self._note(ev, key)
            return
        self._note(ev, key)
        if ev.depth == 1 and ev.chain_len == 1:
            for w in self.worlds:
                w.prepare(key, ev.anon_vma)
        else:
            self.unknown += 1
            for w in self.worlds:
                w.adopt(key, ev.anon_vma, ev.depth, ev.chain_len)

    def _clone(self, ev: Event) -> None:
        key = self._key(ev)
        if key is None or ev.ret or not (ev.anon_vma or ev.chain_len):
            return   # failed (its unlink follows), or the source had no anon_vma
        into_child = bool(ev.cur_mm) and ev.cur_mm != ev.mm
        group = self._clone_recs.pop(ev.tid, None)
        recs = group[1] if group is not None and group[0] == ev.vma else None
        src = self._source(ev, key, into_child, recs)
        self._drop(key)
        meta = self._note(ev, key)
        if src is None:
            self.unresolved += 1
            for w in self.worlds:
                w.adopt(key, 0 if into_child else ev.anon_vma, ev.depth, ev.chain_len)
            meta.forking = into_child
            return
        if into_child:
            for w in self.worlds:
                w.fork_clone(key, src)
            meta.forking = True
            return
        for w in self.worlds:
            w.clone(key, src)
        smeta = self._meta[src[0]][src[1]]
        # A split takes a piece off one end of the source VMA.
        if smeta.start == ev.vm_start and ev.vm_end < smeta.end:
            smeta.start = ev.vm_end
        elif smeta.end == ev.vm_end and ev.vm_start > smeta.start:
            smeta.end = ev.vm_start

    def _clone_entry(self, ev: Event) -> None:
        group = self._clone_recs.get(ev.tid)
        if group is None or group[0] != ev.vma:
            group = self._clone_recs[ev.tid] = (ev.vma, set())
        if ev.aux2:
            group[1].add(ev.aux2)

    def _fork(self, ev: Event) -> None:
        key = self._key(ev)
        if key is None or ev.ret or not (ev.anon_vma or ev.chain_len):
            return   # failed, or the parent's VMA had no anon_vma: nothing done
        meta = self._meta.get(key[0], {}).get(key[1])
        if meta is None or not meta.forking:
            # No chain copy seen for it (lost): do it now.
            src = self._source(ev, key, True, None)
            self._drop(key)
            meta = self._note(ev, key)
            if src is None:
                self.unresolved += 1
                for w in self.worlds:
                    w.adopt(key, ev.anon_vma, ev.depth, ev.chain_len)
                return
            for w in self.worlds:
                w.fork_clone(key, src)
        self._fork_done(ev, key, meta)

    def _fork_done(self, ev: Event, key: VmaKey, meta: _Meta) -> None:
        meta.forking = False
        for w in self.worlds:
            w.fork_done(key, ev.anon_vma, ev.depth, ev.chain_len)
        self._note(ev, key)

    def _unlink(self, ev: Event) -> None:
        if not ev.vma:
            return
        if ev.mm:
            self._drop((ev.mm, ev.vma))
            return
        for mm, vmas in list(self._meta.items()):
            if ev.vma in vmas:
                self._drop((mm, ev.vma))
                return

    def _drop(self, key: VmaKey) -> None:
        vmas = self._meta.get(key[0])
        if vmas is None or vmas.pop(key[1], None) is None:
            return
        if not vmas:
            del self._meta[key[0]]
        for w in self.worlds:
            w.unlink(key)

    def _census(self, ev: Event) -> None:
        key = self._key(ev)
        if key is None or not ev.anon_vma:
            return
        self._drop(key)
        self._note(ev, key)
        if ev.depth == 1 and ev.chain_len == 1:
            for w in self.worlds:
                w.prepare(key, ev.anon_vma)
            return
        self.census_partial += 1
        for w in self.worlds:
            w.adopt(key, ev.anon_vma, ev.depth, ev.chain_len)

    # -- source VMAs --------------------------------------------------------
    def _source(self, ev: Event, key: VmaKey, into_child: bool,
                recs: set[int] | None) -> VmaKey | None:
        """The VMA a clone or fork copied: ``aux`` where the probe read it,
        else found in the mm it was copied from (see the module docstring);
        ``recs``: the anon_vmas the clone's chain entries linked, if seen."""
        src_mm = ev.cur_mm if into_child else ev.mm
        if ev.aux and not ev.flags & F_SYNTHETIC:
            for mm in (src_mm, ev.mm):
                if ev.aux in self._meta.get(mm, {}) and (mm, ev.aux) != key:
                    return mm, ev.aux
            return None
        if not into_child:
            # A split or copy keeps the source's anon_vma.
            recs = {ev.anon_vma} if ev.anon_vma else set()
        best, best_score = None, 0
        for ptr, m in self._meta.get(src_mm, {}).items():
            if (src_mm, ptr) == key or (recs is not None and m.rec not in recs):
                continue
            if into_child and m.start == ev.vm_start and m.end == ev.vm_end:
                return src_mm, ptr
            # overlap if positive, else minus the gap between the ranges
            score = min(m.end, ev.vm_end) - max(m.start, ev.vm_start)
            if best is None or score > best_score:
                best, best_score = ptr, score
        if best is None or (recs is None and best_score <= 0):
            return None
        return src_mm, best
