"""`anontrace serve`: the figures system-wide, exported to Prometheus.

The BPF programs keep the figures in maps (tracer.kernel.kstate); the loop thread
reads them once a second (batch lookups), retires exited processes and
builds the snapshot a scrape exports, so a scrape costs no map read at all.
SIGTERM and SIGINT stop the loop;
leaving the TraceSession context detaches every probe.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from exporters.config import ServeConfig, load_config, parse_listen
from exporters.http import HttpServer, WebGuard, landing_page, make_app
from exporters.logs import RateLimited, log
from exporters.privileges import KEPT, drop_privileges, notify_systemd
from exporters.prometheus import AnontraceCollector, ExportState, ProbeStatus
from exporters.view import Snapshot, TopView
from exporters.web_config import WebConfig, load_web_config
from tracer import __version__
from tracer.errors import AnontraceError
from tracer.format.events import NOT_LOST
from tracer.kernel.kstate import DecodeCache, ProcRow
from tracer.kernel.procs import proc_cgroup
from tracer.model.rmap import RmapSummary

RESYNC_MIN_S = 10.0         # at most one census rebuild per this many seconds
# The loop thread's refresh is Python that runs for tens of ms; a scrape
# thread waiting for the GIL waits up to this long at each hand-over (5 ms by
# default, several hand-overs per scrape).
GIL_SWITCH_S = 0.001
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


def _return_freed_memory(collect: bool = True) -> None:
    """Give freed heap back to the system (glibc keeps it otherwise): a
    daemon's RSS is watched. At start-up that is BCC's compile and the BTF
    parse; after each refresh, what the refresh used for a moment (without
    ``collect``: the trim alone takes about a millisecond at 10,000
    processes; with a collection, ten)."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    """glibc, loaded once (the trim runs every second); None if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim    # noqa: B018 - AttributeError if not glibc
    except (OSError, AttributeError):
        return None
    return libc


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


@dataclasses.dataclass(frozen=True)
class WebOptions:
    """How /metrics is served: the web config (TLS, basic auth, headers) and
    the path of the metrics."""

    web: WebConfig = WebConfig()
    telemetry_path: str = "/metrics"


@dataclasses.dataclass(frozen=True)
class PrivilegeOptions:
    """After start-up: drop every capability but those the running daemon
    needs (exporters/privileges.py), and become ``user`` if given."""

    drop: bool = True
    user: str | None = None


