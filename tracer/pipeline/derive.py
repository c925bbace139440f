"""Rebuild the logical probes from kmem events (tracepoint backend).

Kernels without kprobes and fentry (like hardened cloud kernels) still have
the kmem tracepoints. The BPF side reports every anon_vma_chain allocation
with the facts read once its operation finished (F_DEFERRED), and every free
with the object still intact. This module groups them per task:

* clone-site chain allocations for one VMA  -> one anon_vma_clone
* a fork-site chain allocation               -> one anon_vma_fork (new anon_vma)
* a clone group into another mm (a fork) with no fork-site allocation after
  it                                        -> one anon_vma_fork that reused an
                                               ancestor (F_REUSED)
* unlink-site chain frees for one VMA        -> one unlink_anon_vmas

Raw events pass through unchanged; synthetic ones carry F_SYNTHETIC.

Limits: a derived unlink_anon_vmas carries the anon_vma facts of a chain-entry
free that still saw vma->anon_vma; unlink_anon_vmas() clears it before
freeing a root's last entry, so a VMA whose chain held only its root reports
depth 0. The model does not use those facts (it drops the VMA either way).
After the anon_vma rework (compat key anon_vma_rework) anon_vma_fork()
allocates its anon_vma and chain entry before cloning and frees both when the
clone reused an ancestor; the BPF side holds those allocations until the
operation ends and drops them unread when they are freed
(bpf_programs/anontrace_compat.h, FORK_ALLOCATES_FIRST), so the stream it
sends has the same shape on every kernel: a clone group, then the fork-site
entry only when the fork made a new anon_vma.
"""
from __future__ import annotations

from dataclasses import dataclass

from tracer.format.events import F_REUSED, F_SYNTHETIC, Event, Kind, Site, copy_event


@dataclass
class _Group:
    kind: Kind          # ANON_VMA_CLONE or UNLINK_ANON_VMAS
    last: Event
    count: int
    held: list[Event] | None = None  # anon_vma frees inside an unlink, emitted after it


class Deriver:
    """Stateful per-task grouping; feed it events in stream order."""

    def __init__(self, keep_objects: bool = True) -> None:
        """``keep_objects=False`` drops the chain-entry events once they are
        grouped (the model needs only the logical events they become, and
        prepare-site allocations): the stream then matches what fentry and
        kprobe give without --raw, at half the events."""
        self._keep = keep_objects
        self._groups: dict[int, _Group] = {}
        # unlink_anon_vmas() drops an anon_vma's reference (and may free it)
        # just before freeing the chain entry that linked it: hold such frees
        # until the entry's free says which VMA's teardown they belong to.
        self._puts: dict[int, list[Event]] = {}

    def feed(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            self._one(ev, out)
        return out

    def flush(self) -> list[Event]:
        """Close every open group (end of stream)."""
        out: list[Event] = []
        for tid in list(self._groups):
            self._close(tid, None, out)
        for puts in self._puts.values():
            out.extend(puts)
        self._puts.clear()
        return out

    def _one(self, ev: Event, out: list[Event]) -> None:
        tid = ev.tid
        if ev.kind is Kind.AV_FREE and ev.site is Site.PUT:
            self._puts.setdefault(tid, []).append(ev)
            return
        puts = self._puts.pop(tid, None)
        g = self._groups.get(tid)
        if ev.kind is Kind.AVC_FREE and ev.site is Site.UNLINK:
            if g is not None and g.kind is Kind.UNLINK_ANON_VMAS and g.last.vma == ev.vma:
                g.count += 1
                # unlink_anon_vmas() clears vma->anon_vma midway: keep the
                # facts of the free that still saw it.
                if ev.depth > g.last.depth:
                    g.last = ev
            else:
                self._close(tid, ev, out)
                g = self._groups[tid] = _Group(Kind.UNLINK_ANON_VMAS, ev, 1)
            if puts:
                # Emitted after the unlink, so the VMA is gone before its
                # anon_vma, as on the fentry and kprobe backends.
                g.held = (g.held or []) + puts
            if self._keep:
                out.append(ev)
            return
        if ev.kind is Kind.AVC_ALLOC and ev.site is Site.CLONE:
            if g is not None and g.kind is Kind.ANON_VMA_CLONE and g.last.vma == ev.vma:
                g.last, g.count = ev, g.count + 1
            else:
                self._close(tid, ev, out)
                self._groups[tid] = _Group(Kind.ANON_VMA_CLONE, ev, 1)
            if puts:
                out.extend(puts)
            if self._keep:
                out.append(ev)
            return
        if g is not None:
            self._close(tid, ev, out)
        if puts:
            out.extend(puts)
        fork_entry = ev.kind is Kind.AVC_ALLOC and ev.site is Site.FORK
        if self._keep or not (fork_entry or ev.kind is Kind.AVC_FREE):
            out.append(ev)
        if fork_entry:
            out.append(_synth(ev, Kind.ANON_VMA_FORK, 0))

    def _close(self, tid: int, nxt: Event | None, out: list[Event]) -> None:
        g = self._groups.pop(tid, None)
        if g is None:
            return
        if g.kind is Kind.UNLINK_ANON_VMAS:
            unlink = _synth(g.last, Kind.UNLINK_ANON_VMAS, 0)
            unlink.chain_len = g.count  # entries the teardown freed
            out.append(unlink)
            out.extend(g.held or ())
            return
        out.append(_synth(g.last, Kind.ANON_VMA_CLONE, 0))
        into_child = g.last.mm != 0 and g.last.cur_mm != 0 and g.last.mm != g.last.cur_mm
        allocates_next = nxt is not None and nxt.site is Site.FORK and nxt.kind in (
            Kind.AV_ALLOC, Kind.AVC_ALLOC)
        if into_child and not allocates_next:
            out.append(_synth(g.last, Kind.ANON_VMA_FORK, F_REUSED))


def _synth(ev: Event, kind: Kind, flags: int) -> Event:
    out = copy_event(ev)
    out.kind = kind
    out.flags = ev.flags | F_SYNTHETIC | flags
    out.aux = out.aux2 = 0
    return out
