"""`anontrace top` live: a system-wide trace session keeping the state
maps (as `anontrace serve` opens it), seeded by a census, read once per
interval into :class:`tracer.commands.top.Frame` s for the screen, with the
rmap widths of an rmap census (tracer.kernel.rmap_census) run as often.

Exited processes are deleted from the process map once read, and processes
whose exit was missed (a full map) once /proc no longer has them, or the
map would fill up on a busy host.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from tracer.commands.state_report import proc_gone
from tracer.commands.top import Frame, TopTracker, View, Widths, WidthsProvider
from tracer.commands.top_screen import run_curses, run_plain
from tracer.errors import AnontraceError
from tracer.kernel.facts import require_root
from tracer.kernel.kstate import DecodeCache

SWEEP_S = 10.0      # processes whose exit was missed are looked for this often


@dataclass(frozen=True)
class TopOptions:
    """The command line of `anontrace top`."""

    interval: float = 1.0
    count: int | None = None
    noclear: bool = False
    maxrows: int = 20
    sort: str = "anon_vmas"
    families: bool = False
    rmap: bool = True
    backend: str = "auto"


class RmapWidths:
    """A widths provider over a loaded rmap census: one run per call. A run
    the kernel refuses, or one that undercounts, is said in :attr:`note`."""

    def __init__(self, census: Any) -> None:
        self._census = census
        self.note: str | None = None
        self.families: Widths | None = None   # by family, from the same run

    def __call__(self) -> Widths | None:
        try:
            snap = self._census.run()
        except AnontraceError as exc:
            self.note = f"rmap widths unavailable: {exc}"
            self.families = None
            return None
        self.note = None if snap.complete else (
            f"rmap widths undercount: {snap.truncated_chains} chains cut short, "
            f"{snap.refused} anon_vmas not counted (map full)")
        self.families = {pid: (f.max_width, f.total_width) for pid, f in snap.families.items()}
        return {pid: (f.max_width, f.total_width) for pid, f in snap.processes.items()}


class LiveSource:
    """The session, the rmap census and the tracker: :meth:`refresh` reads
    the maps and returns the next frame; :attr:`first` is the frame read
    right after the census (its growth is unknown). A context manager:
    leaving it detaches every probe and unloads the census.

    ``widths`` replaces the rmap census (None: load it if ``rmap`` and the
    kernel will)."""

    def __init__(self, backend: str = "auto", widths: WidthsProvider | None = None,
                 rmap: bool = True) -> None:
        self.backend = backend
        self._widths = widths
        self._rmap = rmap
        self._rmap_note: str | None = None
        self._stack = ExitStack()
        self._session: Any = None
        self._tracker: TopTracker | None = None
        self._next_sweep = 0.0
        # The last read's rows: unchanged processes are not decoded again.
        self._decoded = DecodeCache()
        self.first: Frame | None = None

    def __enter__(self) -> LiveSource:
        from tracer.kernel.bpf_session import TraceOptions, TraceSession

        with ExitStack() as stack:
            opts = TraceOptions(backend=self.backend, events=False, state=True)
            session = stack.enter_context(TraceSession(opts))
            assert session.plan is not None
            if not session.uses_state:
                raise AnontraceError(f"the {session.plan.backend} backend keeps no state "
                                     "maps here")
            census_missing = session.state_census()
            if self._widths is None and self._rmap:
                self._widths = self._load_rmap(stack, session)
            self._session = session
            self._tracker = TopTracker(session.plan.backend, census_missing)
            self._next_sweep = time.monotonic() + SWEEP_S
            self.first = self.refresh()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _load_rmap(self, stack: ExitStack, session: Any) -> WidthsProvider | None:
        from tracer.kernel.rmap_census import RmapCensus

        census = RmapCensus(facts=session.facts)
        try:
            census.open()
        except AnontraceError as exc:
            # Top runs on without widths ("-"), and says why.
            self._rmap_note = f"rmap widths unavailable: {exc}"
            return None
        stack.callback(census.close)
        return RmapWidths(census)

    @property
    def backend_used(self) -> str:
        """The backend the session attached with."""
        assert self._tracker is not None
        return self._tracker.backend

    def refresh(self) -> Frame:
        """Read the state maps now; forget the processes that are gone."""
        session, tracker = self._session, self._tracker
        assert session is not None and tracker is not None
        state = session.read_state_through(self._decoded)
        now = time.monotonic()
        session.forget_processes([pid for pid, r in state.processes.items() if r.exited])
        if now >= self._next_sweep:
            # After the dump: a pid it calls alive that /proc lacks exited
            # unseen (its exit did not fit a full map).
            missed = [pid for pid, r in state.processes.items()
                      if r.alive and proc_gone(pid)]
            session.forget_processes(missed)
            for pid in missed:
                del state.processes[pid]
            self._next_sweep = now + SWEEP_S
        widths = self._widths() if self._widths is not None else None
        note = getattr(self._widths, "note", None) or self._rmap_note
        return tracker.update(state, now, time.time(), session.lost_total(), widths, note,
                              getattr(self._widths, "families", None))


def run_top(opts: TopOptions, say: Callable[[str], None]) -> int:
    """Trace system-wide and show the top processes (or families) until
    `q`, ``opts.count`` refreshes, Ctrl-C or SIGTERM (as KeyboardInterrupt).
    ``say`` prints status lines (stderr). Returns the exit status (0)."""
    view = View.start(opts.sort, opts.families, opts.maxrows)
    if opts.interval <= 0:
        raise AnontraceError(f"interval must be above 0 seconds, not {opts.interval:g}")
    require_root()
    interactive = not opts.noclear and sys.stdout.isatty() and sys.stdin.isatty()
    say("Compiling and attaching the BPF programs (BCC)...")
    try:
        with LiveSource(opts.backend, rmap=opts.rmap) as src:
            say(f"Tracing with {src.backend_used}... Output every {opts.interval:g} secs. "
                "Hit Ctrl-C to end.")
            try:
                if interactive:
                    run_curses(src.refresh, view, opts.interval, opts.count, first=src.first)
                else:
                    run_plain(src.refresh, view, opts.interval, opts.count, sys.stdout)
            except KeyboardInterrupt:
                say("Detaching...")
            except BrokenPipeError:
                # `anontrace top | head`: the reader is gone; so is our output.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        pass    # during start-up: the session has released what it attached
    return 0
