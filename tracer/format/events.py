"""Decoded anontrace events.

The wire format is ``struct event`` in bpf_programs/anontrace_common.h;
WIRE_FIELDS is its only description on this side (tests/kernel/
test_wire_format.py checks it against the loaded program's BTF, and
tests/unit/test_events.py the kinds, sites, flags and loss counters against
the header's definitions).
"""
from __future__ import annotations

import enum
import operator
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
    CENSUS_VMA = 13  # a VMA that existed when tracing began; vma == 0: census complete


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
F_REUSED = 16     # set by tracer.pipeline.derive: a fork that reused an ancestor anon_vma
F_SYNTHETIC = 32  # set by tracer.pipeline.derive: a logical event rebuilt from kmem events

LOGICAL_KINDS = {
    Kind.ANON_VMA_FORK: "anon_vma_fork",
    Kind.ANON_VMA_CLONE: "anon_vma_clone",
    Kind.UNLINK_ANON_VMAS: "unlink_anon_vmas",
    Kind.PAGE_SET_ANON_RMAP: "page_set_anon_rmap",
}

# struct event, member by member: (name, struct format code), in order.
WIRE_FIELDS: tuple[tuple[str, str], ...] = (
    ("ts", "Q"), ("mm", "Q"), ("cur_mm", "Q"), ("vma", "Q"), ("vm_start", "Q"),
    ("vm_end", "Q"), ("anon_vma", "Q"), ("parent", "Q"), ("root", "Q"), ("aux", "Q"),
    ("aux2", "Q"), ("num_children", "Q"), ("num_active_vmas", "Q"),
    ("kind", "I"), ("tgid", "I"), ("tid", "I"), ("depth", "I"), ("chain_len", "I"),
    ("ret", "i"), ("pid2", "I"), ("tid2", "I"), ("site", "I"), ("flags", "I"),
    ("comm", "16s"),
)
WIRE = struct.Struct("<" + "".join(code for _, code in WIRE_FIELDS))
_FIELD_INDEX = {name: i for i, (name, _) in enumerate(WIRE_FIELDS)}
_KIND_I, _SITE_I, _COMM_I = _FIELD_INDEX["kind"], _FIELD_INDEX["site"], _FIELD_INDEX["comm"]


def wire_layout() -> list[tuple[str, int, int]]:
    """(name, byte offset, byte size) of every member of struct event."""
    out, offset = [], 0
    for name, code in WIRE_FIELDS:
        size = struct.calcsize("<" + code)
        out.append((name, offset, size))
        offset += size
    return out


def pack_record(**values: int | bytes) -> bytes:
    """One wire record; members not given are 0 (comm: empty)."""
    unknown = set(values) - set(_FIELD_INDEX)
    if unknown:
        raise TypeError(f"struct event has no member {sorted(unknown)[0]!r}")
    return WIRE.pack(*(values.get(name, b"" if code.endswith("s") else 0)
                       for name, code in WIRE_FIELDS))
LOSS_COUNTERS = ("output_full", "kprobe_args_full", "exit_without_entry",
                 "pending_full", "filter_full", "scratch_failed")
# Counted and shown, but never a lost rmap event (tracer.kernel.bpf_session.
# TraceSession._recursion_misses; docs/state.md, "Recursion misses"):
# runs of a kmem or syscall-exit tracepoint program the kernel skipped because
# it was already running on that CPU. Where tracepoint programs run with
# preemption disabled only an interrupt (hard or soft irq, NMI) can nest in
# one, and interrupt context never allocates or frees an anon_vma or a chain
# entry: the skipped run was another slab operation. Where the kernel can
# preempt them, the programs' second copies run the calls the first skipped
# (tracepoint_takeovers, shown); without the copies every skipped kmem run is
# counted apart as lost (tracepoint_runs_lost).
NOT_LOST = ("tracepoint_recursion_misses", "tracepoint_takeovers")


def lost_by_reason(lost: dict[str, int]) -> dict[str, int]:
    """The loss counters that count as lost and are not zero, by name, from
    a session's (or a recording's) counters: what a report's lost_events
    is made of."""
    not_lost: tuple[str, ...] = NOT_LOST
    if "tracepoint_recursion_misses" not in lost:
        # Recorded before the split: recursion_misses summed every program's
        # skipped runs and was shown, not counted.
        not_lost += ("recursion_misses",)
    return {k: int(v) for k, v in lost.items() if k not in not_lost and v}


def lost_total(lost: dict[str, int]) -> int:
    """Events lost, from a session's (or a recording's) loss counters."""
    return sum(lost_by_reason(lost).values())


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
_ALL_FIELDS = operator.attrgetter(*Event.__slots__)


