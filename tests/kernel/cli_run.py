"""Drive `anontrace --json -- WORKLOAD` and split its stdout into the
workload's own lines and anontrace's reports."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CliRun:
    proc: subprocess.Popen[bytes]
    reports: list[dict[str, Any]] = field(default_factory=list)
    workload: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def read_until(self, predicate, timeout: float = 120.0) -> None:
        """Read lines until predicate(self) is true."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out; reports={len(self.reports)} "
                                   f"workload={self.workload[-3:]}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError(f"anontrace exited: {self.finish()}")
            msg = json.loads(line)
            (self.reports if "processes" in msg else self.workload).append(msg)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120.0) -> int:
        """Close stdin, collect the remaining output, return the exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not flush a closed pipe
        out, err = self.proc.communicate(timeout=timeout)
        self.stderr = err.decode(errors="replace")
        for line in out.splitlines():
            msg = json.loads(line)
            (self.reports if "processes" in msg else self.workload).append(msg)
        return self.proc.returncode

    def pids(self, event: str = "gen") -> dict[int, int]:
        return {m["gen"]: m["pid"] for m in self.workload if m.get("event") == event}


#: How long a CLI run may take to compile and attach before its workload
#: starts (QEMU TCG; seconds on a real host).
STARTUP_S = 300.0


def start(args: list[str], backend: str, interval: float = 0.3, rmap: bool = False) -> CliRun:
    """`anontrace --json ARGS`; without ``rmap``, with --no-rmap: the rmap
    census is a second compile (10-20 s under QEMU) that only the tests of
    the rmap figures need (test_tree.py, test_ground_truth.py)."""
    return run_anontrace(["--json", "-i", str(interval), "--backend", backend,
                          *([] if rmap else ["--no-rmap"]), *args])


def run_anontrace(args: list[str]) -> CliRun:
    """`anontrace ARGS` as given (a subcommand takes its options after its name)."""
    cmd = [sys.executable, "-m", "tracer", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    return CliRun(proc)


def start_chain(forkchain_bin, regions: int, generations: int, backend: str,
                rmap: bool = False) -> CliRun:
    """`anontrace --json -- forkchain REGIONS GENERATIONS touch`, released
    and waited for until every generation is forked and ready (the family
    then stays alive until the run is finished)."""
    run = start(["--", str(forkchain_bin), str(regions), str(generations), "touch"], backend,
                rmap=rmap)
    # Compile and attach come first: the tracepoint program takes over two
    # minutes to compile under QEMU TCG in a busy guest.
    run.read_until(lambda r: any(m["event"] == "start" for m in r.workload), timeout=STARTUP_S)
    run.send(b"g")
    run.read_until(lambda r: any(m["event"] == "ready" for m in r.workload)
                   and len(r.pids()) == generations + 1)
    return run
