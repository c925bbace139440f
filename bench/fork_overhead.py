#!/usr/bin/env python3
"""Benchmark: what tracing costs a fork-heavy process.

Runs bench/workloads/forkloop.c (16 separate anonymous VMAs, every page
written, then fork(); child _exit(0); parent waitpid() in a loop) untraced and
traced, interleaved in one run, and compares fork throughput.

In-process variants open a TraceSession for the chosen backend in this
process, and a thread consumes its events with session.poll() continuously,
like the real tool:

* ``untraced``: no session;
* ``system``:   a system-wide session (no pid filter);
* ``pid``:      a session filtered to the workload's pid (children followed);
* ``state``:    a system-wide session keeping the state maps only (what
                ``serve`` and the ad-hoc reports load), read once a second.

Subprocess variants start a tracer exactly as a user would, as its own
process, and stop it the way a user would:

* ``serve``:    ``anontrace serve --listen 127.0.0.1:<free port>``
                (system-wide), ready once it says "listening on" (or /metrics
                answers); after the loop, once it has caught up and its lost
                counter has been still for 2.5 s (it publishes it every 2 s),
                /metrics gives the lost events (the rise of
                ``anontrace_lost_events_total`` during the round, and any
                ``anontrace_map_full_total`` series; serve is system-wide,
                so another process's fork storm counts too); then SIGTERM;
* ``serve-prealloc``: the same with ``maps: {preallocate: true}`` in its
                config (default map sizes): what the kernel's BPF allocator
                costs (not in the default set);
* ``cmd``:      ``anontrace --json -i 1 -- forkloop ...``: the tool starts
                the loop itself (the loop says "ready" once it runs, i.e. once
                the tool is tracing; the bench then releases it through the
                stdin it inherits). The loop's own "done" line (on the tool's
                stdout) gives forks/s; lost is the ``lost_events`` of the
                tool's final report; "exited" says whether the tool ended by
                itself within ``--exit-timeout`` seconds of the loop's end (if
                not, it gets SIGINT, Ctrl-C, and prints its final report then);
* ``bpftrace``: the peer, a bpftrace one-liner counting anon_vma slab
                allocations per pid in a map, filtered on the
                ``kmem_cache_alloc`` tracepoint's cache name (or, on kernels
                whose tracepoint has no ``name`` field, on anon_vma's slab
                size, which also counts other caches of that size); the
                filter is picked once at start-up by trying the candidates
                (field names and bpftrace syntax differ between versions);
                ready at "Attaching", stopped with SIGINT. Its "events" are
                the map's count for the loop's pid: one anon_vma per VMA of
                the loop that has one (its 16 regions, stack, data, bss...:
                26 per fork on the 6.18 host) if nothing is missed.

The summary also gives serve's and cmd's throughput as a ratio to
bpftrace's. Tracer subprocesses are always stopped, even on Ctrl-C or
SIGTERM: SIGTERM/SIGINT first, SIGKILL if that does not end them.

Profiling variants (not part of the default set):

* ``nopoll``:   a system-wide session that nobody polls: the in-kernel cost
                alone (the ring buffer fills up, so "lost" is expected there);
* ``empty``:    the tracepoint backend's attach points (raw kmem_cache_alloc/
                free, sys_exit, exit_mmap and sched tracepoints) with programs
                that return at once: the fixed price of having those hooks
                enabled at all, the floor for any tracer built on them;
* ``floor``:    the same hooks keeping only an owner per rmap object and a
                count per process (bench/bpf/floor_kmem.bpf.c): the least any
                design that keeps per-object state in maps pays here;
* ``empty-fentry``, ``floor-fentry``, ``empty-kprobe``, ``floor-kprobe``:
                the same two on the fentry or the kprobe backend's hooks
                (bench/bpf/floor_fentry.bpf.c, floor_kprobe.bpf.c).
                Each prints what its ratio means (bench/floors.py).

Rounds use ABBA ordering (even rounds run the variants in order, odd rounds in
reverse) so slow drift of the machine does not favour one variant.

The loop is a ping-pong (fork, the child runs and exits, wait), so on an
otherwise idle machine part of each fork is the time a halted CPU takes to
wake up. A tracer that itself keeps a CPU busy then speeds the loop up: on
the 2-vCPU 6.18 host (haltpoll idle driver) ``cmd`` ran 5-10% faster than
``serve`` with the same BPF time per fork, and the gap shrank to 2-3% with
``--idle-poll``, which keeps idle CPUs polling for the whole run. Ratios with
it are lower (the untraced loop gains most, about 25% there) and closer to
the tracer's CPU cost; without it, closer to what an idle host shows.

Columns: ``events`` is what the tracer reported (session events; serve's
``anontrace_events_total``; bpftrace's count for the loop; none for cmd),
``cons_s`` the CPU seconds of the consumer thread or, for subprocess
variants, of the tracer process during the loop, ``catchup`` how long the
consumer kept working after the loop (cmd: how long the tool took to exit).

Examples::

    sudo .venv/bin/python bench/fork_overhead.py --backend auto --seconds 3 --rounds 5
    sudo .venv/bin/python bench/fork_overhead.py --json --variants untraced,system
    sudo .venv/bin/python bench/fork_overhead.py --variants untraced,bpftrace,serve,cmd
    # inside the 6.12 guest (TCG is about 10x slower)
    .venv/bin/python tests/guest/boot.py --kernel 6.12 --timeout 1200 -- \\
        '.venv/bin/python bench/fork_overhead.py --backend fentry --rounds 3'

With ``--bpf-stats`` the kernel's BPF run-time statistics are switched on
(sysctl kernel.bpf_stats_enabled, which itself adds a little cost) and the
in-kernel time of every program of the session is reported per fork
(in-process variants only).

Exit status: 0, or 1 with ``--check`` when the system-wide ratio misses
``--target`` or any event was lost; 2 on a setup error (not root, no gcc,
no bpftrace...); 130 when interrupted.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from floors import FLOORS, FloorError, load_floor, objects_owned  # noqa: E402  (bench/floors.py)

from tracer.kernel.procs import busy_cpu_seconds  # noqa: E402  (after the path insert)

SOURCE = REPO / "bench" / "workloads" / "forkloop.c"
BUILD_DIR = REPO / "build" / "bench"
BINARY = BUILD_DIR / "forkloop"
ANONTRACE = REPO / ".venv" / "bin" / "anontrace"
VARIANTS = ("untraced", "system", "pid", "state", "nopoll", *FLOORS, "bpftrace", "serve",
            "serve-prealloc", "cmd")
# What the state-map design must keep of untraced fork throughput (issue 9,
# host tracepoint backend, quiet machine).
STATE_TARGETS = {"serve": 0.92, "cmd": 0.90}
# Variants that need the kernel facts (BTF, headers) in this process.
IN_PROCESS = ("system", "pid", "state", "nopoll", *FLOORS)


class BenchError(Exception):
    """A setup problem, reported as one line."""


# ------------------------------------------------------------------ workload
def build_workload(cc: str = "gcc") -> Path:
    """Compile forkloop.c into build/bench/ unless the binary is up to date."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    if shutil.which(cc) is None:
        raise BenchError(f"{cc} not found: apt-get install gcc")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BINARY.with_suffix(".tmp")
    res = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"compiling {SOURCE} failed:\n{res.stderr}")
    tmp.replace(BINARY)
    return BINARY


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"forkloop said nothing for {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise BenchError(f"forkloop exited early (status {proc.wait()})")
    return json.loads(line)


