"""`anontrace replay --reuse RULE FILE`: a recording (or a recorded event
stream) replayed under anon_vma reuse rules (tracer.model.reuse), side by
side with the figures the plain replay makes of it.

Report points are a recording's TICK frames and its end. An event stream
(JSON lines of ``Event.to_dict()``, as tests/fixtures/*/events-*.jsonl) has
no ticks: it is reported after every process fork, exec and exit, and at
its end.
"""
from __future__ import annotations

import json
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tracer.commands.runner import Tracker
from tracer.errors import AnontraceError
from tracer.format.events import (
    F_SYNTHETIC,
    F_THREAD,
    Event,
    Kind,
    event_from_dict,
    lost_total,
)
from tracer.model.reuse_stream import ReuseReplay
from tracer.pipeline.derive import Deriver
from tracer.pipeline.recording import (
    END,
    EVENTS,
    MAGIC,
    TICK,
    RecordingError,
    RecordingReader,
)
from tracer.pipeline.stream import EventStream

Emit = Callable[[dict[str, Any]], None]

_POINT_KINDS = {Kind.PROC_FORK: "fork", Kind.PROC_EXEC: "exec", Kind.PROC_EXIT: "exit"}


class WhatIf:
    """The plain replay's model and the reuse worlds, fed the same events."""

    def __init__(self, rules: Sequence[str], backend: str,
                 processes: list[dict[str, Any]] | None = None,
                 census_missing: str | None = None) -> None:
        self.backend = backend
        self.tracker = Tracker(backend, processes or [], census_missing)
        self.replay = ReuseReplay(rules)
        self.events = 0

    def feed(self, events: list[Event]) -> None:
        """Apply events (already derived on the tracepoint backend)."""
        self.tracker.feed(events)
        self.replay.apply_all(events)
        self.events += len(events)

    def report(self, point: str, when: float | None, lost: int, final: bool,
               pid: int = 0) -> dict[str, Any]:
        """One report point: the recorded figures and each rule's."""
        model = self.tracker.model
        model.note_lost(lost)
        totals = model.totals()
        recorded = {"anon_vmas": totals["anon_vmas"],
                    "anon_vma_chains": totals["anon_vma_chains"],
                    "max_depth": max((a.depth for a in model.anon_vmas.values()), default=0)}
        figures = self.replay.figures()
        reasons = model.partial_reasons + self.replay.partial_reasons
        for f in figures:
            if f.divergences:
                reasons.append(f"{f.divergences} forks where the recorded kernel chose another "
                               "anon_vma than the kernel rule did (followed as recorded)")
        model.take_exited()
        model.forget_mm_if_dead()
        rep: dict[str, Any] = {"point": point, "time": None if when is None else round(when, 6)}
        if pid:
            rep["pid"] = pid
        rep.update({
            "events": self.events, "backend": self.backend, "lost_events": lost,
            "partial": bool(reasons), "partial_reasons": reasons,
            "recorded": recorded,
            "rules": {f.rule: {k: v for k, v in f.as_dict().items() if k != "rule"}
                      for f in figures},
            "final": final,
        })
        return rep