def run_serve(cfg: ServeConfig, listen: str | None = None,
              stop: threading.Event | None = None,
              web: WebOptions = WebOptions(),
              privileges: PrivilegeOptions = PrivilegeOptions()) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). Returns 0. Logs the
    start-up phases, resyncs, losses and shutdown on the ``anontrace``
    logger (exporters/logs.py)."""
    from tracer.kernel.facts import require_root

    host, port = parse_listen(listen or cfg.listen)
    # Bound before the compile: a port in use or a bad address is a one-line
    # error at once, with nothing attached.
    server = HttpServer(host, port)
    try:
        require_root()
        _serve(cfg, server, host, stop, web, privileges)
    finally:
        server.close()
    log(logging.INFO, "stopped: every probe detached")
    return 0


def _log_startup(session: Any) -> None:
    log(logging.INFO, "kernel facts read (kallsyms, BTF, tracefs)",
        seconds=round(session.facts_seconds, 3), kernel=os.uname().release)
    for a in session.attempts:
        if a.ok:
            log(logging.INFO, "programs compiled, loaded and attached", backend=a.backend,
                seconds=round(a.seconds, 3))
        else:
            log(logging.WARNING, "backend unusable", backend=a.backend, reason=a.error,
                seconds=round(a.seconds, 3))
    for p in session.plan.probes.values():
        if p.ok:
            log(logging.INFO, "probe attached", probe=p.probe, function=p.function,
                method=p.method)
        else:
            log(logging.WARNING, "probe not attached", probe=p.probe, reason=p.reason)
    if (session.facts is not None and session.facts.programs_preemptible
            and session.plan.backend == "fentry"):
        log(logging.WARNING, "this kernel can preempt a task inside an fentry program: "
            "a run skipped for another task preempted in it is an rmap operation lost "
            "(counted in recursion_misses); the kprobe backend has no such loss "
            "(docs/state.md 'Preemption')")
    if session.facts is not None and session.facts.tracepoint_preemptible:
        if session.tp_copies:
            log(logging.INFO, "this kernel can preempt a task inside a tracepoint program: "
                "second copies of the tracepoint programs run the calls the first skipped "
                "(tracepoint_takeovers, not a loss; docs/state.md 'Recursion misses')",
                copies=",".join(session.tp_copies))
        else:
            log(logging.WARNING, "this kernel can preempt a task inside a tracepoint program "
                "and its programs cannot have second copies here (no task storage): every "
                "skipped kmem or process-event run is counted as lost "
                "(docs/state.md 'Recursion misses')")


def _serve(cfg: ServeConfig, server: HttpServer, host: str,
           stop: threading.Event | None, web: WebOptions,
           privileges: PrivilegeOptions) -> None:
    from tracer.kernel.bpf_session import TraceOptions, TraceSession

    opts = TraceOptions(backend=cfg.backend, pids=cfg.selection.pids, follow_children=True,
                        events=False, state=True, map_sizes=cfg.maps)
    log(logging.INFO, "starting: compiling and attaching the BPF programs (BCC)",
        version=__version__, config=cfg.source, backend=cfg.backend)
    with _Stop() as signals, TraceSession(opts) as session, contextlib.ExitStack() as stack:
        assert session.plan is not None
        _log_startup(session)
        rmap = stack.enter_context(_rmap_census(cfg, session))
        _return_freed_memory()
        build = {"version": __version__, "kernel": os.uname().release,
                 "backend": session.plan.backend, "transport": session.transport}
        selection = Selection(cfg)
        if not session.uses_state:
            raise AnontraceError(f"the {session.plan.backend} backend keeps no state maps here")
        kstate = StateServe(cfg, build, _probe_statuses(session.plan), selection, rmap)
        started = time.monotonic()
        census_missing = session.state_census()
        kstate.refresh(session, time.monotonic())
        if census_missing is None:
            log(logging.INFO, "census of the running processes done",
                seconds=round(time.monotonic() - started, 3), processes=len(kstate.alive))
        else:
            log(logging.WARNING, "no census: processes that existed before tracing are not "
                "counted", reason=census_missing)
        export: Callable[[], ExportState] = kstate.export
        session.release_compiler_pages()
        _return_freed_memory()
        registry = CollectorRegistry()
        AnontraceCollector(export, registry=registry)
        ProcessCollector(registry=registry)
        if privileges.drop:
            # Before any thread starts: capability sets are per thread.
            dropped = drop_privileges(privileges.user)
            log(logging.INFO, "privileges dropped", user=dropped.user, uid=dropped.uid,
                kept=",".join(dropped.kept), why="; ".join(KEPT.values()))
        guard = WebGuard(web.web)
        server.set_tls(web.web.tls.context() if web.web.tls else None)
        path = web.telemetry_path
        server.serve(guard.wrap(make_app(registry,
                                         lambda: landing_page(export(), cfg.source, path), path)))
        shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
        log(logging.INFO, f"listening on {server.scheme}://{shown}:{server.port}{path}"
            + (" (basic auth)" if web.web.auth_required else ""),
            backend=session.plan.backend, tls=web.web.tls is not None,
            basic_auth=web.web.auth_required)
        reloader = Reloader(cfg, kstate, selection, _log_line, web.web, server, guard)
        sys.setswitchinterval(GIL_SWITCH_S)
        notify_systemd("READY=1")
        _state_loop(session, kstate, selection, stop or signals.event, signals.event,
                    census_missing is None, signals.reload, reloader)
        notify_systemd("STOPPING=1")
        log(logging.INFO, "stopping: detaching the probes")


@contextlib.contextmanager
def _rmap_census(cfg: ServeConfig, session: Any) -> Iterator[Any]:
    """The loaded rmap census, released at the end; None if rmap_interval
    is off or the kernel will not run it (logged: serve runs without the
    rmap metrics)."""
    if cfg.rmap_interval_seconds is None:
        yield None
        return
    from tracer.kernel.rmap_census import RmapCensus

    started = time.monotonic()
    census = RmapCensus(facts=session.facts)
    try:
        census.open()
    except AnontraceError as exc:
        log(logging.WARNING, "no rmap census: the rmap width metrics are not exported",
            reason=str(exc))
        yield None
        return
    log(logging.INFO, "rmap census loaded", seconds=round(time.monotonic() - started, 3),
        interval=cfg.rmap_interval_seconds)
    try:
        yield census
    finally:
        census.close()


def _log_line(msg: str, level: int = logging.INFO) -> None:
    log(level, msg)


class StateServe:
    """Serve from the state maps: the snapshot a scrape exports, refreshed by
    the loop thread (:meth:`refresh`), and the counters that carry over a
    resync."""

    def __init__(self, cfg: ServeConfig, build: dict[str, str], probes: list[ProbeStatus],
                 selection: Callable[[Any], bool] | None = None,
                 rmap_census: Any = None) -> None:
        self.lock = threading.Lock()
        # The rmap census (tracer.kernel.rmap_census) and its last result.
        self.rmap_census = rmap_census
        self.rmap_interval = cfg.rmap_interval_seconds
        # Its figures only: the anon_vmas are not kept between runs.
        self.rmap: RmapSummary | None = None
        self.rmap_time = 0.0
        self._rmap_next = 0.0
        self.view = TopView(cfg.top_k, cfg.exited_expiry_seconds,
                            selection or (lambda p: True))
        self.build = build
        self.probes = probes
        self.resyncs = 0
        self.map_full_total = 0
        self.map_full: dict[str, int] = {}
        self.alive: list[int] = []
        self._decoded = DecodeCache()
        self._current = ExportState(snapshot=Snapshot(), build=build, probes=probes)

    def refresh(self, session: Any, now: float) -> list[int]:
        """Read the maps, retire exited processes (deleted from the maps once
        noted) and build the next snapshot. Returns the exited pids."""
        self._measure_rmap(now)
        state = session.read_state_through(self._decoded)
        exited = [r for r in state.processes.values() if r.exited]
        self.view.note_exited_rows(exited, now)
        snap = self.view.snapshot_state(state, now, self.rmap, self.rmap_time)
        gone = [r.pid for r in exited]
        session.forget_processes(gone)
        g = state.globals
        self.map_full_total = g.map_full_total
        self.map_full = dict(g.map_full)
        self.alive = [pid for pid, r in state.processes.items() if r.alive]
        current = ExportState(snapshot=snap, events_by_probe=dict(g.events),
                              lost_events=session.lost_total() + g.map_full_total,
                              resyncs=self.resyncs, build=self.build, probes=self.probes,
                              map_full=dict(g.map_full))
        with self.lock:
            self._current = current
        return gone

    def _measure_rmap(self, now: float) -> None:
        """Run the rmap census when it is due (every rmap_interval)."""
        if self.rmap_census is None or self.rmap_interval is None or now < self._rmap_next:
            return
        self._rmap_next = now + self.rmap_interval
        try:
            self.rmap = self.rmap_census.run_summary()
            self.rmap_time = time.time()
        except AnontraceError as exc:
            log(logging.ERROR, "rmap census failed: no rmap figures from now on", reason=str(exc))
            self.rmap_census, self.rmap = None, None
            return
        if not self.rmap.complete:
            log(logging.WARNING, "rmap census incomplete: widths may be low",
                truncated_chains=self.rmap.truncated_chains, refused=self.rmap.refused)

    def export(self) -> ExportState:
        """What a scrape exports now (called from collect())."""
        with self.lock:
            return self._current


class Reloader:
    """SIGHUP: read the config file again. What a running daemon can change
    without re-attaching (selection, top-K, expiry) is applied; anything else
    is reported as needing a restart; an invalid file keeps the old config.
    The web config (TLS, basic auth, headers) is read again too and applies
    from the next connection."""

    # Fields whose change needs the programs loaded again, or a new socket.
    RESTART = (("listen", "listen"), ("backend", "backend"), ("maps", "maps"),
               ("selection.pids", "selection pids"))

    def __init__(self, cfg: ServeConfig, kstate: StateServe, selection: Selection,
                 log: Callable[..., None], web: WebConfig | None = None,
                 server: HttpServer | None = None, guard: WebGuard | None = None) -> None:
        self.cfg, self.kstate, self.selection, self.log = cfg, kstate, selection, log
        self.web, self.server, self.guard = web or WebConfig(), server, guard

    def reload(self) -> ServeConfig:
        self.reload_web()
        return self.reload_config()

    def reload_web(self) -> WebConfig:
        """Read the web config again; an invalid one keeps the running one."""
        if self.web.source == "<none>" or self.server is None or self.guard is None:
            return self.web
        try:
            new = load_web_config(self.web.source)
            ctx = new.tls.context() if new.tls else None
        except (AnontraceError, OSError) as exc:
            self.log(f"SIGHUP: web config not reloaded, keeping the running one: {exc}",
                     logging.ERROR)
            return self.web
        self.server.set_tls(ctx)
        self.guard.set(new)
        self.web = new
        self.log(f"SIGHUP: reloaded web config {new.source} "
                 f"({'TLS' if new.tls else 'plain HTTP'}, "
                 f"{len(new.basic_auth_users)} basic-auth users)")
        return new

    def reload_config(self) -> ServeConfig:
        if self.cfg.source == "<defaults>":
            self.log("SIGHUP: no config file to reload (started without --config)",
                     logging.WARNING)
            return self.cfg
        try:
            new = load_config(Path(self.cfg.source))
        except AnontraceError as exc:
            self.log(f"SIGHUP: config not reloaded, keeping the running one: {exc}",
                     logging.ERROR)
            return self.cfg
        old = self.cfg
        for path, name in self.RESTART:
            if _field(old, path) != _field(new, path):
                self.log(f"SIGHUP: {name} changed in {new.source}: "
                         "takes effect after a restart", logging.WARNING)
        view = self.kstate.view
        with self.kstate.lock:
            view.top_k = new.top_k
            view.expiry_s = new.exited_expiry_seconds
            self.selection.update(new)
        self.log(f"SIGHUP: reloaded {new.source} (top_k {new.top_k}, "
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
    losses = RateLimited("events lost or inserts refused by full maps since the last report")
    # Not losses (tracer.format.events.NOT_LOST): worth a debug line only.
    skipped = RateLimited("tracepoint runs skipped under an interrupt (other caches' slab "
                          "operations, not rmap events) or taken over by a second copy "
                          "since the last report",
                          interval=600.0, level=logging.DEBUG)
    lost_prev = session.lost()
    full_prev = dict(kstate.map_full)
    while not (stop.wait(SNAPSHOT_S) or signalled.is_set()):
        if reload_asked is not None and reload_asked.is_set() and reloader is not None:
            reload_asked.clear()
            reloader.reload()
        now = time.monotonic()
        selection.forget(kstate.refresh(session, now))
        _return_freed_memory(collect=False)
        if now >= next_sweep:
            # Read after the dump: a pid the dump has and /proc lacks exited.
            running = set(_running_pids())
            missed = [pid for pid in kstate.alive if pid not in running]
            session.forget_processes(missed)
            selection.forget(missed)
            next_sweep = now + SWEEP_S
            _return_freed_memory()
        lost_now = session.lost()
        delta = {k: v - lost_prev.get(k, 0) for k, v in lost_now.items()}
        skipped.add(**{k: v for k, v in delta.items() if k in NOT_LOST})
        losses.add(**{k: v for k, v in delta.items() if k not in NOT_LOST})
        losses.add(**{f"map_full_{k}": v - full_prev.get(k, 0)
                      for k, v in kstate.map_full.items()})
        lost_prev, full_prev = lost_now, dict(kstate.map_full)
        losses.flush()
        skipped.flush()
        full = kstate.map_full_total
        if can_census and full > synced_full and full == prev_full and now >= next_resync:
            started = time.monotonic()
            session.clear_state()
            session.state_census()
            kstate.resyncs += 1
            log(logging.WARNING, "maps rebuilt from a census after inserts were refused",
                resyncs=kstate.resyncs, map_full_total=full,
                seconds=round(time.monotonic() - started, 3))
            synced_full = full
            next_resync = time.monotonic() + RESYNC_MIN_S
        prev_full = full