class Workload:
    """One forkloop process: started paused, released with go()."""

    def __init__(self, seconds: float, regions: int, pages: int) -> None:
        self.seconds = seconds
        self.proc = subprocess.Popen([str(BINARY), str(seconds), str(regions), str(pages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.ready = _readline(self.proc, 60)
        self.pid: int = self.ready["pid"]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.close()

    def wait(self) -> dict[str, Any]:
        done = _readline(self.proc, self.seconds * 4 + 120)
        self.proc.wait(timeout=60)
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ------------------------------------------------------------------ noise


def _self_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Noise:
    """CPU used by anything but the workload and this process during a run:
    other jobs on the machine (a QEMU guest...) make the figures unreliable."""

    def __init__(self) -> None:
        self.busy0, self.self0 = busy_cpu_seconds(), _self_s()

    def other_per_s(self, done: dict[str, Any], tracer_s: float = 0.0) -> float:
        """``tracer_s``: CPU time of a tracer process (subprocess variants),
        which is part of what is measured, not noise."""
        busy = busy_cpu_seconds() - self.busy0
        mine = _self_s() - self.self0 + tracer_s
        wl = (done["utime_ns"] + done["stime_ns"] + done["child_utime_ns"]
              + done["child_stime_ns"]) / 1e9
        return max(0.0, busy - mine - wl) / (done["elapsed_ns"] / 1e9)


def wait_for_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (up to limit_s) until the machine is idle apart from us; returns
    the CPUs other jobs used in the last 0.5 s sample."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, s0 = busy_cpu_seconds(), _self_s()
        time.sleep(0.5)
        other = max(0.0, (busy_cpu_seconds() - b0) - (_self_s() - s0)) / 0.5
        if other <= threshold or time.monotonic() >= deadline:
            return other


# ------------------------------------------------------------------ BPF stats
def _bpftool_progs() -> dict[int, dict[str, Any]]:
    if shutil.which("bpftool") is None:
        return {}
    res = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    return {p["id"]: p for p in json.loads(res.stdout or "[]")}


class BpfStats:
    """Run time of the programs a session loaded (kernel.bpf_stats_enabled)."""

    SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

    def __init__(self) -> None:
        self.saved = self.SYSCTL.read_text().strip()
        self.SYSCTL.write_text("1\n")

    def restore(self) -> None:
        self.SYSCTL.write_text(self.saved + "\n")

    @staticmethod
    def snapshot(ids: set[int]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for pid_, p in _bpftool_progs().items():
            if pid_ in ids:
                name = f"{p.get('name', '?')}#{pid_}"
                out[name] = (int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0)))
        return out


# ------------------------------------------------------------------ consumer
@dataclass
class ConsumerStats:
    events: int = 0
    polls: int = 0
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    last_event: float = 0.0


class Consumer(threading.Thread):
    """Calls session.poll() in a loop, the way the CLI does, counting events."""

    def __init__(self, session: Any) -> None:
        super().__init__(name="anontrace-consumer", daemon=True)
        self.session = session
        self.stop = threading.Event()
        self.stats = ConsumerStats()
        self.error: BaseException | None = None

    def run(self) -> None:
        t0, w0 = time.thread_time(), time.monotonic()
        st = self.stats
        try:
            while not self.session.streams_events and not self.stop.is_set():
                # State maps only: read them once a second, as serve does.
                self.session.read_state()
                st.polls += 1
                self.stop.wait(1.0)
            while not self.stop.is_set():
                evs = self.session.poll(100)
                st.polls += 1
                if evs:
                    st.events += len(evs)
                    st.last_event = time.monotonic()
                    for ev in evs:
                        st.by_kind[ev.kind.name.lower()] += 1
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
        finally:
            st.cpu_s = time.thread_time() - t0
            st.wall_s = time.monotonic() - w0


# ------------------------------------------------------------------ one run
@dataclass
class RunResult:
    round: int
    variant: str
    forks: int
    elapsed_ns: int
    forks_per_s: float
    events: int = 0
    events_per_fork: float = 0.0
    records: int = 0               # what the BPF side delivered (before derivation)
    lost: dict[str, int] = field(default_factory=dict)
    lost_total: int = 0
    consumer_cpu_s: float = 0.0
    consumer_wall_s: float = 0.0   # how long the consumer thread ran
    catch_up_s: float = 0.0        # from workload end until the consumer was idle
    workload_sys_s: float = 0.0    # parent + children system time
    other_cpu_per_s: float = 0.0   # CPUs busy with other jobs (noise; ~0 on a quiet box)
    by_kind: dict[str, int] = field(default_factory=dict)
    bpf_ns_per_fork: float | None = None
    bpf_progs: dict[str, dict[str, float]] = field(default_factory=dict)
    exited: bool | None = None       # cmd: the tool ended by itself after the loop
    tracer_status: int | None = None  # subprocess variants: the tracer's exit status


def run_untraced(rnd: int, seconds: float, regions: int, pages: int) -> RunResult:
    wl = Workload(seconds, regions, pages)
    try:
        noise = Noise()
        wl.go()
        done = wl.wait()
    finally:
        wl.kill()
    res = _result(rnd, "untraced", done)
    res.other_cpu_per_s = noise.other_per_s(done)
    return res


def _result(rnd: int, variant: str, done: dict[str, Any]) -> RunResult:
    return RunResult(rnd, variant, done["forks"], done["elapsed_ns"], done["forks_per_s"],
                     workload_sys_s=(done["stime_ns"] + done["child_stime_ns"]) / 1e9)


def run_traced(rnd: int, variant: str, args: argparse.Namespace, facts: Any,
               info: dict[str, Any]) -> RunResult:
    from tracer.format.events import lost_total
    from tracer.kernel.bpf_session import TraceOptions, TraceSession

    wl = Workload(args.seconds, args.regions, args.pages)
    stats = BpfStats() if args.bpf_stats else None
    try:
        pids = (wl.pid,) if variant == "pid" else ()
        before = set(_bpftool_progs()) if stats else set()
        opts = TraceOptions(backend=args.backend, pids=pids, transport=args.transport,
                            events=variant != "state", state=variant == "state")
        with TraceSession(opts, facts=facts) as session:
            assert session.plan is not None
            info.setdefault("backend_used", session.plan.backend)
            info.setdefault("transport", session.transport)
            info.setdefault("probes", {p: f"{c.method}:{c.function}" if c.ok else None
                                       for p, c in session.plan.probes.items()})
            ids = set(_bpftool_progs()) - before if stats else set()
            consumer = Consumer(session)
            if variant == "nopoll":
                consumer.stop.set()  # exits at once: nobody reads the buffer
            consumer.start()
            time.sleep(0.2)  # the consumer is in its poll loop
            bpf0 = BpfStats.snapshot(ids) if stats else {}
            try:
                noise = Noise()
                wl.go()
                done = wl.wait()
                other = noise.other_per_s(done)
                bpf1 = BpfStats.snapshot(ids) if stats else {}
                t_end = time.monotonic()
                # Let the consumer catch up: idle for 0.5 s (cap: 120 s).
                while time.monotonic() - t_end < 120:
                    last = consumer.stats.last_event
                    if time.monotonic() - max(last, t_end) > 0.5:
                        break
                    time.sleep(0.05)
                catch_up = max(0.0, consumer.stats.last_event - t_end)
            finally:
                consumer.stop.set()
                consumer.join(timeout=10)
            if consumer.error is not None:
                raise consumer.error
            tail = session.drain()
            cs = consumer.stats
            cs.events += len(tail)
            for ev in tail:
                cs.by_kind[ev.kind.name.lower()] += 1
            lost = session.lost()
            records = session.records
    finally:
        if stats:
            stats.restore()
        wl.kill()
    res = _result(rnd, variant, done)
    res.other_cpu_per_s = other
    res.events = cs.events
    res.events_per_fork = cs.events / max(1, res.forks)
    res.records = records
    res.lost = lost
    # Losses as the tool counts them: tracepoint programs' recursion misses
    # are never rmap events (tracer.format.events.NOT_LOST), kept in res.lost.
    res.lost_total = lost_total(lost)
    res.consumer_cpu_s = cs.cpu_s
    res.consumer_wall_s = cs.wall_s
    res.catch_up_s = catch_up
    res.by_kind = dict(cs.by_kind.most_common())
    if stats:
        total = 0
        for name, (ns1, cnt1) in bpf1.items():
            ns0, cnt0 = bpf0.get(name, (0, 0))
            dns, dcnt = ns1 - ns0, cnt1 - cnt0
            total += dns
            if dcnt:
                res.bpf_progs[name] = {"runs_per_fork": dcnt / max(1, res.forks),
                                       "ns_per_run": dns / dcnt,
                                       "ns_per_fork": dns / max(1, res.forks)}
        res.bpf_ns_per_fork = total / max(1, res.forks)
    return res


def run_floor(rnd: int, name: str, args: argparse.Namespace, facts: Any) -> RunResult:
    """One of the yardstick programs (bench/floors.py) under the loop."""
    from tracer.kernel.bcc_glue import import_bcc

    facts.headers.apply()
    bcc = import_bcc()
    wl = Workload(args.seconds, args.regions, args.pages)
    b = None
    try:
        b = load_floor(bcc, name, facts)
        noise = Noise()
        wl.go()
        done = wl.wait()
        owned = objects_owned(b)
    except FloorError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        if b is not None:
            b.cleanup()
        wl.kill()
    res = _result(rnd, name, done)
    res.events = owned
    res.events_per_fork = owned / max(1, res.forks)
    res.other_cpu_per_s = noise.other_per_s(done)
    return res


# ------------------------------------------------------------------ tracer processes
# After a tracer says it is ready, before the clock starts: its last attach
# calls complete (bpftrace prints "Attaching" before it attaches).
SETTLE_S = 0.2
# serve refreshes its lost counter every 2 s (HOUSEKEEPING_S, exporters/daemon.py):
# the counter must stay still longer than that to say the losses are in.
SERVE_QUIET_S = 2.5
EVENTS_SERIES = "anontrace_events_total"
LOST_SERIES = "anontrace_lost_events_total"
MAP_FULL_SERIES = "anontrace_map_full_total"
# forkloop's own lines: single write()s under PIPE_BUF, so never split by
# another writer of the same pipe (cmd's tool).
LOOP_LINE = re.compile(rb'\{"event":"(?:ready|done)"[^{}\n]*\}\n?')


class Output(threading.Thread):
    """Collects a pipe's bytes as they come, so the child never blocks on a
    full pipe, and lets the bench wait for a marker in them. Nothing is
    decoded while the loop runs: the bench must not compete with it for CPU
    (cmd's JSON reports list every exited child: about 0.5 MB a second)."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        super().__init__(name=f"output-{name}", daemon=True)
        self.fd = pipe.fileno()
        self.data = bytearray()
        self.eof = False
        self.cond = threading.Condition()
        self.start()

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                chunk = b""
            with self.cond:
                self.data += chunk
                self.eof = not chunk
                self.cond.notify_all()
            if not chunk:
                return

    def wait_for(self, marker: bytes, timeout: float) -> int:
        """Offset of ``marker`` in the output; -1 on timeout or end of output."""
        deadline = time.monotonic() + timeout
        start = 0
        with self.cond:
            while True:
                pos = self.data.find(marker, start)
                if pos >= 0 or self.eof:
                    return pos
                # Only bytes that arrive later need searching next time.
                start = max(0, len(self.data) - len(marker) + 1)
                left = deadline - time.monotonic()
                if left <= 0:
                    return -1
                self.cond.wait(left)

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        with self.cond:
            return bytes(self.data[start:end])


class Tracer:
    """A tracer started as its own process, the way a user starts it.

    As a context manager it always ends the process on the way out, whatever
    the reason (an error, Ctrl-C, SIGTERM): SIGTERM, SIGKILL 5 s later.
    """

    def __init__(self, name: str, argv: list[str], *, stdin: bool = False,
                 merge_stderr: bool = True) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv, cwd=REPO, bufsize=0, stdout=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
        assert self.proc.stdout is not None
        self.out = Output(self.proc.stdout, name)
        self.err = self.out
        if not merge_stderr:
            assert self.proc.stderr is not None
            self.err = Output(self.proc.stderr, f"{name}-err")

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGTERM, 5)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> bool:
        """True if the process ended within ``timeout`` seconds."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def release(self, data: bytes) -> None:
        """Write ``data`` to its stdin and close it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.close()

    def stop(self, sig: int, timeout: float) -> int:
        """Send ``sig`` unless it has ended, wait up to ``timeout`` s, then
        SIGKILL; collect the rest of its output. Returns the exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            if not self.wait(timeout):
                self.proc.kill()
                self.proc.wait()
        # A child of the tracer (cmd's loop) may hold the pipes a little longer.
        for out in {self.out, self.err}:
            out.join(timeout=5)
        return self.proc.returncode

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (all threads) so far."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3, state
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, chars: int = 1500) -> str:
        """Its last words, for error messages."""
        text = self.out.read()[-chars:]
        if self.err is not self.out:
            text += self.err.read()[-chars:]
        return text.decode(errors="replace").strip()

    def ready(self, marker: bytes, timeout: float) -> None:
        """Wait for ``marker`` in its stdout; BenchError if it ends or
        ``timeout`` passes first."""
        if self.out.wait_for(marker, timeout) < 0:
            raise BenchError(f"{self.name} did not say {marker.decode()!r} within "
                             f"{timeout:.0f} s (status {self.proc.poll()}):\n{self.tail()}")


@contextlib.contextmanager
def started(name: str, argv: list[str], marker: bytes, timeout: float) -> Iterator[Tracer]:
    """A Tracer that has said ``marker``; stopped on the way out."""
    with Tracer(name, argv) as tracer:
        tracer.ready(marker, timeout)
        time.sleep(SETTLE_S)
        yield tracer


def _loop_under(wl: Workload, tracer: Tracer) -> tuple[dict[str, Any], float, float]:
    """Run the loop; returns its done line, the tracer's CPU seconds
    meanwhile and the CPUs other jobs used (noise)."""
    noise, cpu0 = Noise(), tracer.cpu_s()
    wl.go()
    done = wl.wait()
    cpu = tracer.cpu_s() - cpu0
    return done, cpu, noise.other_per_s(done, cpu)


def _tracer_result(rnd: int, variant: str, done: dict[str, Any], cpu_s: float,
                   other: float, status: int) -> RunResult:
    res = _result(rnd, variant, done)
    res.other_cpu_per_s = other
    res.consumer_cpu_s = cpu_s
    res.consumer_wall_s = done["elapsed_ns"] / 1e9
    res.tracer_status = status
    return res


def _backend_opts(args: argparse.Namespace) -> list[str]:
    """The CLI options for --backend/--transport, only if not the default."""
    opts: list[str] = []
    if args.backend != "auto":
        opts += ["--backend", args.backend]
    if args.transport != "auto":
        opts += ["--transport", args.transport]
    return opts


# bpftrace, the peer
def _tracefs() -> Path:
    """Where tracefs is mounted; mounts it on /sys/kernel/tracing if nowhere."""
    for d in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (d / "events").is_dir():
            return d
    d = Path("/sys/kernel/tracing")
    res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(d)],
                         capture_output=True, text=True)
    if res.returncode != 0 or not (d / "events").is_dir():
        raise BenchError(f"cannot mount tracefs on {d}: {res.stderr.strip()}")
    return d


