#!/usr/bin/env python3
"""Compare anontrace's live reports with drgn's reading of the kernel, run after run.

Runs inside the Debian 6.12 guest as root, with the venv's interpreter (drgn
lives there; the venv sees BCC through --system-site-packages)::

    .venv/bin/python tests/guest/drgn_compare.py \
        [--methods fentry,kprobe] [--runs 10] [--workload forkchain|splits] \
        [--regions 3] [--generations 5] [--pages 32] [--interval 1] [--reports 3] \
        [--go-delay SECS] [--record-dir DIR [--keep-recordings]] [--tree DIR]

For every run it starts ``anontrace --json -i INTERVAL --backend METHOD --
WORKLOAD`` (``python -m tracer`` from this checkout) and builds a family
of known shape:

* ``forkchain REGIONS GENERATIONS touch``: it is sent its "g", and once every
  generation has printed itself and "ready", the whole chain waits on stdin:
  its shape stays still until stdin closes;
* ``splits PAGES``: one region written, then split by mprotect into PAGES
  VMAs; it then waits on stdin.

While the family is held still, each interval report (from one made at
least ``--settle`` seconds after the family became still, so that every
event the kernel produced before then was polled) is compared, for every live
process it lists, with drgn's walk of the same pid taken right after the
report arrived (tests/guest/drgn_walk.py: ``load_program``, ``walk_pid``):
``anon_vmas``, ``anon_vma_chains``, ``max_depth`` and ``max_chain`` as the
README's "Definitions" give them. A family process missing from a report is a
mismatch too. ``max_degree`` is not compared: it counts only the children seen
created while tracing, which drgn cannot tell.

Prints one line per run, then per method ``METHOD: N runs, M reports
compared, K mismatches`` (K counts process comparisons that differ) and each
mismatch in detail.

After stdin closes the family exits and drgn can no longer walk it (an
exiting task's ``mm`` is already NULL). Interval reports made then that still
list a family process *alive* are compared with the figures drgn read while
it was held ("rows after EOF"): before v6.16 ``exit_mm()`` tears the mm down
before the ``sched_process_exit`` tracepoint fires, and the tool must report
such a process with its figures from before the teardown, not a half-emptied
mm (the undercount of issue 9). A short ``--interval`` makes such reports
more likely. A row after EOF that differs counts as a mismatch.

With ``--record-dir`` the runs use ``anontrace record -o DIR/METHOD-RUN.atr``
(the same reports on stdout, always from the event stream) and the
recordings of runs with a mismatch or rows after EOF are kept (all of them
with ``--keep-recordings``). ``--tree`` runs another checkout's tracer (a
pinned snapshot while the working tree changes). Exit status: 0 when every
comparison matched, 1 on a mismatch, 2 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drgn_walk import load_program, walk_pid  # noqa: E402  (same directory)

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = REPO / "tests" / "workloads"
FIELDS = ("anon_vmas", "anon_vma_chains", "max_depth", "max_chain")
DEFAULT_VMLINUX = f"/var/cache/anontrace/vmlinux-{os.uname().release}"


class RunFailed(RuntimeError):
    """A run could not be driven to a comparable state."""


def drgn_figures(walk: dict[str, Any]) -> dict[str, int]:
    """The README's per-process figures from a drgn_walk.walk_pid() result."""
    vmas = walk["vmas"]
    return {
        "anon_vmas": len({v["anon_vma"] for v in vmas}),
        "anon_vma_chains": sum(v["chain_len"] for v in vmas),
        "max_depth": max((v["depth"] for v in vmas), default=0),
        "max_chain": max((v["chain_len"] for v in vmas), default=0),
    }


def build_workloads(out_dir: Path) -> dict[str, Path]:
    """Compile forkchain.c and splits.c into ``out_dir``."""
    bins = {}
    for name in ("forkchain", "splits"):
        exe = out_dir / name
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(WORKLOADS / f"{name}.c")],
                       check=True)
        bins[name] = exe
    return bins