def run_reuse_replay(path: Path, rules: Sequence[str], emit: Emit) -> int:
    """Replay a recording or an event stream under ``rules``; returns the
    recorded exit status. Raises AnontraceError for an unreadable file (a
    recording damaged midway is reported up to the damage first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise AnontraceError(f"{path}: cannot read: {exc.strerror}") from exc
    if head == MAGIC:
        return _replay_recording(path, rules, emit)
    _replay_stream(path, rules, emit)
    return 0


def _replay_recording(path: Path, rules: Sequence[str], emit: Emit) -> int:
    try:
        reader = RecordingReader(path)
    except RecordingError as exc:
        raise AnontraceError(str(exc)) from exc
    header = reader.header
    backend = str(header.get("backend", "unknown"))
    whatif = WhatIf(rules, backend, list(header.get("processes", [])),
                    header.get("census_missing"))
    stream = EventStream(derive=backend == "tracepoint", keep_objects=True)
    last_time, last_lost = 0.0, 0
    try:
        for frame in reader.frames():
            if frame.kind == EVENTS:
                whatif.feed(stream.feed_events(frame.events or []))
                continue
            meta = frame.meta or {}
            last_time = float(meta.get("time", last_time))
            last_lost = lost_total(meta.get("lost", {}))
            if frame.kind == TICK:
                emit(whatif.report("tick", last_time, last_lost, final=False))
            elif frame.kind == END:
                whatif.feed(stream.flush())
                emit(whatif.report("end", last_time, last_lost, final=True))
                return int(meta.get("exit_status", 0))
    except RecordingError as exc:
        whatif.feed(stream.flush())
        whatif.tracker.model.add_reason(f"recording unreadable from byte offset {exc.offset}")
        emit(whatif.report("end", last_time, last_lost, final=True))
        raise AnontraceError(str(exc)) from exc
    whatif.feed(stream.flush())
    whatif.tracker.model.add_reason("recording has no end marker (the run was killed)")
    emit(whatif.report("end", last_time, last_lost, final=True))
    raise AnontraceError(f"{path}: recording ends without an end marker (truncated?)")


def read_event_stream(path: Path) -> list[Event]:
    """A JSON-lines event stream as the model takes it: raw kmem events of
    the tracepoint backend (chain entries carrying their VMA) are derived,
    unless the stream holds derived events already."""
    events: list[Event] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    events.append(event_from_dict(json.loads(line)))
                except (ValueError, TypeError, AttributeError) as exc:
                    raise AnontraceError(
                        f"{path}:{n}: neither an anontrace recording nor a stream of "
                        f"JSON events ({exc})") from exc
    except OSError as exc:
        raise AnontraceError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise AnontraceError(f"{path}: neither an anontrace recording nor a stream of "
                             "JSON events (not UTF-8 text)") from exc
    derived = any(e.flags & F_SYNTHETIC for e in events)
    raw_kmem = any(e.kind is Kind.AVC_ALLOC and e.vma for e in events)
    if raw_kmem and not derived:
        d = Deriver()
        events = d.feed(events) + d.flush()
    return events


def _replay_stream(path: Path, rules: Sequence[str], emit: Emit) -> None:
    events = read_event_stream(path)
    backend = "tracepoint" if any(e.flags & F_SYNTHETIC for e in events) else "unknown"
    whatif = WhatIf(rules, backend)
    for ev in events:
        whatif.feed([ev])
        point = _POINT_KINDS.get(ev.kind)
        if point and not ev.flags & F_THREAD:
            pid = ev.pid2 if ev.kind is Kind.PROC_FORK else ev.tgid
            emit(whatif.report(point, None, 0, final=False, pid=pid))
    emit(whatif.report("end", None, 0, final=True))


# -- text -------------------------------------------------------------------
_COLUMNS = (("RULE", 13, "rule"), ("AVS", 7, "anon_vmas"), ("CHAINS", 7, "anon_vma_chains"),
            ("DEPTH", 6, "max_depth"), ("RMAP_MAX", 9, "rmap_max"),
            ("RMAP_TOTAL", 11, "rmap_total"), ("RMAP_MEAN", 10, "rmap_mean"),
            ("FORKED", 8, "forked_vmas"), ("REUSED", 7, "reused"),
            ("DIVERGED", 9, "divergences"))


def render(report: dict[str, Any], as_json: bool) -> str:
    """A report as one JSON line, or as the terminal table."""
    if as_json:
        return json.dumps(report)
    return format_whatif(report) + "\n"


def format_whatif(report: dict[str, Any]) -> str:
    """The terminal table of one report point."""
    if report["time"] is not None:
        when = _time.strftime("%H:%M:%S", _time.localtime(report["time"]))
    else:
        when = f"event {report['events']}"
    what = {"tick": "", "end": " FINAL"}.get(report["point"],
                                            f" {report['point']} pid={report.get('pid', 0)}")
    lines = [f"{when}{what} backend={report['backend']} lost={report['lost_events']} "
             f"partial={'yes' if report['partial'] else 'no'}"]
    lines += [f"  partial: {r}" for r in report["partial_reasons"]]
    rec = report["recorded"]
    lines.append(f"recorded: anon_vmas={rec['anon_vmas']} anon_vma_chains="
                 f"{rec['anon_vma_chains']} max_depth={rec['max_depth']}")
    lines.append("".join(h.rjust(w) if i else h.ljust(w)
                         for i, (h, w, _) in enumerate(_COLUMNS)))
    for rule, fig in report["rules"].items():
        row = dict(fig, rule=rule)
        cells = []
        for i, (_, w, key) in enumerate(_COLUMNS):
            v = row[key]
            if key == "divergences" and rule != "kernel":
                v = "-"
            elif isinstance(v, float):
                v = f"{v:.2f}"
            cells.append(str(v).rjust(w) if i else str(v).ljust(w))
        lines.append("".join(cells))
    return "\n".join(lines)