def tracepoint_fields(group: str, name: str) -> list[str]:
    """The field names of a tracepoint, from its format file."""
    fmt = _tracefs() / "events" / group / name / "format"
    try:
        text = fmt.read_text()
    except OSError as exc:
        raise BenchError(f"{fmt}: {exc.strerror}") from None
    names = []
    for line in text.splitlines():
        if "field:" in line:
            # "field:__data_loc char[] name;\toffset:24;..." -> "name"
            decl = line.split("field:", 1)[1].split(";", 1)[0]
            names.append(decl.split()[-1].split("[", 1)[0])
    return names


def _slab_size(cache: str) -> int | None:
    try:
        return int(Path(f"/sys/kernel/slab/{cache}/slab_size").read_text())
    except (OSError, ValueError):
        return None


def bpftrace_candidates() -> list[tuple[str, str]]:
    """(filter, program) pairs to try, best first.

    Recent kernels' kmem_cache_alloc carries the cache's ``name``; older
    ones only sizes, so the filter falls back to anon_vma's slab size (which
    also counts any other cache of that size). Newer bpftrace spells a
    tracepoint field ``args.name``, older versions ``args->name``.
    """
    fields = tracepoint_fields("kmem", "kmem_cache_alloc")
    size = _slab_size("anon_vma")
    if "name" in fields:
        preds = [f'str(args{op}name) == "anon_vma"' for op in (".", "->")]
    elif "bytes_alloc" in fields and size:
        preds = [f"args{op}bytes_alloc == {size}" for op in (".", "->")]
    else:
        raise BenchError(f"kmem:kmem_cache_alloc has no name or bytes_alloc field "
                         f"(fields: {', '.join(fields)}): no bpftrace filter for anon_vma")
    return [(p, f"tracepoint:kmem:kmem_cache_alloc /{p}/ {{ @[pid] = count(); }}")
            for p in preds]