def copy_event(ev: Event) -> Event:
    """A shallow copy, cheaper than dataclasses.replace() (the tracepoint
    backend makes one per derived event; ``bench/replay_throughput.py
    --codecs`` times both)."""
    return Event(*_ALL_FIELDS(ev))


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


_KIND_OF = {int(k): k for k in Kind}
_SITE_OF = {int(s): s for s in Site}
_COMMS: dict[bytes, str] = {}   # raw comm field -> str (a few distinct names per run)
_COMMS_MAX = 4096
_new_event = object.__new__


def comm_text(raw: bytes) -> str:
    """A task's comm as the kernel keeps it (NUL-padded bytes, any bytes the
    process chose) as text; undecodable bytes become U+FFFD."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def safe_text(text: str) -> str:
    """Untrusted text (a file name from /proc/PID/maps, a process name) fit
    for a terminal, a log line or a label value: every non-printable
    character (controls, line separators, format characters) becomes "?".
    Such text must never drive a terminal or break a format."""
    return "".join(c if c.isprintable() else "?" for c in text)


def safe_comm(comm: str) -> str:
    """A process name made safe (:func:`safe_text`) and cut to the kernel's
    16 bytes' worth."""
    return safe_text(comm[:16])


def _comm(raw: bytes) -> str:
    comm = _COMMS.get(raw)
    if comm is None:
        if len(_COMMS) >= _COMMS_MAX:
            _COMMS.clear()
        comm = _COMMS[raw] = comm_text(raw)
    return comm


def decode(data: bytes | memoryview) -> Event:
    """Decode one wire record; ValueError on a short or unknown record."""
    if len(data) < WIRE.size:
        raise ValueError(f"event record of {len(data)} bytes, expected {WIRE.size}")
    f = WIRE.unpack_from(data)
    kind, site = _KIND_OF.get(f[_KIND_I]), _SITE_OF.get(f[_SITE_I])
    if kind is None or site is None:
        try:
            Kind(f[_KIND_I]), Site(f[_SITE_I])
        except ValueError as exc:
            raise ValueError(f"unknown event kind or site: {exc}") from exc
    fields = list(f)
    fields[_KIND_I], fields[_SITE_I], fields[_COMM_I] = kind, site, _comm(f[_COMM_I])
    return Event(*fields)


def decode_many(data: bytes | memoryview) -> list[Event]:
    """Decode back-to-back wire records (a whole number of them), like
    ``[decode(rec) for rec in records]`` in one pass over the buffer (no
    Event.__init__ per record; ``bench/replay_throughput.py --codecs`` times
    both); the same ValueError for the first bad record (then nothing is
    returned)."""
    if len(data) % WIRE.size:
        raise ValueError(f"{len(data)} bytes is not a whole number of "
                         f"{WIRE.size}-byte event records")
    out: list[Event] = []
    append = out.append
    kind_of, site_of = _KIND_OF.get, _SITE_OF.get
    comms, new = _COMMS, _new_event
    for f in WIRE.iter_unpack(data):
        # Event.__init__ (24 arguments) costs more than storing the slots.
        e = new(Event)
        (e.ts, e.mm, e.cur_mm, e.vma, e.vm_start, e.vm_end, e.anon_vma, e.parent, e.root,
         e.aux, e.aux2, e.num_children, e.num_active_vmas, k, e.tgid, e.tid, e.depth,
         e.chain_len, e.ret, e.pid2, e.tid2, s, e.flags, c) = f
        kind, site = kind_of(k), site_of(s)
        if kind is None or site is None:
            i = len(out) * WIRE.size
            decode(data[i:i + WIRE.size])  # raises the error decode() gives
            raise AssertionError("decode() accepted an unknown kind or site")
        e.kind, e.site = kind, site
        comm = comms.get(c)
        e.comm = comm if comm is not None else _comm(c)
        append(e)
    return out


def decode_records(records: list[bytes], joined: bytes | None = None) -> tuple[list[Event], int]:
    """Decode a batch of wire records as the ring buffer delivered them;
    returns the events and how many records could not be decoded (those are
    skipped, the rest keep their order). ``joined`` is ``b"".join(records)``
    if the caller already has it."""
    try:
        # One decode_many over the whole batch rather than a decode() per
        # record (bench/replay_throughput.py --codecs times both).
        return decode_many(b"".join(records) if joined is None else joined), 0
    except ValueError:
        pass
    out: list[Event] = []
    errors = 0
    for rec in records:
        try:
            out.append(decode(rec))
        except ValueError:
            errors += 1
    return out, errors
