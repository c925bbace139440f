"""`anontrace serve`: the figures system-wide, exported to Prometheus.

The BPF programs keep the figures in maps (tracer.kstate); the loop thread
reads them once a second (batch lookups), retires exited processes and
builds the snapshot a scrape exports, so a scrape costs no map read at all.
Where the state maps are not used, one thread polls events and applies them
to the Python model under a lock instead. SIGTERM and SIGINT stop the loop;
leaving the TraceSession context detaches every probe.
"""
from __future__ import annotations

import ctypes
import gc
import operator
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from prometheus_client import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporters.http import HttpServer, landing_page, make_app
from exporters.prometheus import AnontraceCollector, ExportState, ProbeStatus
from exporters.view import Snapshot, TopView
from tracer import __version__
from tracer.config import ServeConfig, parse_listen
from tracer.events import LOGICAL_KINDS, WIRE, Event, decode_many, lost_total
from tracer.kstate import KernelState
from tracer.model import Model, Process
from tracer.procs import proc_cgroup, proc_comm, proc_ppid

SERVE_RINGBUF_PAGES = 1024  # 4 MiB
APPLY_CHUNK = 4096          # events applied per lock hold: a scrape waits at most one chunk
HOUSEKEEPING_S = 2.0        # exited processes, lost counters, families
FORGET_MM_S = 10.0          # drop dead address spaces
RESYNC_MIN_S = 10.0         # at most one census rebuild per this many seconds
SNAPSHOT_S = 1.0            # state maps read this often (scrapes export the latest)
SWEEP_S = 10.0              # processes whose exit was missed dropped this often
_KIND = operator.attrgetter("kind")


class Selection:
    """Which processes may get per-process series (comm regex, cgroup)."""

    def __init__(self, cfg: ServeConfig, proc: Path = Path("/proc")) -> None:
        self._re = cfg.selection.comm_re()
        self._cgroup = cfg.selection.cgroup
        self._proc = proc
        self._cg: dict[int, bool] = {}

    def __call__(self, p: Process) -> bool:
        if self._re is not None and not self._re.search(p.comm):
            return False
        if self._cgroup is None:
            return True
        ok = self._cg.get(p.pid)
        if ok is None:
            path = proc_cgroup(p.pid, self._proc)
            prefix = self._cgroup.rstrip("/")
            ok = path is not None and (path == prefix or path.startswith(prefix + "/")
                                       or prefix == "")
            self._cg[p.pid] = ok
        return ok

    def forget(self, pids: list[int]) -> None:
        for pid in pids:
            self._cg.pop(pid, None)


class ServeState:
    """The model, its lock and the counters a scrape reads."""

    def __init__(self, cfg: ServeConfig, build: dict[str, str], probes: list[ProbeStatus],
                 selection: Callable[[Process], bool] | None = None) -> None:
        self.lock = threading.Lock()
        self.model = Model(ppid_of=proc_ppid, keep_retired=False)
        self.view = TopView(cfg.top_k, cfg.exited_expiry_seconds,
                            selection or (lambda p: True))
        self.events_by_probe: Counter[str] = Counter()
        self.lost_events = 0
        self.resyncs = 0
        self.build = build
        self.probes = probes

    def load_census(self, processes: list[tuple[int, str]], census: bytes,
                    missing: str | None) -> None:
        """(Re)build the model from the running processes and a census of
        their VMAs (raw records): at start, and after lost events left it
        stale (a missed free keeps a dead anon_vma, and its family, forever).
        Counters and the depth histogram carry over: they only ever grow.

        The old model is dropped first and the census applied in chunks,
        under the lock: a scrape waits for the rebuild (about a second at
        10,000 processes) rather than the daemon holding two models."""
        with self.lock:
            old = self.model
            if old.events_applied:
                self.resyncs += 1
            model = self.model = Model(ppid_of=proc_ppid, keep_retired=False)
            model.learned_depths = old.learned_depths
            model.note_lost(self.lost_events)
            del old
            self.view.reset_owners()
            for pid, comm in processes:
                model.add_process(pid, comm, preexisting=True)
            if missing:
                model.add_reason(f"no census of pre-existing VMAs: {missing}")
            step = APPLY_CHUNK * WIRE.size
            for i in range(0, len(census), step):
                model.apply_all(decode_many(census[i:i + step]))
            self.view.refresh_families(model)

    def feed(self, events: list[Event]) -> None:
        """Apply events, a chunk per lock hold."""
        kinds = Counter(map(_KIND, events))
        for kind, name in LOGICAL_KINDS.items():
            if kinds[kind]:
                self.events_by_probe[name] += kinds[kind]
        for i in range(0, len(events), APPLY_CHUNK):
            with self.lock:
                self.model.apply_all(events[i:i + APPLY_CHUNK])

    def housekeeping(self, now: float, lost: int, forget_mms: bool) -> list[int]:
        """Retire exited processes into the view and refresh the families;
        returns the exited pids."""
        with self.lock:
            self.lost_events = lost
            self.model.note_lost(lost)
            exited = self.model.take_exited()
            self.view.note_exited(exited, now)
            if forget_mms:
                self.model.forget_mm_if_dead()
            self.view.refresh_families(self.model)
        return [p.pid for p in exited]

    def export(self) -> ExportState:
        """What a scrape exports now (called from collect())."""
        with self.lock:
            snap = self.view.snapshot(self.model, time.monotonic(), families=False)
            return ExportState(snapshot=snap, events_by_probe=dict(self.events_by_probe),
                               lost_events=self.lost_events, resyncs=self.resyncs,
                               build=self.build, probes=self.probes)