def started_bpftrace(bpftrace: str, program: str) -> contextlib.AbstractContextManager[Tracer]:
    return started("bpftrace", [bpftrace, "-e", program], b"Attaching", 120)


def pick_bpftrace_program(bpftrace: str) -> str:
    """The first candidate program that this bpftrace and kernel attach."""
    errors = []
    for pred, program in bpftrace_candidates():
        try:
            with started_bpftrace(bpftrace, program) as bt:
                bt.stop(signal.SIGINT, 30)
            return program
        except BenchError as exc:
            errors.append(f"/{pred}/: {exc}")
    raise BenchError("no bpftrace program attaches:\n" + "\n".join(errors))


def run_bpftrace(rnd: int, args: argparse.Namespace) -> RunResult:
    """The peer: bpftrace counting anon_vma allocations per pid in a map."""
    with Workload(args.seconds, args.regions, args.pages) as wl, \
            started_bpftrace(args.bpftrace, args.bpftrace_program) as bt:
        done, cpu, other = _loop_under(wl, bt)
        status = bt.stop(signal.SIGINT, 30)  # Ctrl-C: it prints the map and exits
        text = bt.out.read().decode(errors="replace")
    counts = {int(p): int(c) for p, c in re.findall(r"^@\[(\d+)\]: (\d+)$", text, re.M)}
    res = _tracer_result(rnd, "bpftrace", done, cpu, other, status)
    res.events = counts.get(wl.pid, 0)
    res.events_per_fork = res.events / max(1, res.forks)
    # A map update cannot be lost; bpftrace reports lost output events this way.
    res.lost_total = sum(int(n) for n in re.findall(r"Lost (\d+) events", text))
    res.lost = {"output": res.lost_total} if res.lost_total else {}
    return res