@dataclass
class Mismatch:
    run: int
    report: int          # index of the report among the run's reports
    pid: int
    role: str            # "gen 3", "splits", ...
    got: dict[str, Any] | None     # None: the process is missing from the report
    want: dict[str, int]
    lost: int
    partial: bool
    skew: float          # seconds between the report and drgn's walk

    def describe(self) -> str:
        head = (f"  run {self.run} report {self.report} pid {self.pid} ({self.role}): "
                f"lost={self.lost} partial={'yes' if self.partial else 'no'} "
                f"walk {self.skew:+.2f} s after the report")
        if self.got is None:
            return (f"{head}\n    anontrace: process missing from the report\n"
                    f"    drgn:      {self.want}")
        diff = ", ".join(f"{k} {self.got[k]} vs {self.want[k]}" for k in FIELDS
                         if self.got[k] != self.want[k])
        return (f"{head}\n    anontrace: {self.got}\n    drgn:      {self.want}\n"
                f"    differ (anontrace vs drgn): {diff}")


@dataclass
class RunResult:
    method: str
    run: int
    pids: dict[int, str] = field(default_factory=dict)   # pid -> role
    compared_reports: int = 0
    compared_processes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None
    exit_status: int | None = None
    recording: Path | None = None
    seconds: float = 0.0
    held: dict[int, dict[str, int]] = field(default_factory=dict)  # drgn, last compare
    exit_rows: list[str] = field(default_factory=list)   # rows after EOF that differ
    exit_compared: int = 0                                 # rows after EOF compared


