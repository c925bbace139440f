#!/usr/bin/env python3
"""Benchmark: what a scrape of `anontrace serve` costs, and its memory.

One run, three phases against one real `anontrace serve` (system-wide):

1. ``idle``:  the host as it is: scrape /metrics ``--scrapes`` times;
2. ``procs``: plus ``--procs`` (10,000) live processes, each with 4 written
   anonymous regions (bench/workloads/idlers.c), once serve tracks them all:
   scrape again;
3. ``forkloop``: plus a fork loop at full speed (bench/workloads/forkloop.c,
   16 regions) for ``--seconds``, scraping every second, sampling serve's
   RSS every 0.2 s.

It prints scrape latency (median, p95, max; client-side, full HTTP GET)
per phase with the ratio to ``idle``, serve's peak RSS per phase with the
ratio to ``idle``, and checks the targets (issue 9, state in BPF maps):
scrape p95 <= 20 ms at 10,000 processes, before and during the fork loop;
RSS <= 120 MB; nothing lost during the fork loop.

Examples::

    sudo .venv/bin/python bench/serve_scrape.py
    sudo .venv/bin/python bench/serve_scrape.py --procs 2000 --seconds 10 --json

Exit status: 0, or 1 with ``--check`` when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "bench"
SCRAPE_TARGET_MS = 20.0
RSS_TARGET_MB = 120.0


def build(name: str) -> Path:
    src, out = REPO / "bench" / "workloads" / f"{name}.c", BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Serve:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer", "serve", "--listen", f"127.0.0.1:{self.port}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.scrape()
                return
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise SystemExit(
                        f"serve_scrape: anontrace serve did not start: {err}") from exc
                time.sleep(0.5)

    def scrape(self) -> tuple[float, str]:
        t = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=30) as r:
            body = r.read().decode()
        return (time.perf_counter() - t) * 1000, body

    def value(self, body: str, name: str) -> float:
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def scrapes(serve: Serve, n: int) -> tuple[list[float], str]:
    times, body = [], ""
    for _ in range(n):
        ms, body = serve.scrape()
        times.append(ms)
        time.sleep(0.05)
    return times, body


def summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 2),
            "max_ms": round(times[-1], 2), "n": len(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("serve_scrape: run as root (anontrace serve loads BPF programs)")
    idlers_bin, forkloop_bin = build("idlers"), build("forkloop")

    serve = Serve()
    res: dict[str, Any] = {"kernel": os.uname().release, "procs": args.procs}
    idlers = loop = None
    try:
        time.sleep(2)
        t, body = scrapes(serve, args.scrapes)
        res["idle"] = {**summary(t), "rss_mb": round(rss_mb(serve.proc.pid), 1),
                       "tracked": serve.value(body, "anontrace_tracked_processes"),
                       "series": sum(1 for ln in body.splitlines() if ln and ln[0] != "#")}

        idlers = subprocess.Popen([str(idlers_bin), str(args.procs)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        assert idlers.stdout is not None
        ready, _, _ = select.select([idlers.stdout], [], [], 600)
        if not ready:
            raise SystemExit("serve_scrape: idlers did not get ready")
        json.loads(idlers.stdout.readline())
        base = res["idle"]["tracked"]
        deadline = time.monotonic() + 300
        while True:
            _, body = serve.scrape()
            tracked = serve.value(body, "anontrace_tracked_processes")
            if tracked >= base + args.procs * 0.99 or time.monotonic() > deadline:
                break
            time.sleep(1)
        t, body = scrapes(serve, args.scrapes)
        res["procs_phase"] = {**summary(t), "rss_mb": round(rss_mb(serve.proc.pid), 1),
                              "tracked": serve.value(body, "anontrace_tracked_processes"),
                              "anon_vmas": serve.value(body, "anontrace_anon_vmas"),
                              "series": sum(1 for ln in body.splitlines()
                                            if ln and ln[0] != "#")}

        loop = subprocess.Popen([str(forkloop_bin), str(args.seconds), "16", "4"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert loop.stdout is not None and loop.stdin is not None
        json.loads(loop.stdout.readline())
        loop.stdin.write(b"g")
        loop.stdin.close()
        peak, stop = [0.0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(serve.proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t = []
        while loop.poll() is None:
            ms, body = serve.scrape()
            t.append(ms)
            time.sleep(1)
        stop.set()
        sampler.join()
        done = json.loads(loop.stdout.readline() or b"{}")
        res["forkloop"] = {**summary(t), "rss_peak_mb": round(peak[0], 1),
                           "forks_per_s": done.get("forks_per_s"),
                           "lost_events": serve.value(body, "anontrace_lost_events_total"),
                           "tracked": serve.value(body, "anontrace_tracked_processes")}
    finally:
        for p in (loop, idlers):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        res["serve_exit"] = serve.stop()

    idle = res["idle"]["median_ms"] or 1e-9
    res["ratios"] = {"scrape_procs_vs_idle": round(res["procs_phase"]["median_ms"] / idle, 2),
                     "scrape_forkloop_vs_idle": round(res["forkloop"]["median_ms"] / idle, 2),
                     "rss_peak_vs_idle": round(res["forkloop"]["rss_peak_mb"] /
                                               (res["idle"]["rss_mb"] or 1e-9), 2)}
    ok_scrape = max(res["procs_phase"]["p95_ms"], res["forkloop"]["p95_ms"]) <= SCRAPE_TARGET_MS
    ok_rss = max(res["forkloop"]["rss_peak_mb"], res["procs_phase"]["rss_mb"]) <= RSS_TARGET_MB
    ok_lost = res["forkloop"]["lost_events"] == 0
    res["targets"] = {"scrape_p95_le_20ms": ok_scrape, "rss_le_120mb": ok_rss,
                      "nothing_lost": ok_lost}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"anontrace serve on {res['kernel']}, {args.procs} extra live processes")
        for phase in ("idle", "procs_phase", "forkloop"):
            r = res[phase]
            rss = r.get("rss_mb", r.get("rss_peak_mb"))
            print(f"  {phase:<12} scrape median {r['median_ms']:>7.2f} ms  p95 {r['p95_ms']:>7.2f}"
                  f"  max {r['max_ms']:>7.2f}  RSS {rss:>6.1f} MB  tracked {r['tracked']:.0f}")
        print(f"  fork loop: {res['forkloop']['forks_per_s']} forks/s, lost events "
              f"{res['forkloop']['lost_events']:.0f}")
        print(f"  ratios: {res['ratios']}")
        print(f"  targets: scrape p95 <= {SCRAPE_TARGET_MS} ms at {args.procs} processes "
              f"(and during the loop): {'met' if ok_scrape else 'MISSED'}; RSS <= "
              f"{RSS_TARGET_MB} MB: {'met' if ok_rss else 'MISSED'}; nothing lost: "
              f"{'met' if ok_lost else 'MISSED'}")
    return 0 if (ok_scrape and ok_rss and ok_lost) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