# anontrace serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series with its labels, as printed: value}."""
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[series] = float(value)
    return out


def _series(samples: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k == name or k.startswith(name + "{")}


def _rise(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, int]:
    """How much each series of ``name`` grew between two scrapes."""
    return {k: int(v - before.get(k, 0.0)) for k, v in _series(after, name).items()}


def _serve_config(stack: contextlib.ExitStack, text: str) -> str:
    """A config file: serve takes its backend and map options from one only."""
    d = stack.enter_context(tempfile.TemporaryDirectory(prefix="fork_overhead."))
    path = Path(d) / "anontrace.yaml"
    path.write_text(text)
    return str(path)


def _serve_ready(srv: Tracer, url: str, timeout: float) -> dict[str, float]:
    """Wait until serve says "listening on" or /metrics answers; returns
    the first scrape."""
    deadline = time.monotonic() + timeout
    while True:
        srv.out.wait_for(b"listening on", 0.5)
        with contextlib.suppress(OSError):
            return scrape(url)
        if not srv.running() or time.monotonic() > deadline:
            raise BenchError(f"anontrace serve was not ready within {timeout:.0f} s "
                             f"(status {srv.proc.poll()}):\n{srv.tail()}")
        time.sleep(0.1)


def _total(samples: dict[str, float], name: str) -> float:
    return sum(_series(samples, name).values())


def _serve_caught_up(url: str, t_end: float, at_end: dict[str, float], loop_rate: float,
                     cap_s: float = 60.0) -> tuple[dict[str, float], float]:
    """Scrape every 0.25 s until serve has caught up and published its
    losses: its events grow at under a tenth of the loop's rate (the rest of
    the host keeps them moving) and the lost counter has been still for
    SERVE_QUIET_S. Returns the last scrape and the catch-up time (from the
    loop's end to the first slow interval)."""
    samples, prev_t = at_end, t_end
    prev_events, prev_lost = _total(at_end, EVENTS_SERIES), _total(at_end, LOST_SERIES)
    lost_changed, caught_up = t_end, None
    while True:
        time.sleep(0.25)
        samples, now = scrape(url), time.monotonic()
        events, lost = _total(samples, EVENTS_SERIES), _total(samples, LOST_SERIES)
        if caught_up is None and (events - prev_events) / (now - prev_t) < loop_rate / 10:
            caught_up = prev_t - t_end
        if lost != prev_lost:
            lost_changed = now
        prev_t, prev_events, prev_lost = now, events, lost
        if (caught_up is not None and now - lost_changed >= SERVE_QUIET_S) \
                or now - t_end >= cap_s:
            return samples, now - t_end if caught_up is None else caught_up


def _note_build(info: dict[str, Any], samples: dict[str, float]) -> None:
    """Backend and transport from anontrace_build_info, for the summary."""
    for series in _series(samples, "anontrace_build_info"):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
        info.setdefault("backend_used", labels.get("backend"))
        info.setdefault("transport", labels.get("transport"))


