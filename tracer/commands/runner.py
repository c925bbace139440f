"""Ad-hoc tracing runs: live (-p PID, -- COMMAND), recorded, and replayed.

Live runs and replays share :class:`Tracker`, so a replay of a recording
makes the same reports as the run that recorded it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer.commands.report import build_report
from tracer.commands.rmap_report import RmapMeter
from tracer.commands.state_report import StateReporter
from tracer.errors import AnontraceError
from tracer.format.events import Event, decode_many, lost_by_reason, lost_total
from tracer.kernel.procs import proc_comm, proc_ppid, require_pids
from tracer.model.hierarchy import Model
from tracer.model.types import CENSUS_MISSING_REASON
from tracer.pipeline.recording import (
    END,
    EVENTS,
    TICK,
    RecordingError,
    RecordingReader,
    RecordingWriter,
)
from tracer.pipeline.stream import EventStream

Emit = Callable[[dict[str, Any]], None]

# After the last traced process exits, wait this long without events for its
# mm teardown (frees come after the exit event on kernels whose exit event
# precedes exit_mm(): docs/kernels.md, "Exit ordering").
SETTLE_SECONDS = 0.5


@dataclass
class RunSpec:
    """What a live run traces and how it reports."""

    pids: tuple[int, ...] = ()
    command: tuple[str, ...] = ()
    follow_children: bool = True
    interval: float = 1.0
    duration: float = 0.0
    backend: str = "auto"
    transport: str = "auto"
    record: Path | None = None
    # Where the figures come from: "state" (BPF maps, the default) or
    # "events" (every operation streamed to the Python model; recordings
    # always stream, and may keep the maps too).
    source: str = "state"
    # Rmap widths in the reports (state reports only: a replay could not
    # make them again).
    rmap: bool = True
    on_start: Callable[[str], None] = field(default=lambda msg: None)


class Tracker:
    """The model plus report pacing, fed with decoded (derived) events."""

    def __init__(self, backend: str, processes: list[dict[str, Any]],
                 census_missing: str | None = None) -> None:
        self.backend = backend
        self.model = Model()
        for p in processes:
            self.model.add_process(p["pid"], p["comm"], p.get("ppid", 0),
                                   preexisting=p.get("preexisting", False))
        if census_missing:
            self.model.add_reason(f"{CENSUS_MISSING_REASON}: {census_missing}")

    def feed(self, events: list[Event]) -> None:
        apply = self.model.apply
        for ev in events:
            apply(ev)

    def report(self, when: float, lost: int, final: bool) -> dict[str, Any]:
        self.model.note_lost(lost)
        rep = build_report(self.model, when=when, backend=self.backend, lost_events=lost,
                           exited=self.model.take_exited(), final=final)
        self.model.forget_mm_if_dead()
        return rep

    @property
    def traced_alive(self) -> int:
        return len(self.model.processes)


def _start_paused(command: tuple[str, ...]) -> tuple[subprocess.Popen[bytes], int]:
    """Start COMMAND stopped before its first instruction.

    A shell waits on a pipe, then execs COMMAND in place (same pid), so the
    tracer can filter on the pid before anything runs. If the tracer fails
    and closes the pipe, the shell exits 125 instead of running untraced.
    """
    if shutil.which(command[0]) is None:
        raise AnontraceError(f"command not found: {command[0]}")
    pipe_r, w = os.pipe()
    # The pipe keeps its number in the child (pass_fds), and a POSIX shell
    # redirects single-digit descriptors only: use the lowest free one from
    # 3 (not always 3: anontrace may be started with more open).
    r = fcntl.fcntl(pipe_r, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(pipe_r)
    if r > 9:
        os.close(r)
        os.close(w)
        raise AnontraceError("descriptors 3 to 9 are all open: close some before "
                             "anontrace -- COMMAND")
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", f'read -r _ <&{r} || exit 125; exec {r}<&-; '
                                 'exec "$@"', "sh", *command], pass_fds=(r,))
    finally:
        os.close(r)
    return proc, w


def _exit_status(proc: subprocess.Popen[bytes]) -> int:
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def run_live(spec: RunSpec, emit: Emit) -> int:
    """Trace until the traced processes are gone, -d ends, or Ctrl-C.

    Returns COMMAND's exit status (0 with -p).
    """
    from tracer.kernel.bpf_session import TraceOptions, TraceSession
    from tracer.kernel.facts import require_root

    if bool(spec.pids) == bool(spec.command):
        raise AnontraceError("nothing to trace: give -p PID or -- COMMAND (see --help)")
    require_root()
    proc = go_fd = None
    if spec.command:
        proc, go_fd = _start_paused(spec.command)
        processes = [{"pid": proc.pid, "comm": os.path.basename(spec.command[0])[:15],
                      "ppid": os.getpid(), "preexisting": False}]
        pids: tuple[int, ...] = (proc.pid,)
    else:
        require_pids(spec.pids)
        processes = [{"pid": p, "comm": proc_comm(p), "ppid": proc_ppid(p),
                      "preexisting": True} for p in spec.pids]
        pids = spec.pids
    writer = None
    try:
        from_state = spec.source == "state" and spec.record is None
        opts = TraceOptions(backend=spec.backend, pids=pids,
                            follow_children=spec.follow_children, transport=spec.transport,
                            events=not from_state, state=from_state or spec.source == "both")
        with TraceSession(opts) as session:
            assert session.plan is not None
            backend = session.plan.backend
            if from_state and session.uses_state:
                census_missing = session.state_census() if spec.pids else None
                reporter = StateReporter(backend, processes, census_missing)
                spec.on_start(backend)
                if go_fd is not None:
                    os.write(go_fd, b"go\n")
                    os.close(go_fd)
                    go_fd = None
                # The rmap census is compiled once the command runs: its
                # figures are read at report time, nothing waits for it.
                with _rmap_meter(spec, session) as meter:
                    return _state_loop(spec, session, reporter, proc,
                                       _measured(meter, emit))
            census_raw, census_missing = b"", None
            if spec.pids:
                census_raw, census_missing = session.census(spec.pids)
            tracker = Tracker(backend, processes, census_missing)
            if spec.record is not None:
                writer = RecordingWriter(spec.record, {
                    "census_missing": census_missing,
                    "kernel": os.uname().release, "backend": backend,
                    "transport": session.transport, "processes": processes,
                    "command": list(spec.command), "pids": list(spec.pids),
                    "probes": {p: {"function": c.function, "method": c.method}
                               for p, c in session.plan.probes.items()},
                    "offsets": session.facts.layout.offsets if session.facts and
                    session.facts.layout else {}})
                writer.events(census_raw)
                session.recorder = writer.events
            tracker.feed(decode_many(census_raw))
            spec.on_start(backend)
            if go_fd is not None:
                os.write(go_fd, b"go\n")
                os.close(go_fd)
                go_fd = None
            status = _loop(spec, session, tracker, proc, emit, writer)
    finally:
        if go_fd is not None:
            os.close(go_fd)
        if writer is not None:
            writer.close()
    return status


@contextlib.contextmanager
def _rmap_meter(spec: RunSpec, session: Any) -> Iterator[RmapMeter | None]:
    """An rmap census for the run's reports, released at its end; None
    with --no-rmap. A kernel that will not run it leaves a note in the
    reports, not an error."""
    if not spec.rmap:
        yield None
        return
    from tracer.kernel.rmap_census import RmapCensus

    census = RmapCensus(facts=session.facts)
    try:
        census.open()
    except AnontraceError as exc:
        yield RmapMeter(None, str(exc))
        return
    try:
        yield RmapMeter(census)
    finally:
        census.close()


def _measured(meter: RmapMeter | None, emit: Emit) -> Emit:
    if meter is None:
        return emit

    def emit_measured(report: dict[str, Any]) -> None:
        meter.annotate(report)
        emit(report)
    return emit_measured


def _loop(spec: RunSpec, session: Any, tracker: Tracker,
          proc: subprocess.Popen[bytes] | None, emit: Emit,
          writer: RecordingWriter | None) -> int:
    start = time.monotonic()
    next_report = start + spec.interval if spec.interval > 0 else float("inf")
    quiet_since: float | None = None
    try:
        while True:
            events = session.poll(100)
            tracker.feed(events)
            now = time.monotonic()
            if now >= next_report:
                _tick(tracker, session, emit, writer, final=False)
                next_report += spec.interval * max(1, int((now - next_report) / spec.interval) + 1)
            if spec.duration and now - start >= spec.duration:
                break
            done = tracker.traced_alive == 0 and (proc is None or proc.poll() is not None)
            if done:
                if events or quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= SETTLE_SECONDS:
                    break
            else:
                quiet_since = None
    except KeyboardInterrupt:
        pass
    tracker.feed(session.drain())
    status = _exit_status(proc) if proc is not None and proc.poll() is not None else 0
    _tick(tracker, session, emit, writer, final=True, exit_status=status)
    return status


def _state_loop(spec: RunSpec, session: Any, reporter: StateReporter,
                proc: subprocess.Popen[bytes] | None, emit: Emit) -> int:
    """Report from the state maps until the family is gone (by the
    kernel's word: /proc), -d ends, or Ctrl-C."""
    start = time.monotonic()
    next_report = start + spec.interval if spec.interval > 0 else float("inf")
    done_since: float | None = None
    try:
        while True:
            session.poll(100)
            now = time.monotonic()
            if now >= next_report:
                _state_tick(reporter, session, emit, final=False)
                next_report += spec.interval * max(1, int((now - next_report) / spec.interval) + 1)
            if spec.duration and now - start >= spec.duration:
                break
            if proc is not None and proc.poll() is None:
                done_since = None
                continue
            # Read the state now: a family member forked since the last
            # report is then known (and checked in /proc) before we stop.
            _state_peek(reporter, session)
            if reporter.alive:
                done_since = None
            elif done_since is None:
                done_since = now
            elif now - done_since >= SETTLE_SECONDS:
                break   # and the teardowns after the last exit are in
    except KeyboardInterrupt:
        pass
    status = _exit_status(proc) if proc is not None and proc.poll() is not None else 0
    _state_tick(reporter, session, emit, final=True)
    return status


def _state_peek(reporter: StateReporter, session: Any) -> None:
    reporter.report(session.read_state(families=False), time.time(), 0, final=False)


def _with_losses(report: dict[str, Any], lost: dict[str, int]) -> dict[str, Any]:
    """The report with what its lost_events is made of (README "Loss counters")."""
    report["lost_by_reason"] = lost_by_reason(lost)
    return report


def _state_tick(reporter: StateReporter, session: Any, emit: Emit, final: bool) -> None:
    lost = session.lost()
    report, gone = reporter.report(session.read_state(families=False), time.time(),
                                   lost_total(lost), final)
    session.forget_processes(gone)
    emit(_with_losses(report, lost))


def _tick(tracker: Tracker, session: Any, emit: Emit, writer: RecordingWriter | None,
          final: bool, exit_status: int = 0) -> None:
    when = time.time()
    lost = session.lost()
    total = lost_total(lost)
    if writer is not None:
        meta = {"time": when, "lost": lost}
        if final:
            writer.end({**meta, "exit_status": exit_status})
        else:
            writer.tick(meta)
    emit(_with_losses(tracker.report(when, total, final), lost))


def run_replay(path: Path, emit: Emit) -> int:
    """Replay a recording's reports. Raises AnontraceError (naming the byte
    offset) for a corrupt or truncated file after reporting all before it."""
    try:
        reader = RecordingReader(path)
    except RecordingError as exc:
        raise AnontraceError(str(exc)) from exc
    header = reader.header
    backend = str(header.get("backend", "unknown"))
    tracker = Tracker(backend, list(header.get("processes", [])), header.get("census_missing"))
    stream = EventStream(derive=backend == "tracepoint", keep_objects=True)
    last_time = 0.0
    last_lost: dict[str, int] = {}

    def report(final: bool) -> dict[str, Any]:
        return _with_losses(tracker.report(last_time, lost_total(last_lost), final), last_lost)

    try:
        for frame in reader.frames():
            if frame.kind == EVENTS:
                events = frame.events or []
                tracker.feed(stream.feed_events(events))
                continue
            meta = frame.meta or {}
            last_time = float(meta.get("time", last_time))
            last_lost = meta.get("lost", {})
            if frame.kind == TICK:
                emit(report(final=False))
            elif frame.kind == END:
                tracker.feed(stream.flush())
                emit(report(final=True))
                return int(meta.get("exit_status", 0))
    except RecordingError as exc:
        tracker.feed(stream.flush())
        tracker.model.add_reason(f"recording unreadable from byte offset {exc.offset}")
        emit(report(final=True))
        raise AnontraceError(str(exc)) from exc
    # No END frame: the recording run was killed. Report what there is.
    tracker.feed(stream.flush())
    tracker.model.add_reason("recording has no end marker (the run was killed)")
    emit(report(final=True))
    raise AnontraceError(f"{path}: recording ends without an end marker (truncated?)")