class Anontrace:
    """One ``anontrace --json`` child: its reports and the workload's lines."""

    def __init__(self, argv: list[str], stderr_path: Path, cwd: Path) -> None:
        self._stderr = open(stderr_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, bufsize=0, env=env, cwd=cwd)
        self.reports: list[dict[str, Any]] = []
        self.workload: list[dict[str, Any]] = []
        self._buf = b""

    def _lines(self, timeout: float) -> list[bytes]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.proc.stdout.fileno(), 65536)
        if not data:
            raise EOFError("anontrace closed its stdout")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return lines

    def read_until(self, done: Callable[[Anontrace], bool], timeout: float,
                   on_report: Callable[[int], bool] | None = None) -> None:
        """Read until ``done(self)``; ``on_report(index)`` is called for each
        report as it arrives and may end the wait by returning True."""
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailed(f"timed out after {timeout:.0f} s (reports {len(self.reports)}, "
                                f"last workload lines {self.workload[-2:]})")
            for line in self._lines(min(left, 1.0)):
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue   # not ours (a workload's stray output)
                if "processes" in msg:
                    self.reports.append(msg)
                    if on_report is not None and on_report(len(self.reports) - 1):
                        return
                else:
                    self.workload.append(msg)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> int:
        """Close stdin (the family exits), read to EOF, return the exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.read_until(lambda _s: False, timeout)
        except EOFError:
            pass
        except RunFailed:
            self.proc.kill()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [m for m in self.workload if m.get("event") == name]


def _family(args: argparse.Namespace, run: Anontrace) -> dict[int, str]:
    """Drive the workload to its still shape; return its pids and roles."""
    t = args.timeout
    if args.workload == "forkchain":
        run.read_until(lambda r: bool(r.events("start")), t)
        time.sleep(args.go_delay)
        run.send(b"g")
        run.read_until(lambda r: bool(r.events("ready"))
                       and len(r.events("gen")) == args.generations + 1, t)
        return {m["pid"]: f"gen {m['gen']}" for m in run.events("gen")}
    run.read_until(lambda r: bool(r.events("mapped")), t)
    time.sleep(args.go_delay)
    run.send(b"s")
    run.read_until(lambda r: bool(r.events("split")), t)
    # The traced command (a shell that exec'd splits in place) is anontrace's child.
    kids = Path(f"/proc/{run.proc.pid}/task/{run.proc.pid}/children").read_text().split()
    if len(kids) != 1:
        raise RunFailed(f"expected one child of anontrace, found {kids}")
    return {int(kids[0]): "splits"}


def one_run(args: argparse.Namespace, prog: Any, bins: dict[str, Path], method: str,
            index: int, scratch: Path) -> RunResult:
    res = RunResult(method, index)
    start = time.monotonic()
    cli = [sys.executable, "-m", "tracer"]
    if args.record_dir:
        res.recording = Path(args.record_dir) / f"{method}-{index}.atr"
        cli += ["record", "-o", str(res.recording)]
    if args.workload == "forkchain":
        workload = [str(bins["forkchain"]), str(args.regions), str(args.generations), "touch"]
    else:
        workload = [str(bins["splits"]), str(args.pages)]
    argv = cli + ["--json", "-i", str(args.interval), "--backend", method, "--", *workload]
    run = Anontrace(argv, scratch / f"{method}-{index}.stderr", Path(args.tree))
    try:
        family = _family(args, run)
        still_since = time.time()
        res.pids = family

        def on_report(i: int) -> bool:
            rep = run.reports[i]
            if rep["final"] or rep["time"] < still_since + args.settle:
                return False
            compare(res, prog, rep, i)
            res.compared_reports += 1
            return res.compared_reports >= args.reports

        run.read_until(lambda r: res.compared_reports >= args.reports,
                       args.timeout + args.reports * args.interval, on_report)
    except (RunFailed, EOFError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        run.kill()
    else:
        eof = time.time()
        res.exit_status = run.finish(args.timeout)
        if res.exit_status != 0:
            res.error = f"anontrace exited {res.exit_status}"
        exit_window(res, run.reports, eof)
    if res.error:
        tail = (scratch / f"{method}-{index}.stderr").read_text(errors="replace")[-2000:]
        res.error += f"\n    stderr: {tail.strip()}" if tail.strip() else ""
    res.seconds = time.monotonic() - start
    return res


def compare(res: RunResult, prog: Any, report: dict[str, Any], index: int) -> None:
    """Compare one report with drgn's walk of the family's pids, now."""
    by_pid = {p["pid"]: p for p in report["processes"] if p["alive"]}
    pids = sorted(set(by_pid) | set(res.pids))
    walked = time.time()
    truth = {pid: walk_pid(prog, pid) for pid in pids}
    for pid in pids:
        walk = truth[pid]
        if "error" in walk:
            # Listed alive by anontrace, gone from the kernel: not a held family.
            res.error = f"drgn could not walk pid {pid}: {walk['error']}"
            continue
        want = drgn_figures(walk)
        res.held[pid] = want
        row = by_pid.get(pid)
        got = None if row is None else {k: row[k] for k in FIELDS}
        res.compared_processes += 1
        if got != want:
            res.mismatches.append(Mismatch(
                res.run, index, pid, res.pids.get(pid, walk.get("comm", "?")), got, want,
                report["lost_events"], report["partial"], walked - report["time"]))


def exit_window(res: RunResult, reports: list[dict[str, Any]], eof: float) -> None:
    """Interval reports made after stdin closed that still list a family
    process alive: its figures must be those it held (drgn cannot walk an
    exiting process, its task->mm is already NULL). Before v6.16 exit_mm()
    tears the mm down before sched_process_exit; a report made in between
    must not show a shrinking mm."""
    for i, rep in enumerate(reports):
        if rep["final"] or rep["time"] < eof:
            continue
        for row in rep["processes"]:
            held = res.held.get(row["pid"])
            if not row["alive"] or held is None:
                continue
            got = {k: row[k] for k in FIELDS}
            res.exit_compared += 1
            if got != held:
                res.exit_rows.append(
                    f"  run {res.run} report {i} (after EOF) pid {row['pid']} "
                    f"({res.pids.get(row['pid'], '?')}): alive, lost={rep['lost_events']} "
                    f"partial={'yes' if rep['partial'] else 'no'}, {got}; held {held}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="fentry,kprobe",
                   help="comma-separated backends to compare (default: fentry,kprobe)")
    p.add_argument("--runs", type=int, default=10, help="runs per method (default 10)")
    p.add_argument("--workload", choices=("forkchain", "splits"), default="forkchain")
    p.add_argument("--regions", type=int, default=3, help="forkchain REGIONS (default 3)")
    p.add_argument("--generations", type=int, default=5,
                   help="forkchain GENERATIONS (default 5)")
    p.add_argument("--pages", type=int, default=32, help="splits PAGES (default 32)")
    p.add_argument("--interval", type=float, default=1.0, help="anontrace -i (default 1)")
    p.add_argument("--reports", type=int, default=3,
                   help="interval reports compared per run while the family is held (default 3)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="compare only reports made this long after the family was still")
    p.add_argument("--go-delay", type=float, default=0.0,
                   help="seconds to wait before letting the workload build its shape "
                   "(forkchain's 'g', splits' byte), so that reports come in between")
    p.add_argument("--tree", default=str(REPO),
                   help="checkout whose `python -m tracer` runs (default: this one)")
    p.add_argument("--vmlinux", default=DEFAULT_VMLINUX, help="DWARF vmlinux for drgn")
    p.add_argument("--timeout", type=float, default=180.0, help="per step of a run (seconds)")
    p.add_argument("--record-dir", help="run `anontrace record -o DIR/METHOD-RUN.atr` and "
                   "keep the recordings of runs with a mismatch or rows after EOF")
    p.add_argument("--keep-recordings", action="store_true",
                   help="with --record-dir: keep every recording")
    p.add_argument("--bin-dir", help="where to build the workloads (default: a temp dir)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.runs < 1 or args.reports < 1:
        p.error("--runs and --reports must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("drgn_compare: run as root (BPF and drgn on /proc/kcore)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="drgn_compare."))
    bin_dir = Path(args.bin_dir) if args.bin_dir else scratch
    bin_dir.mkdir(parents=True, exist_ok=True)
    if args.record_dir:
        Path(args.record_dir).mkdir(parents=True, exist_ok=True)
    bins = build_workloads(bin_dir)
    t0 = time.monotonic()
    prog = load_program(args.vmlinux)
    print(f"drgn_compare: kernel {os.uname().release}, drgn debug info loaded in "
          f"{time.monotonic() - t0:.1f} s; tree {args.tree}; workload {args.workload}; "
          f"{args.runs} runs per method {','.join(args.methods)}", flush=True)

    results: dict[str, list[RunResult]] = {}
    for method in args.methods:
        for i in range(1, args.runs + 1):
            res = one_run(args, prog, bins, method, i, scratch)
            results.setdefault(method, []).append(res)
            roles = " ".join(f"{pid}={role.replace(' ', '')}"
                             for pid, role in sorted(res.pids.items()))
            line = (f"{method} run {i}/{args.runs}: {len(res.pids)} pids [{roles}], "
                    f"{res.compared_reports} reports compared ({res.compared_processes} "
                    f"processes), {len(res.mismatches)} mismatches, {res.seconds:.1f} s")
            if res.error:
                line += f"; FAILED: {res.error}"
            line += (f"; {res.exit_compared} rows after EOF compared, "
                     f"{len(res.exit_rows)} differ")
            for m in res.mismatches:
                line += "\n" + m.describe()
            for row in res.exit_rows:
                line += "\n" + row
            if res.recording is not None:
                keep = args.keep_recordings or res.mismatches or res.exit_rows or res.error
                if keep:
                    line += f"\n  recording: {res.recording}"
                elif res.recording.exists():
                    res.recording.unlink()
            print(line, flush=True)

    print()
    status = 0
    for method, runs in results.items():
        reports = sum(r.compared_reports for r in runs)
        mismatches = [m for r in runs for m in r.mismatches]
        failed = [r for r in runs if r.error]
        print(f"{method}: {len(runs)} runs, {reports} reports compared, "
              f"{len(mismatches)} mismatches"
              + (f", {len(failed)} runs failed" if failed else ""))
        exit_rows = [row for r in runs for row in r.exit_rows]
        exit_compared = sum(r.exit_compared for r in runs)
        print(f"  rows after EOF (process exiting, still listed alive): {exit_compared} "
              f"compared with the held figures, {len(exit_rows)} differ")
        for row in exit_rows:
            print(row)
        for m in mismatches:
            print(m.describe())
        for r in failed:
            print(f"  run {r.run} failed: {r.error}")
        if mismatches or exit_rows:
            status = max(status, 1)
        if failed:
            status = 2
    shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