def run_serve(rnd: int, args: argparse.Namespace, info: dict[str, Any],
              variant: str = "serve") -> RunResult:
    """``anontrace serve`` (system-wide) while the loop runs; ``serve-prealloc``
    with ``maps: {preallocate: true}`` at the default map sizes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    argv = [str(args.anontrace), "serve", "--listen", f"127.0.0.1:{port}"]
    config = "" if args.backend == "auto" else f"backend: {args.backend}\n"
    if variant == "serve-prealloc":
        config += "maps:\n  preallocate: true\n"
    with contextlib.ExitStack() as stack:
        if config:
            argv += ["--config", _serve_config(stack, config)]
        wl = stack.enter_context(Workload(args.seconds, args.regions, args.pages))
        srv = stack.enter_context(Tracer("serve", argv))
        before = _serve_ready(srv, url, 180)
        _note_build(info, before)
        time.sleep(SETTLE_S)
        done, cpu, other = _loop_under(wl, srv)
        t_end, at_end = time.monotonic(), scrape(url)
        loop_rate = (_total(at_end, EVENTS_SERIES) - _total(before, EVENTS_SERIES)) \
            / (done["elapsed_ns"] / 1e9)
        after, catch_up = _serve_caught_up(url, t_end, at_end, loop_rate)
        status = srv.stop(signal.SIGTERM, 60)
    res = _tracer_result(rnd, variant, done, cpu, other, status)
    res.events = sum(_rise(before, after, EVENTS_SERIES).values())
    res.events_per_fork = res.events / max(1, res.forks)
    lost = _rise(before, after, LOST_SERIES)
    res.lost_total = sum(lost.values())
    res.lost = lost | _rise(before, after, MAP_FULL_SERIES)
    res.catch_up_s = catch_up
    return res


# anontrace -- COMMAND
def _loop_line(tool: Tracer, event: str, timeout: float) -> dict[str, Any]:
    """forkloop's ``event`` line, from the stdout it shares with the tool."""
    pos = tool.out.wait_for(b'{"event":"%s"' % event.encode(), timeout)
    m = LOOP_LINE.match(tool.out.read(pos, pos + 1024)) if pos >= 0 else None
    if m is None:
        raise BenchError(f"forkloop under anontrace did not say {event!r} within "
                         f"{timeout:.0f} s (tool status {tool.proc.poll()}):\n{tool.tail()}")
    return json.loads(m.group(0))


def _tool_reports(stdout: bytes) -> list[dict[str, Any]]:
    """The tool's JSON reports, the loop's lines cut out first: a loop line
    (one write) can land inside a long report written in several pieces."""
    reports = []
    for line in LOOP_LINE.sub(b"", stdout).splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "lost_events" in obj:
                reports.append(obj)
    return reports


def _kill_stray(pid: int | None, comm: str) -> None:
    """SIGKILL ``pid`` if it is still ``comm``: cmd's loop would outlive a
    tool killed mid-round."""
    if pid is None:
        return
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
            os.kill(pid, signal.SIGKILL)


def run_cmd(rnd: int, args: argparse.Namespace, info: dict[str, Any]) -> RunResult:
    """``anontrace --json -i 1 -- forkloop ...``: the tool runs the loop."""
    argv = [str(args.anontrace), "--json", "-i", "1", *_backend_opts(args), "--",
            str(BINARY), str(args.seconds), str(args.regions), str(args.pages)]
    loop_pid = None
    try:
        with Tracer("cmd", argv, stdin=True, merge_stderr=False) as tool:
            # The loop runs (so says "ready") only once the tool traces it.
            loop_pid = _loop_line(tool, "ready", 180)["pid"]
            noise, cpu0 = Noise(), tool.cpu_s()
            tool.release(b"g")  # the loop reads the stdin it inherited
            done = _loop_line(tool, "done", args.seconds * 4 + 120)
            t_end = time.monotonic()
            cpu = tool.cpu_s() - cpu0
            other = noise.other_per_s(done, cpu)
            exited = tool.wait(args.exit_timeout)
            exit_s = time.monotonic() - t_end
            status = tool.stop(signal.SIGINT, 60)  # Ctrl-C: its final report
            stdout = tool.out.read()
    finally:
        _kill_stray(loop_pid, BINARY.name)
    reports = _tool_reports(stdout)
    if not reports:
        raise BenchError(f"anontrace printed no report (status {status})")
    final = next((r for r in reversed(reports) if r.get("final")), reports[-1])
    info.setdefault("backend_used", final.get("backend"))
    res = _tracer_result(rnd, "cmd", done, cpu, other, status)
    res.exited = exited
    res.catch_up_s = exit_s if exited else 0.0
    res.lost_total = int(final["lost_events"])
    res.lost = {"lost_events": res.lost_total}
    if not final.get("final"):
        res.lost["no_final_report"] = 1
    return res


# ------------------------------------------------------------------ report
def _row_note(r: RunResult) -> str:
    """What only some variants have, after the columns."""
    note = ""
    if r.variant == "cmd":
        note += f"  exited: {'yes' if r.exited else 'no'}"
    note += "".join(f"  {k} {n}" for k, n in r.lost.items() if k.startswith(MAP_FULL_SERIES))
    # cmd's tool, stopped by the bench, may end with the signal's status.
    if r.tracer_status and (r.variant != "cmd" or r.exited):
        note += f"  status {r.tracer_status}"
    return note


def _fmt_row(r: RunResult) -> str:
    if r.variant == "untraced" or r.variant in FLOORS:
        return (f"  {r.round:>3} {r.variant:<9} {r.forks_per_s:>10.1f} {r.forks:>8} "
                f"{'':>9} {'':>8} {'':>6} {'':>7} {'':>7} {r.other_cpu_per_s:>6.2f}")
    extra = f" {r.bpf_ns_per_fork / 1000:>8.1f}" if r.bpf_ns_per_fork is not None else ""
    # cmd's tool reports per process, not events; it has no catch-up if
    # it did not exit by itself.
    events = (f"{'-':>9} {'-':>8}" if r.variant == "cmd"
              else f"{r.events:>9} {r.events_per_fork:>8.1f}")
    catch_up = f"{'-':>7}" if r.variant == "cmd" and not r.exited else f"{r.catch_up_s:>7.2f}"
    return (f"  {r.round:>3} {r.variant:<9} {r.forks_per_s:>10.1f} {r.forks:>8} "
            f"{events} {r.lost_total:>6} {r.consumer_cpu_s:>7.2f} {catch_up} "
            f"{r.other_cpu_per_s:>6.2f}{extra}{_row_note(r)}")