def _return_freed_memory() -> None:
    """Give the memory of BCC's compile and of the BTF parse back to the
    system (glibc keeps freed heap otherwise): a daemon's RSS is watched."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass    # not glibc: nothing to trim


def _probe_statuses(plan: Any) -> list[ProbeStatus]:
    return [ProbeStatus(name, c.function or "", c.method or "none", bool(c.method))
            for name, c in plan.probes.items()]


def _running_pids(proc: Path = Path("/proc")) -> list[int]:
    return [int(d.name) for d in proc.iterdir() if d.name.isdigit()]


class _Stop:
    """SIGTERM/SIGINT set a flag the loop checks every poll."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_serve(cfg: ServeConfig, listen: str | None = None,
              on_ready: Callable[[str], None] = lambda msg: None,
              stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). Returns 0."""
    from tracer.bpf_session import TraceOptions, TraceSession, require_root

    require_root()
    host, port = parse_listen(listen or cfg.listen)
    # A daemon sees every process's bursts (a parallel build, a fork storm):
    # 4 MiB of ring buffer (25k events) rides out more of them than 1 MiB,
    # and costs 8 MB of RSS (the kernel maps the data pages twice).
    opts = TraceOptions(backend=cfg.backend, pids=cfg.selection.pids, follow_children=True,
                        ringbuf_pages=SERVE_RINGBUF_PAGES, events=False, state=True,
                        map_sizes=cfg.maps)
    with _Stop() as signals, TraceSession(opts) as session:
        assert session.plan is not None
        session.drop_bulk_facts()
        _return_freed_memory()
        build = {"version": __version__, "kernel": os.uname().release,
                 "backend": session.plan.backend, "transport": session.transport}
        selection = Selection(cfg)
        if session.uses_state:
            kstate = StateServe(cfg, build, _probe_statuses(session.plan), selection)
            census_missing = session.state_census()
            kstate.refresh(session, time.monotonic())
            export: Callable[[], ExportState] = kstate.export
        else:
            state = ServeState(cfg, build, _probe_statuses(session.plan), selection)
            can_resync = _census(session, state, cfg.selection.pids)
            export = state.export
        session.release_compiler_pages()
        _return_freed_memory()
        registry = CollectorRegistry()
        AnontraceCollector(export, registry=registry)
        ProcessCollector(registry=registry)
        server = HttpServer(host, port, make_app(
            registry, lambda: landing_page(export(), cfg.source)))
        try:
            on_ready(f"anontrace serve: {session.plan.backend} backend, listening on "
                     f"http://{'[' + host + ']' if ':' in host else host or '0.0.0.0'}:"
                     f"{server.port}/metrics")
            if session.uses_state:
                _state_loop(session, kstate, selection, stop or signals.event, signals.event,
                            census_missing is None)
            else:
                _loop(session, state, selection, stop or signals.event, signals.event,
                      cfg.selection.pids if can_resync else None)
        finally:
            server.close()
    return 0


def _census(session: Any, state: ServeState, pids: tuple[int, ...]) -> bool:
    """Load the model from a census of the running processes (``pids`` and
    their descendants, or all). False if the kernel refuses the iterator."""
    if pids:
        # The configured pids and every descendant the model tracks now.
        with state.lock:
            pids = tuple(sorted(set(pids) | set(state.model.processes)))
    running = [(pid, proc_comm(pid)) for pid in (pids or _running_pids())]
    census, missing = session.census(pids or None, keep=True)
    state.load_census([(p, c) for p, c in running if c], census, missing)
    return missing is None


def _loop(session: Any, state: ServeState, selection: Selection,
          stop: threading.Event, signalled: threading.Event,
          resync_pids: tuple[int, ...] | None) -> None:
    """Poll and apply events until stopped. ``resync_pids`` (None: the
    census is not available): after lost events, rebuild from a census."""
    now = time.monotonic()
    next_house = next_forget = now
    next_resync = now + RESYNC_MIN_S
    synced_lost = prev_lost = 0
    while not (stop.is_set() or signalled.is_set()):
        state.feed(session.poll(100))
        now = time.monotonic()
        if now < next_house:
            continue
        lost = lost_total(session.lost())
        forget = now >= next_forget
        gone = state.housekeeping(now, lost, forget)
        selection.forget(gone)
        next_house = now + HOUSEKEEPING_S
        if forget:
            next_forget = now + FORGET_MM_S
            _return_freed_memory()
        # Resync once the losses have stopped (the storm is over): while
        # they go on, a census would be stale again within the second.
        storm_over = lost == prev_lost
        prev_lost = lost
        if resync_pids is not None and lost > synced_lost and storm_over and now >= next_resync:
            # Apply what is already buffered first: the census then
            # supersedes it, and later events follow on from the census.
            state.feed(session.poll(0))
            _census(session, state, resync_pids)
            _return_freed_memory()
            synced_lost = lost
            next_resync = time.monotonic() + RESYNC_MIN_S


class StateServe:
    """Serve from the state maps: the snapshot a scrape exports, refreshed by
    the loop thread (:meth:`refresh`), and the counters that carry over a
    resync."""

    def __init__(self, cfg: ServeConfig, build: dict[str, str], probes: list[ProbeStatus],
                 selection: Callable[[Any], bool] | None = None) -> None:
        self.lock = threading.Lock()
        self.view = TopView(cfg.top_k, cfg.exited_expiry_seconds,
                            selection or (lambda p: True))
        self.build = build
        self.probes = probes
        self.resyncs = 0
        self.map_full_total = 0
        self.alive: list[int] = []
        self._current = ExportState(snapshot=Snapshot(), build=build, probes=probes)

    def refresh(self, session: Any, now: float) -> list[int]:
        """Read the maps, retire exited processes (deleted from the maps once
        noted) and build the next snapshot. Returns the exited pids."""
        state = KernelState.decode(session.read_state())
        exited = [r for r in state.processes.values() if r.exited]
        self.view.note_exited_rows(exited, now)
        snap = self.view.snapshot_state(state, now)
        gone = [r.pid for r in exited]
        session.forget_processes(gone)
        g = state.globals
        self.map_full_total = g.map_full_total
        self.alive = [pid for pid, r in state.processes.items() if r.alive]
        current = ExportState(snapshot=snap, events_by_probe=dict(g.events),
                              lost_events=session.lost_total() + g.map_full_total,
                              resyncs=self.resyncs, build=self.build, probes=self.probes,
                              map_full=dict(g.map_full))
        with self.lock:
            self._current = current
        return gone

    def export(self) -> ExportState:
        """What a scrape exports now (called from collect())."""
        with self.lock:
            return self._current


def _state_loop(session: Any, kstate: StateServe, selection: Selection,
                stop: threading.Event, signalled: threading.Event, can_census: bool) -> None:
    """Refresh the snapshot every SNAPSHOT_S; drop processes whose exit was
    missed; after inserts refused by full maps, once they stop, rebuild the
    maps from a census."""
    now = time.monotonic()
    next_sweep = now + SWEEP_S
    next_resync = now + RESYNC_MIN_S
    synced_full = prev_full = 0
    while not (stop.wait(SNAPSHOT_S) or signalled.is_set()):
        now = time.monotonic()
        selection.forget(kstate.refresh(session, now))
        if now >= next_sweep:
            # Read after the dump: a pid the dump has and /proc lacks exited.
            running = set(_running_pids())
            missed = [pid for pid in kstate.alive if pid not in running]
            session.forget_processes(missed)
            selection.forget(missed)
            next_sweep = now + SWEEP_S
            _return_freed_memory()
        full = kstate.map_full_total
        if can_census and full > synced_full and full == prev_full and now >= next_resync:
            session.clear_state()
            session.state_census()
            kstate.resyncs += 1
            synced_full = full
            next_resync = time.monotonic() + RESYNC_MIN_S
        prev_full = full
