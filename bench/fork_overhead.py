#!/usr/bin/env python3
"""Benchmark: what tracing costs a fork-heavy process.

Runs bench/workloads/forkloop.c (16 separate anonymous VMAs, every page
written, then fork(); child _exit(0); parent waitpid() in a loop) untraced and
traced, interleaved in one run, and compares fork throughput.

"Traced" means a TraceSession is open for the chosen backend and a thread
consumes its events with session.poll() continuously, like the real tool.
Variants:

* ``untraced``: no session;
* ``system``:   a system-wide session (no pid filter);
* ``pid``:      a session filtered to the workload's pid (children followed).

Profiling variants (not part of the default set):

* ``nopoll``:   a system-wide session that nobody polls: the in-kernel cost
                alone (the ring buffer fills up, so "lost" is expected there);
* ``empty``:    the same attach points (raw kmem_cache_alloc/free, sys_exit,
                exit_mmap and sched tracepoints) with programs that return at
                once: the fixed price of having those hooks enabled at all,
                the floor for any tracer built on them (printed as such).

Rounds use ABBA ordering (even rounds run the variants in order, odd rounds in
reverse) so slow drift of the machine does not favour one variant.

Examples::

    sudo .venv/bin/python bench/fork_overhead.py --backend auto --seconds 3 --rounds 5
    sudo .venv/bin/python bench/fork_overhead.py --json --variants untraced,system
    # inside the 6.12 guest (TCG is about 10x slower)
    .venv/bin/python tests/guest/boot.py --kernel 6.12 --timeout 1200 -- \\
        '/work/main/.venv/bin/python bench/fork_overhead.py --backend fentry --rounds 3'

With ``--bpf-stats`` the kernel's BPF run-time statistics are switched on
(sysctl kernel.bpf_stats_enabled, which itself adds a little cost) and the
in-kernel time of every program of the session is reported per fork.

Exit status: 0, or 1 with ``--check`` when the system-wide ratio misses
``--target`` or any event was lost; 2 on a setup error (not root, no gcc...).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO / "bench" / "workloads" / "forkloop.c"
BUILD_DIR = REPO / "build" / "bench"
BINARY = BUILD_DIR / "forkloop"
VARIANTS = ("untraced", "system", "pid", "nopoll", "empty")


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


# ------------------------------------------------------------------ noise
def _busy_s() -> float:
    """CPU time spent by the whole machine (all CPUs, not idle/iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Noise:
    """CPU used by anything but the workload and this process during a run:
    other jobs on the machine (a QEMU guest...) make the figures unreliable."""

    def __init__(self) -> None:
        self.busy0, self.self0 = _busy_s(), _self_s()

    def other_per_s(self, done: dict[str, Any]) -> float:
        busy = _busy_s() - self.busy0
        mine = _self_s() - self.self0
        wl = (done["utime_ns"] + done["stime_ns"] + done["child_utime_ns"]
              + done["child_stime_ns"]) / 1e9
        return max(0.0, busy - mine - wl) / (done["elapsed_ns"] / 1e9)


def wait_for_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (up to limit_s) until the machine is idle apart from us; returns
    the CPUs other jobs used in the last 0.5 s sample."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, s0 = _busy_s(), _self_s()
        time.sleep(0.5)
        other = max(0.0, (_busy_s() - b0) - (_self_s() - s0)) / 0.5
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
    from tracer.bpf_session import TraceOptions, TraceSession
    from tracer.events import lost_total

    wl = Workload(args.seconds, args.regions, args.pages)
    stats = BpfStats() if args.bpf_stats else None
    try:
        pids = (wl.pid,) if variant == "pid" else ()
        before = set(_bpftool_progs()) if stats else set()
        opts = TraceOptions(backend=args.backend, pids=pids, transport=args.transport)
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
    # Certain losses only, as the tool counts them: recursion misses are
    # system-wide maybe-losses (tracer.events.MAYBE_LOST), kept in res.lost.
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


# The hooks the tracepoint backend attaches, with programs that return at
# once: the floor any kmem-based tracer pays on a kernel without kprobes and
# fentry. kmem_cache_alloc/free fire for every slab object the kernel
# allocates (about 290 per fork of forkloop), not only the rmap ones.
EMPTY_PROGRAM = r"""
RAW_TRACEPOINT_PROBE(kmem_cache_alloc) { return 0; }
RAW_TRACEPOINT_PROBE(kmem_cache_free) { return 0; }
RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
RAW_TRACEPOINT_PROBE(exit_mmap) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exec) { return 0; }
RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }
"""


def run_empty(rnd: int, args: argparse.Namespace, facts: Any) -> RunResult:
    """The tracepoint backend's hooks with do-nothing programs."""
    from tracer.bpf_session import import_bcc

    facts.headers.apply()
    bcc = import_bcc()
    wl = Workload(args.seconds, args.regions, args.pages)
    b = None
    try:
        b = bcc.BPF(text=EMPTY_PROGRAM.encode(), cflags=["-w"])
        noise = Noise()
        wl.go()
        done = wl.wait()
    finally:
        if b is not None:
            b.cleanup()
        wl.kill()
    res = _result(rnd, "empty", done)
    res.other_cpu_per_s = noise.other_per_s(done)
    return res


# ------------------------------------------------------------------ report
def _fmt_row(r: RunResult) -> str:
    if r.variant in ("untraced", "empty"):
        return (f"  {r.round:>3} {r.variant:<9} {r.forks_per_s:>10.1f} {r.forks:>8} "
                f"{'':>9} {'':>8} {'':>6} {'':>7} {'':>7} {r.other_cpu_per_s:>6.2f}")
    extra = f" {r.bpf_ns_per_fork / 1000:>8.1f}" if r.bpf_ns_per_fork is not None else ""
    return (f"  {r.round:>3} {r.variant:<9} {r.forks_per_s:>10.1f} {r.forks:>8} "
            f"{r.events:>9} {r.events_per_fork:>8.1f} {r.lost_total:>6} "
            f"{r.consumer_cpu_s:>7.2f} {r.catch_up_s:>7.2f} {r.other_cpu_per_s:>6.2f}{extra}")


def _header(bpf_stats: bool) -> str:
    extra = " bpf_us/f" if bpf_stats else ""
    return ("  rnd variant      forks/s    forks    events  ev/fork   lost  cons_s "
            f" catchup  other{extra}")


def summarize(results: list[RunResult], target: float) -> dict[str, Any]:
    by: dict[str, list[RunResult]] = collections.defaultdict(list)
    for r in results:
        by[r.variant].append(r)
    base = statistics.median(r.forks_per_s for r in by["untraced"]) if by["untraced"] else 0.0
    out: dict[str, Any] = {"median_forks_per_s": {}, "ratio": {}, "lost": {}, "events": {},
                           "events_per_fork": {}, "records": {}, "consumer_cpu_per_s": {}}
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
    out["other_cpu_per_s_max"] = round(max(r.other_cpu_per_s for r in results), 3)
    sys_ratio = out["ratio"].get("system")
    out["target"] = target
    out["meets_target"] = bool(sys_ratio is not None and sys_ratio >= target
                               and not any(out["lost"].values()))
    return out


def print_summary(summary: dict[str, Any], info: dict[str, Any], file: Any) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    p(f"summary ({info['kernel']}, backend {info.get('backend_used')} via "
      f"{info.get('transport')}, {info['seconds']} s x {info['rounds']} rounds, "
      f"{info['regions']} regions x {info['pages']} pages):")
    base = summary["median_forks_per_s"].get("untraced")
    p(f"  median forks/s untraced   {base:>10.1f}" if base is not None else "  (no baseline)")
    for v, ratio in summary["ratio"].items():
        p(f"  median forks/s {v:<10} {summary['median_forks_per_s'][v]:>10.1f}   "
          f"ratio {ratio:.3f}   lost {summary['lost'][v]}   events {summary['events'][v]} "
          f"({summary['events_per_fork'][v]}/fork)   consumer CPU "
          f"{summary['consumer_cpu_per_s'][v]:.2f} s/s"
          + (f"   BPF {summary['bpf_ns_per_fork'][v] / 1000:.1f} us/fork"
             if v in summary.get("bpf_ns_per_fork", {}) else ""))
    for v in summary["ratio"]:
        rec, lost = summary["records"].get(v, 0), summary["lost"][v]
        if rec or lost:
            p(f"  {v}: the BPF side produced {rec + lost} records, {lost} lost "
              f"({100 * lost / (rec + lost):.1f}%)")
    if "empty" in summary["ratio"]:
        p(f"  floor: the same hooks with empty programs give ratio "
          f"{summary['ratio']['empty']:.3f}; no tracer built on these hooks can do better here")
    if summary["other_cpu_per_s_max"] > 0.15:
        p(f"  WARNING: other jobs used up to {summary['other_cpu_per_s_max']:.2f} CPUs during "
          "the runs: the figures are unreliable, rerun on a quiet machine")
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
    ap.add_argument("--variants", default="untraced,system,pid",
                    help="comma-separated subset of untraced,system,pid")
    ap.add_argument("--regions", type=int, default=16)
    ap.add_argument("--pages", type=int, default=4, help="pages per region")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of untraced forking before round 1 (0: none)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                    help="before each run, wait up to this long for other jobs to go idle")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="report in-kernel BPF time per fork (enables kernel.bpf_stats_enabled)")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the system-wide ratio misses --target or events were lost")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or not args.variant_list:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fork_overhead: must run as root (loading BPF programs needs CAP_BPF, "
              "CAP_PERFMON and CAP_SYS_ADMIN): sudo .venv/bin/python bench/fork_overhead.py",
              file=sys.stderr)
        return 2
    log = sys.stderr if args.json else sys.stdout
    try:
        build_workload()
        from tracer.bpf_session import read_kernel_facts
        from tracer.errors import AnontraceError
        from tracer.kernel_env import KernelEnv
        facts = read_kernel_facts(KernelEnv()) if any(
            v != "untraced" for v in args.variant_list) else None
    except (BenchError, ImportError) as exc:
        print(f"fork_overhead: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # AnontraceError from the tracer
        print(f"fork_overhead: {exc}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                            "backend": args.backend, "seconds": args.seconds,
                            "rounds": args.rounds, "regions": args.regions,
                            "pages": args.pages, "variants": args.variant_list}
    if args.warmup > 0:
        run_untraced(0, args.warmup, args.regions, args.pages)
    results: list[RunResult] = []
    print(_header(args.bpf_stats), file=log, flush=True)
    try:
        for rnd in range(1, args.rounds + 1):
            order = args.variant_list if rnd % 2 else list(reversed(args.variant_list))
            for v in order:
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                if v == "untraced":
                    r = run_untraced(rnd, args.seconds, args.regions, args.pages)
                elif v == "empty":
                    r = run_empty(rnd, args, facts)
                else:
                    r = run_traced(rnd, v, args, facts, info)
                results.append(r)
                print(_fmt_row(r), file=log, flush=True)
    except (BenchError, AnontraceError) as exc:
        print(f"fork_overhead: {exc}", file=sys.stderr)
        return 2
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