def _header(bpf_stats: bool) -> str:
    extra = " bpf_us/f" if bpf_stats else ""
    return ("  rnd variant      forks/s    forks    events  ev/fork   lost  cons_s "
            f" catchup  other{extra}")


def summarize(results: list[RunResult], target: float) -> dict[str, Any]:
    by: dict[str, list[RunResult]] = collections.defaultdict(list)
    for r in results:
        by[r.variant].append(r)
    base = statistics.median(r.forks_per_s for r in by["untraced"]) if "untraced" in by else 0.0
    out: dict[str, Any] = {"median_forks_per_s": {}, "ratio": {}, "lost": {}, "events": {},
                           "events_per_fork": {}, "records": {}, "consumer_cpu_per_s": {},
                           "map_full": {}, "exited": {}, "vs_bpftrace": {}}
    for v, rs in by.items():
        med = statistics.median(r.forks_per_s for r in rs)
        out["median_forks_per_s"][v] = round(med, 1)
        if v == "untraced":
            continue
        out["ratio"][v] = round(med / base, 4) if base else None
        out["lost"][v] = sum(r.lost_total for r in rs)
        out["events"][v] = sum(r.events for r in rs)
        out["records"][v] = sum(r.records for r in rs)
        out["events_per_fork"][v] = round(statistics.median(r.events_per_fork for r in rs), 2)
        out["consumer_cpu_per_s"][v] = round(statistics.median(
            r.consumer_cpu_s / r.consumer_wall_s if r.consumer_wall_s else 0.0
            for r in rs), 3)
        if rs[0].bpf_ns_per_fork is not None:
            out.setdefault("bpf_ns_per_fork", {})[v] = round(
                statistics.median(r.bpf_ns_per_fork or 0 for r in rs), 1)
        map_full = [n for r in rs for k, n in r.lost.items() if k.startswith(MAP_FULL_SERIES)]
        if map_full:
            out["map_full"][v] = sum(map_full)
        if v == "cmd":
            out["exited"][v] = ["yes" if r.exited else "no" for r in rs]
    peer = out["median_forks_per_s"].get("bpftrace")
    for v in ("serve", "serve-prealloc", "cmd"):
        if peer and v in out["median_forks_per_s"]:
            out["vs_bpftrace"][v] = round(out["median_forks_per_s"][v] / peer, 4)
    out["other_cpu_per_s_max"] = round(max(r.other_cpu_per_s for r in results), 3)
    sys_ratio = out["ratio"].get("system")
    out["target"] = target
    out["meets_target"] = bool(sys_ratio is not None and sys_ratio >= target
                               and not any(out["lost"].values()))
    return out


def _variant_line(v: str, summary: dict[str, Any]) -> str:
    """One variant's medians and totals over its rounds."""
    ratio = summary["ratio"][v]
    line = (f"  median forks/s {v:<14} {summary['median_forks_per_s'][v]:>10.1f}   ratio "
            + (f"{ratio:.3f}" if ratio is not None else "-") + f"   lost {summary['lost'][v]}")
    if v in summary["map_full"]:
        line += f" (map full {summary['map_full'][v]})"
    events = f"{summary['events'][v]} ({summary['events_per_fork'][v]}/fork)"
    cpu = f"{summary['consumer_cpu_per_s'][v]:.2f} s/s"
    if v == "bpftrace":
        return line + f"   loop's anon_vmas counted {events}   bpftrace CPU {cpu}"
    if v.startswith("serve"):
        return line + f"   events {events}   serve CPU {cpu}"
    if v in FLOORS:
        return line + f"   objects owned {events}"
    if v == "cmd":
        return (line + f"   exited by itself: {', '.join(summary['exited'][v])}"
                f"   anontrace CPU {cpu}")
    bpf = summary.get("bpf_ns_per_fork", {})
    return (line + f"   events {events}   consumer CPU {cpu}"
            + (f"   BPF {bpf[v] / 1000:.1f} us/fork" if v in bpf else ""))


