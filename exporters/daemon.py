"""`anontrace serve`: the figures system-wide, exported to Prometheus.

The BPF programs keep the figures in maps (tracer.kernel.kstate); the loop thread
reads them once a second (batch lookups), retires exited processes and
builds the snapshot a scrape exports, so a scrape costs no map read at all.
SIGTERM and SIGINT stop the loop;
leaving the TraceSession context detaches every probe.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporters.config import ServeConfig, load_config, parse_listen
from exporters.http import HttpServer, landing_page, make_app
from exporters.prometheus import AnontraceCollector, ExportState, ProbeStatus
from exporters.view import Snapshot, TopView
from tracer import __version__
from tracer.errors import AnontraceError
from tracer.kernel.kstate import KernelState, ProcRow
from tracer.kernel.procs import proc_cgroup

RESYNC_MIN_S = 10.0         # at most one census rebuild per this many seconds
SNAPSHOT_S = 1.0            # state maps read this often (scrapes export the latest)
SWEEP_S = 10.0              # processes whose exit was missed dropped this often


class Selection:
    """Which processes may get per-process series (comm regex, cgroup)."""

    def __init__(self, cfg: ServeConfig, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self.update(cfg)

    def update(self, cfg: ServeConfig) -> None:
        """Select by ``cfg``'s comm regex and cgroup from now on (a reload)."""
        self._re = cfg.selection.comm_re()
        self._cgroup = cfg.selection.cgroup
        self._cg: dict[int, bool] = {}

    def __call__(self, p: ProcRow) -> bool:
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
    """SIGTERM/SIGINT set a flag the loop checks every poll; SIGHUP asks it
    to reload the config."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reload = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_serve(cfg: ServeConfig, listen: str | None = None,
              on_ready: Callable[[str], None] = lambda msg: None,
              stop: threading.Event | None = None,
              progress: Callable[[str], None] = lambda msg: None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). Returns 0.
    ``progress`` hears the start-up phases (the BCC compile takes seconds)."""
    from tracer.kernel.facts import require_root

    host, port = parse_listen(listen or cfg.listen)
    # Bound before the compile: a port in use or a bad address is a one-line
    # error at once, with nothing attached.
    server = HttpServer(host, port)
    try:
        require_root()
        _serve(cfg, server, host, on_ready, stop, progress)
    finally:
        server.close()
    return 0


def _serve(cfg: ServeConfig, server: HttpServer, host: str, on_ready: Callable[[str], None],
           stop: threading.Event | None, progress: Callable[[str], None]) -> None:
    from tracer.kernel.bpf_session import TraceOptions, TraceSession

    opts = TraceOptions(backend=cfg.backend, pids=cfg.selection.pids, follow_children=True,
                        events=False, state=True, map_sizes=cfg.maps)
    progress("anontrace serve: compiling and attaching the BPF programs (BCC)...")
    started = time.monotonic()
    with _Stop() as signals, TraceSession(opts) as session:
        assert session.plan is not None
        progress(f"anontrace serve: {session.plan.backend} backend attached in "
                 f"{time.monotonic() - started:.1f} s; reading the running processes...")
        session.drop_bulk_facts()
        _return_freed_memory()
        build = {"version": __version__, "kernel": os.uname().release,
                 "backend": session.plan.backend, "transport": session.transport}
        selection = Selection(cfg)
        if not session.uses_state:
            raise AnontraceError(f"the {session.plan.backend} backend keeps no state maps here")
        kstate = StateServe(cfg, build, _probe_statuses(session.plan), selection)
        census_missing = session.state_census()
        kstate.refresh(session, time.monotonic())
        export: Callable[[], ExportState] = kstate.export
        session.release_compiler_pages()
        _return_freed_memory()
        registry = CollectorRegistry()
        AnontraceCollector(export, registry=registry)
        ProcessCollector(registry=registry)
        server.serve(make_app(registry, lambda: landing_page(export(), cfg.source)))
        on_ready(f"anontrace serve: {session.plan.backend} backend, listening on "
                 f"http://{'[' + host + ']' if ':' in host else host or '0.0.0.0'}:"
                 f"{server.port}/metrics")
        reloader = Reloader(cfg, kstate, selection, progress)
        _state_loop(session, kstate, selection, stop or signals.event, signals.event,
                    census_missing is None, signals.reload, reloader)


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


class Reloader:
    """SIGHUP: read the config file again. What a running daemon can change
    without re-attaching (selection, top-K, expiry) is applied; anything else
    is reported as needing a restart; an invalid file keeps the old config."""

    # Fields whose change needs the programs loaded again, or a new socket.
    RESTART = (("listen", "listen"), ("backend", "backend"), ("maps", "maps"),
               ("selection.pids", "selection pids"))

    def __init__(self, cfg: ServeConfig, kstate: StateServe, selection: Selection,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.kstate, self.selection, self.log = cfg, kstate, selection, log

    def reload(self) -> ServeConfig:
        if self.cfg.source == "<defaults>":
            self.log("anontrace serve: SIGHUP: no config file to reload (started without "
                     "--config)")
            return self.cfg
        try:
            new = load_config(Path(self.cfg.source))
        except AnontraceError as exc:
            self.log(f"anontrace serve: SIGHUP: config not reloaded, keeping the running "
                     f"one: {exc}")
            return self.cfg
        old = self.cfg
        for path, name in self.RESTART:
            if _field(old, path) != _field(new, path):
                self.log(f"anontrace serve: SIGHUP: {name} changed in {new.source}: "
                         "takes effect after a restart")
        view = self.kstate.view
        with self.kstate.lock:
            view.top_k = new.top_k
            view.expiry_s = new.exited_expiry_seconds
            self.selection.update(new)
        self.log(f"anontrace serve: SIGHUP: reloaded {new.source} (top_k {new.top_k}, "
                 f"exited_expiry {new.exited_expiry_seconds:g} s, selection applied)")
        # Keep what still runs for the restart-only fields: the next reload
        # compares with what is really in effect.
        self.cfg = dataclasses.replace(
            new, listen=old.listen, backend=old.backend, maps=old.maps,
            selection=dataclasses.replace(new.selection, pids=old.selection.pids))
        return self.cfg


def _field(cfg: ServeConfig, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _state_loop(session: Any, kstate: StateServe, selection: Selection,
                stop: threading.Event, signalled: threading.Event, can_census: bool,
                reload_asked: threading.Event | None = None,
                reloader: Reloader | None = None) -> None:
    """Refresh the snapshot every SNAPSHOT_S; drop processes whose exit was
    missed; after inserts refused by full maps, once they stop, rebuild the
    maps from a census."""
    now = time.monotonic()
    next_sweep = now + SWEEP_S
    next_resync = now + RESYNC_MIN_S
    synced_full = prev_full = 0
    while not (stop.wait(SNAPSHOT_S) or signalled.is_set()):
        if reload_asked is not None and reload_asked.is_set() and reloader is not None:
            reload_asked.clear()
            reloader.reload()
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
