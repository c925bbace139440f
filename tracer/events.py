"""Decoded anontrace events.

The wire format mirrors ``struct event`` in bpf_programs/anontrace.bpf.c.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import asdict, dataclass
from typing import Any


class Kind(enum.IntEnum):
    ANON_VMA_FORK = 1
    ANON_VMA_CLONE = 2
    UNLINK_ANON_VMAS = 3
    PAGE_SET_ANON_RMAP = 4
    AV_ALLOC = 5
    AV_FREE = 6
    AVC_ALLOC = 7
    AVC_FREE = 8
    PROC_FORK = 9
    PROC_EXEC = 10
    PROC_EXIT = 11
    SYNC = 12  # derived backend: a task's pending operation ended (syscall exit)


class Site(enum.IntEnum):
    NONE = 0
    FORK = 1
    CLONE = 2
    PREPARE = 3
    UNLINK = 4
    PUT = 5
    OTHER = 6


F_DEPTH_TRUNCATED = 1
F_CHAIN_TRUNCATED = 2
F_DEFERRED = 4
F_THREAD = 8
F_REUSED = 16     # set by tracer.derive: a fork that reused an ancestor anon_vma
F_SYNTHETIC = 32  # set by tracer.derive: a logical event rebuilt from kmem events

LOGICAL_KINDS = {
    Kind.ANON_VMA_FORK: "anon_vma_fork",
    Kind.ANON_VMA_CLONE: "anon_vma_clone",
    Kind.UNLINK_ANON_VMAS: "unlink_anon_vmas",
    Kind.PAGE_SET_ANON_RMAP: "page_set_anon_rmap",
}

WIRE = struct.Struct("<13Q5Ii4I16s")
LOSS_COUNTERS = ("output_full", "kprobe_args_full", "exit_without_entry",
                 "pending_full", "filter_full")


@dataclass(slots=True)
class Event:
    """One kernel event. Pointers are kernel addresses (ints)."""

    ts: int
    mm: int
    cur_mm: int
    vma: int
    vm_start: int
    vm_end: int
    anon_vma: int
    parent: int
    root: int
    aux: int
    aux2: int
    num_children: int
    num_active_vmas: int
    kind: Kind
    tgid: int
    tid: int
    depth: int
    chain_len: int
    ret: int
    pid2: int
    tid2: int
    site: Site
    flags: int
    comm: str

    @property
    def probe(self) -> str | None:
        """The logical probe name for the four logical kinds."""
        return LOGICAL_KINDS.get(self.kind)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.name.lower()
        d["site"] = self.site.name.lower()
        for k in _POINTERS:
            d[k] = f"{d[k]:#x}"
        return d


_POINTERS = ("mm", "cur_mm", "vma", "anon_vma", "parent", "root", "aux", "aux2")


def event_from_dict(d: dict[str, Any]) -> Event:
    """Inverse of :meth:`Event.to_dict` (recorded fixtures, JSON streams)."""
    try:
        kw = dict(d)
        kw["kind"] = Kind[str(d["kind"]).upper()]
        kw["site"] = Site[str(d["site"]).upper()]
        for k in _POINTERS:
            kw[k] = int(d[k], 16) if isinstance(d[k], str) else int(d[k])
        return Event(**kw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an anontrace event: {exc}") from exc


def decode(data: bytes | memoryview) -> Event:
    """Decode one wire record; ValueError on a short or unknown record."""
    if len(data) < WIRE.size:
        raise ValueError(f"event record of {len(data)} bytes, expected {WIRE.size}")
    f = WIRE.unpack_from(data)
    try:
        kind, site = Kind(f[13]), Site(f[21])
    except ValueError as exc:
        raise ValueError(f"unknown event kind or site: {exc}") from exc
    comm = f[23].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Event(*f[:13], kind, f[14], f[15], f[16], f[17], f[18], f[19], f[20], site,
                 f[22], comm)