def print_summary(summary: dict[str, Any], info: dict[str, Any], file: Any) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    # Only the in-process tracer variants learn the backend and transport.
    how = (f"backend {info['backend_used']} via {info.get('transport')}, "
           if info.get("backend_used") else "")
    p(f"summary ({info['kernel']}, {how}{info['seconds']} s x {info['rounds']} rounds, "
      f"{info['regions']} regions x {info['pages']} pages"
      f"{', idle CPUs polling' if info.get('idle_poll') else ''}):")
    base = summary["median_forks_per_s"].get("untraced")
    p(f"  median forks/s untraced       {base:>10.1f}" if base is not None else "  (no baseline)")
    for v in summary["ratio"]:
        p(_variant_line(v, summary))
    for v in summary["ratio"]:
        rec, lost = summary["records"].get(v, 0), summary["lost"][v]
        if v in IN_PROCESS and (rec or lost):
            p(f"  {v}: the BPF side produced {rec + lost} records, {lost} lost "
              f"({100 * lost / (rec + lost):.1f}%)")
    for v, ratio in summary["vs_bpftrace"].items():
        p(f"  {v} vs bpftrace: forks/s ratio {ratio:.3f}")
    if "bpftrace" in summary["ratio"]:
        p(f"  bpftrace: {info.get('bpftrace_program')}")
    for v, floor in FLOORS.items():
        if v in summary["ratio"]:
            p(f"  {v}: {floor.summary}: ratio {summary['ratio'][v]:.3f}")
    if summary["other_cpu_per_s_max"] > 0.15:
        p(f"  WARNING: other jobs used up to {summary['other_cpu_per_s_max']:.2f} CPUs during "
          "the runs: the figures are unreliable, rerun on a quiet machine")
    for v, want in STATE_TARGETS.items():
        if v not in summary["ratio"] or summary["ratio"][v] is None:
            continue
        ok = summary["ratio"][v] >= want and summary["lost"][v] == 0
        extra = ""
        if v == "serve" and "serve" in summary["vs_bpftrace"]:
            ok = ok and summary["vs_bpftrace"]["serve"] > 1
            extra = ", ahead of bpftrace"
        if v == "cmd":
            ok = ok and all(x == "yes" for x in summary["exited"]["cmd"])
            extra = ", exited by itself every round"
        p(f"  target: {v} >= {want} of untraced with 0 lost{extra}: "
          f"{'MEETS' if ok else 'MISSES'}")
    if "system" in summary["ratio"]:
        verdict = "MEETS" if summary["meets_target"] else "MISSES"
        p(f"  target: system traced/untraced >= {summary['target']} with 0 lost: {verdict}")


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--backend", choices=("auto", "fentry", "kprobe", "tracepoint"),
                    default="auto")
    ap.add_argument("--transport", choices=("auto", "ringbuf", "perf"), default="auto")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="untraced,bpftrace,serve,cmd",
                    help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--regions", type=int, default=16)
    ap.add_argument("--pages", type=int, default=4, help="pages per region")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of untraced forking before round 1 (0: none)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                    help="before each run, wait up to this long for other jobs to go idle")
    ap.add_argument("--idle-poll", action="store_true",
                    help="hold /dev/cpu_dma_latency at 0 for the run: idle CPUs poll "
                         "instead of halting (see below)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="report in-kernel BPF time per fork (enables kernel.bpf_stats_enabled)")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the system-wide ratio misses --target or events were lost")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--anontrace", type=Path, default=ANONTRACE,
                    help="the CLI the serve and cmd variants start (default: %(default)s)")
    ap.add_argument("--bpftrace", default="bpftrace", help="bpftrace binary (bpftrace variant)")
    ap.add_argument("--exit-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="cmd: how long the tool may take to exit after the loop ends")
    args = ap.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or not args.variant_list:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")
    return args


@contextlib.contextmanager
def idle_poll() -> Iterator[None]:
    """Keep idle CPUs polling while the block runs (a PM QoS request of 0 us
    through /dev/cpu_dma_latency, dropped when the file is closed)."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as exc:
        raise BenchError(f"--idle-poll: /dev/cpu_dma_latency: {exc.strerror}") from exc
    try:
        os.write(fd, (0).to_bytes(4, sys.byteorder))
        yield
    finally:
        os.close(fd)


def _signals_unwind() -> None:
    """SIGTERM and SIGINT unwind like Ctrl-C, so every tracer subprocess is
    stopped. Set even for SIGINT: started in the background by a shell,
    Python inherits SIGINT ignored, and so would the tracers (an ignored
    signal stays ignored across exec), deaf to the SIGINT that stops them."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def prepare(args: argparse.Namespace, info: dict[str, Any]) -> Any:
    """Build the workload and check the tracers the variants need. Returns
    the kernel facts for in-process variants (None if there are none)."""
    build_workload()
    wanted = set(args.variant_list)
    if wanted & {"serve", "serve-prealloc", "cmd"} and not os.access(args.anontrace, os.X_OK):
        raise BenchError(f"{args.anontrace} not found: scripts/install.sh")
    if "bpftrace" in wanted:
        path = shutil.which(args.bpftrace)
        if path is None:
            raise BenchError(f"{args.bpftrace} not found: apt-get install bpftrace")
        args.bpftrace = path
        args.bpftrace_program = info["bpftrace_program"] = pick_bpftrace_program(path)
    if not wanted & set(IN_PROCESS):
        return None
    from tracer.kernel.facts import read_kernel_facts
    from tracer.kernel.kernel_env import KernelEnv
    return read_kernel_facts(KernelEnv())


def run_variant(v: str, rnd: int, args: argparse.Namespace, facts: Any,
                info: dict[str, Any]) -> RunResult:
    if v == "untraced":
        return run_untraced(rnd, args.seconds, args.regions, args.pages)
    if v in FLOORS:
        return run_floor(rnd, v, args, facts)
    if v == "bpftrace":
        return run_bpftrace(rnd, args)
    if v in ("serve", "serve-prealloc"):
        return run_serve(rnd, args, info, v)
    if v == "cmd":
        return run_cmd(rnd, args, info)
    return run_traced(rnd, v, args, facts, info)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fork_overhead: must run as root (loading BPF programs needs CAP_BPF, "
              "CAP_PERFMON and CAP_SYS_ADMIN): sudo .venv/bin/python bench/fork_overhead.py",
              file=sys.stderr)
        return 2
    _signals_unwind()
    log = sys.stderr if args.json else sys.stdout
    info: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                            "backend": args.backend, "seconds": args.seconds,
                            "rounds": args.rounds, "regions": args.regions,
                            "pages": args.pages, "variants": args.variant_list}
    results: list[RunResult] = []
    stack = contextlib.ExitStack()
    try:
        from tracer.errors import AnontraceError
        facts = prepare(args, info)
    except KeyboardInterrupt:
        print("fork_overhead: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # BenchError, ImportError, AnontraceError from the tracer
        print(f"fork_overhead: {exc}", file=sys.stderr)
        return 2
    try:
        if args.idle_poll:
            stack.enter_context(idle_poll())
            info["idle_poll"] = True
        if args.warmup > 0:
            run_untraced(0, args.warmup, args.regions, args.pages)
        print(_header(args.bpf_stats), file=log, flush=True)
        for rnd in range(1, args.rounds + 1):
            order = args.variant_list if rnd % 2 else list(reversed(args.variant_list))
            for v in order:
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                r = run_variant(v, rnd, args, facts, info)
                results.append(r)
                print(_fmt_row(r), file=log, flush=True)
    except (BenchError, AnontraceError) as exc:
        print(f"fork_overhead: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fork_overhead: interrupted; every tracer process was stopped", file=sys.stderr)
        return 130
    finally:
        stack.close()
    summary = summarize(results, args.target)
    print_summary(summary, info, log)
    if args.json:
        json.dump({"info": info, "summary": summary, "runs": [asdict(r) for r in results]},
                  sys.stdout, indent=2)
        print()
    if args.check and not summary["meets_target"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
