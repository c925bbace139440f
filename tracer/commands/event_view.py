"""One-line text rendering of events (the `events` command's view)."""
from __future__ import annotations

from tracer.format.events import F_REUSED, Event, Kind, safe_comm

_NAMES = {
    Kind.ANON_VMA_FORK: "fork", Kind.ANON_VMA_CLONE: "clone", Kind.UNLINK_ANON_VMAS: "unlink",
    Kind.PAGE_SET_ANON_RMAP: "rmap", Kind.AV_ALLOC: "av+", Kind.AV_FREE: "av-",
    Kind.AVC_ALLOC: "avc+", Kind.AVC_FREE: "avc-", Kind.PROC_FORK: "proc-fork",
    Kind.PROC_EXEC: "proc-exec", Kind.PROC_EXIT: "proc-exit", Kind.SYNC: "sync",
    Kind.CENSUS_VMA: "census",
}


def header() -> str:
    return (f"{'TIME(ns)':<16} {'PID':>7} {'COMM':<16} {'EVENT':<10} {'VMA_START':>14} "
            f"{'DEPTH':>5} {'CHAIN':>5} {'CHILD':>5}")



def format_event(ev: Event) -> str:
    name = _NAMES[ev.kind] + ("*" if ev.flags & F_REUSED else "")
    if ev.kind in (Kind.PROC_FORK, Kind.PROC_EXEC, Kind.PROC_EXIT):
        extra = f"child={ev.pid2}" if ev.kind is Kind.PROC_FORK else ""
        return f"{ev.ts:<16} {ev.tgid:>7} {safe_comm(ev.comm):<16} {name:<10} {extra}"
    return (f"{ev.ts:<16} {ev.tgid:>7} {safe_comm(ev.comm):<16} {name:<10} {ev.vm_start:>14x} "
            f"{ev.depth:>5} {ev.chain_len:>5} {ev.num_children:>5}")
