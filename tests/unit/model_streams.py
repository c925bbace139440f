"""Helpers for the model and recording tests: recorded family streams as the
model sees them, hand-built events, and wire packing."""
from __future__ import annotations

from tests.unit import kfix
from tracer.format.events import F_SYNTHETIC, WIRE, Event, Kind, Site
from tracer.pipeline.derive import Deriver

#: every recorded forkchain stream: (kernel series, backend)
FAMILY_STREAMS = [("6.1", "fentry"), ("6.1", "kprobe"), ("6.12", "fentry"),
                  ("6.12", "kprobe"), ("6.18", "tracepoint")]


def raw_events(series: str, backend: str) -> list[Event]:
    """What the BPF side sent (the recording minus the session's derived events)."""
    return [e for e in kfix.events(series, backend) if not e.flags & F_SYNTHETIC]


def model_stream(series: str, backend: str) -> list[Event]:
    """The events the model is fed in a live session or a replay: the
    tracepoint backend's raw events go through the Deriver first."""
    if backend == "tracepoint":
        d = Deriver()
        return d.feed(raw_events(series, backend)) + d.flush()
    return kfix.events(series, backend)


def first_teardown(events: list[Event]) -> int:
    """Index of the first event of a family member's teardown.

    Before v6.16 sched_process_exit fires after exit_mm(), so the youngest
    generation's unlink_anon_vmas events come *before* its PROC_EXIT; since
    v6.16 the exit event comes first. Either way, everything before this
    index sees every generation alive and whole.
    """
    return min(i for i, e in enumerate(events)
               if e.kind in (Kind.PROC_EXIT, Kind.UNLINK_ANON_VMAS))


def ev(kind: Kind, **kw) -> Event:
    """A hand-built event: zero/empty defaults, fields by keyword."""
    base = dict(ts=0, mm=0, cur_mm=0, vma=0, vm_start=0, vm_end=0, anon_vma=0, parent=0,
                root=0, aux=0, aux2=0, num_children=0, num_active_vmas=0, kind=kind,
                tgid=0, tid=0, depth=0, chain_len=0, ret=0, pid2=0, tid2=0, site=Site.NONE,
                flags=0, comm="")
    base.update(kw)
    if not kw.get("tid"):
        base["tid"] = base["tgid"]
    return Event(**base)


def pack(e: Event) -> bytes:
    """One wire record (tracer.format.events.WIRE) for an Event."""
    return WIRE.pack(e.ts, e.mm, e.cur_mm, e.vma, e.vm_start, e.vm_end, e.anon_vma, e.parent,
                     e.root, e.aux, e.aux2, e.num_children, e.num_active_vmas, int(e.kind),
                     e.tgid, e.tid, e.depth, e.chain_len, e.ret, e.pid2, e.tid2, int(e.site),
                     e.flags, e.comm.encode()[:16])


def pack_all(events: list[Event]) -> bytes:
    return b"".join(pack(e) for e in events)
