"""Run the forkchain workload under a TraceSession and keep what was seen."""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tracer.format.events import Event, Kind
from tracer.kernel.bpf_session import TraceOptions, TraceSession
from tracer.kernel.facts import KernelFacts
from tracer.kernel.procs import busy_cpu_seconds


@dataclass
class Generation:
    gen: int
    pid: int
    regions: list[int]


@dataclass
class FamilyRun:
    backend: str
    regions: int
    generations: int
    gens: dict[int, Generation] = field(default_factory=dict)
    alive_events: list[Event] = field(default_factory=list)   # up to "ready"
    events: list[Event] = field(default_factory=list)         # everything
    lost: dict[str, int] = field(default_factory=dict)
    probes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    transport: str = ""
    bystander_pid: int = 0
    while_alive: dict[str, object] = field(default_factory=dict)
    # CPU the rest of the host used while the family was traced, per second
    # of the run (other tests, a CI neighbour): system-wide counts such as
    # recursion misses scale with it.
    other_cpu_per_s: float = 0.0

    def mm_of(self, pid: int) -> int:
        """The mm of a traced process, learned from fork events."""
        for ev in self.events:
            if ev.kind is Kind.PROC_FORK and ev.pid2 == pid:
                return ev.mm
        raise AssertionError(f"no proc_fork event for pid {pid}")

    def region_events(self, kind: Kind, gen: int) -> list[Event]:
        g = self.gens[gen]
        mm = self.mm_of(g.pid) if gen > 0 else None
        regions = set(g.regions)
        return [ev for ev in self.events if ev.kind is kind and ev.vm_start in regions
                and (mm is None or ev.mm == mm)
                and (gen > 0 or ev.tgid == g.pid)]


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> dict:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("workload said nothing")
    line = proc.stdout.readline()
    if not line:
        raise EOFError("workload exited early")
    return json.loads(line)


@contextlib.contextmanager
def idle_family(binary: Path, regions: int, generations: int) -> Iterator[dict[int, dict]]:
    """forkchain REGIONS GENERATIONS, untraced, built and left idle for the
    block: generation -> its "gen" message (pid, region starts)."""
    proc = subprocess.Popen([str(binary), str(regions), str(generations)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None
    try:
        _readline(proc, 30)
        proc.stdin.write(b"g")
        proc.stdin.flush()
        gens: dict[int, dict] = {}
        ready = False
        while not (ready and len(gens) == generations + 1):
            msg = _readline(proc, 60)
            if msg["event"] == "gen":
                gens[msg["gen"]] = msg
            ready = ready or msg["event"] == "ready"
        yield gens
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def run_family(binary: Path, backend: str, regions: int, generations: int,
               while_alive: Callable[[FamilyRun, TraceSession], None] | None = None,
               settle: float = 1.5, timeout: float = 120.0,
               transport: str = "auto", object_events: bool = True,
               facts: KernelFacts | None = None, state: bool = False,
               recorder: Callable[[bytes], None] | None = None,
               at_end: Callable[[FamilyRun, TraceSession], None] | None = None) -> FamilyRun:
    """Start forkchain paused, trace it (and not a bystander), let it build
    the chain, optionally inspect it alive, then let it exit and collect."""
    run = FamilyRun(backend, regions, generations)
    busy0, own0, t0 = busy_cpu_seconds(), _own_cpu_s(), time.monotonic()
    proc = subprocess.Popen([str(binary), str(regions), str(generations), "touch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    bystander = subprocess.Popen([str(binary), "2", "2"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, bufsize=0)
    try:
        start = _readline(proc, timeout)
        run.bystander_pid = _readline(bystander, timeout)["pid"]
        with TraceSession(TraceOptions(backend=backend, pids=(start["pid"],),
                                       transport=transport, object_events=object_events,
                                       state=state),
                          facts=facts) as session:
            session.recorder = recorder
            assert session.plan is not None
            run.probes = {p: (c.function, c.method) for p, c in session.plan.probes.items()}
            run.transport = session.transport
            assert proc.stdin is not None and bystander.stdin is not None
            proc.stdin.write(b"g")
            proc.stdin.flush()
            bystander.stdin.write(b"g")
            bystander.stdin.flush()
            deadline = time.monotonic() + timeout
            ready = False
            # Generations print concurrently: "ready" may precede a gen line.
            while not ready or len(run.gens) < generations + 1:
                msg = _readline(proc, max(1.0, deadline - time.monotonic()))
                if msg["event"] == "gen":
                    run.gens[msg["gen"]] = Generation(msg["gen"], msg["pid"], msg["regions"])
                elif msg["event"] == "ready":
                    ready = True
                run.alive_events.extend(session.poll(0))
            time.sleep(0.2)
            run.alive_events.extend(session.poll(100))
            if while_alive is not None:
                while_alive(run, session)
                run.alive_events.extend(session.poll(0))
            run.events.extend(run.alive_events)
            proc.stdin.close()
            bystander.stdin.close()
            proc.wait(timeout=timeout)
            bystander.wait(timeout=timeout)
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < settle:
                got = session.poll(100)
                if got:
                    run.events.extend(got)
                    quiet_since = time.monotonic()
            run.events.extend(session.drain())
            run.lost = session.lost()
            if at_end is not None:
                at_end(run, session)
    finally:
        for p in (proc, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
    other = (busy_cpu_seconds() - busy0) - (_own_cpu_s() - own0)
    run.other_cpu_per_s = max(0.0, other) / max(1e-3, time.monotonic() - t0)
    return run


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the workloads)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
