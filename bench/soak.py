#!/usr/bin/env python3
"""Soak: does `anontrace serve` hold for an hour of what production does?

One real `anontrace serve` (system-wide, as a user starts it) runs for
``--minutes`` (60) while:

* **churn**: short-lived processes with hostile names (quotes, backslashes,
  newlines, braces, invalid UTF-8; tests/workloads/churn.c) start without
  pause, 600 per batch;
* **fork storms**: every ``--storm-every`` minutes (5) a fork loop of a
  16-region process (bench/workloads/forkloop.c) runs at full speed for
  ``--storm-seconds`` (20);
* **scrapers**: ``--scrapers`` (4) clients scrape /metrics every second,
  each on its own connection, and one slow client reads its scrapes a byte
  a second.

Every ``--sample`` seconds (10) it records serve's RSS, open fds and
threads. Every scrape is timed (client side, full GET) and its labelled
per-process and per-family series are counted against the bound (top_k of
each metric). At the end it prints, for the samples after the first
``--warmup`` minutes (5), the least-squares slope per hour of RSS, fds and
threads, the scrape latency (median, p95, max), failed scrapes, the most
labelled series seen, and the targets of issue 13: RSS growth <= 5 MB/hour,
fds and threads flat, series never above the bound, 0 failed scrapes.

    sudo .venv/bin/python bench/soak.py                    # 60 minutes
    sudo .venv/bin/python bench/soak.py --minutes 10 --json

Exit status 0, or 1 with ``--check`` when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "bench"
TOP_K = 20
RSS_SLOPE_TARGET_MB_H = 5.0
# Metrics with per-process or per-family labels: each bounded by top_k.
LABELLED = ("anontrace_process_", "anontrace_family_")


def build(src: Path) -> Path:
    out = BUILD / src.stem
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def labelled_series(body: str) -> dict[str, int]:
    """Per labelled metric name, how many series a scrape holds."""
    out: dict[str, int] = {}
    for line in body.splitlines():
        if line.startswith(LABELLED) and "{" in line:
            name = line.split("{", 1)[0]
            out[name] = out.get(name, 0) + 1
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 3600


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.max_series: dict[str, int] = {}
        self.samples: list[dict[str, float]] = []
        self.storms = 0
        self.churned = 0
        self.slow_bytes = 0
        self.work = Path(tempfile.mkdtemp(prefix="anontrace-soak-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        config = self.work / "anontrace.yaml"
        config.write_text(f"top_k: {TOP_K}\nexited_expiry: 1m\n")
        self.log = open(self.work / "serve.log", "w+b")
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "tracer", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{self.port}"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                break
            except OSError as exc:
                if self.serve.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"soak: serve did not start: {self.serve_log()}") from exc
                time.sleep(0.5)
        self.started = time.monotonic()

    def serve_log(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    # -- load ---------------------------------------------------------------
    def churn(self, binary: Path) -> None:
        while not self.stop.is_set():
            subprocess.run([str(binary), "600", "50", "2"], stdout=subprocess.DEVNULL,
                           check=False)
            self.churned += 600

    def storms_loop(self, forkloop: Path) -> None:
        every = self.args.storm_every * 60
        while not self.stop.wait(every):
            # forkloop SECONDS REGIONS: EOF on stdin starts the loop at once.
            p = subprocess.Popen([str(forkloop), f"{self.args.storm_seconds:g}", "16"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            while p.poll() is None and not self.stop.wait(0.5):
                pass
            if p.poll() is None:
                p.kill()
            p.wait()
            self.storms += 1

    def scraper(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    body = r.read().decode()
                ms = (time.perf_counter() - t) * 1000
                series = labelled_series(body)
                with self.lock:
                    self.latencies.append(ms)
                    for k, v in series.items():
                        self.max_series[k] = max(self.max_series.get(k, 0), v)
            except (OSError, ValueError) as exc:
                with self.lock:
                    self.failures.append(f"{time.monotonic() - self.started:.0f}s: {exc}")
            self.stop.wait(1.0)

    def slow_client(self) -> None:
        """GET /metrics, then read the answer a byte a second; again."""
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                    for _ in range(120):
                        if self.stop.wait(1.0):
                            return
                        if not s.recv(1):
                            break
                        self.slow_bytes += 1
            except OSError:
                self.stop.wait(1.0)

    def sampler(self) -> None:
        while not self.stop.is_set():
            try:
                s = proc_sample(self.serve.pid)
            except (OSError, KeyError):
                return
            s["t"] = time.monotonic() - self.started
            self.samples.append(s)
            self.stop.wait(self.args.sample)

    # -- run ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        churn = build(REPO / "tests" / "workloads" / "churn.c")
        forkloop = build(REPO / "bench" / "workloads" / "forkloop.c")
        threads = [threading.Thread(target=self.churn, args=(churn,), daemon=True),
                   threading.Thread(target=self.storms_loop, args=(forkloop,), daemon=True),
                   threading.Thread(target=self.slow_client, daemon=True),
                   threading.Thread(target=self.sampler, daemon=True)]
        threads += [threading.Thread(target=self.scraper, daemon=True)
                    for _ in range(self.args.scrapers)]
        for t in threads:
            t.start()
        end = self.started + self.args.minutes * 60
        try:
            while time.monotonic() < end and self.serve.poll() is None:
                time.sleep(min(10.0, max(0.0, end - time.monotonic())))
                if not self.args.json:
                    last = self.samples[-1] if self.samples else {}
                    print(f"soak: {(time.monotonic() - self.started) / 60:5.1f} min  "
                          f"rss {last.get('rss_mb', 0):6.1f} MB  fds {last.get('fds', 0):3.0f}  "
                          f"threads {last.get('threads', 0):3.0f}  scrapes "
                          f"{len(self.latencies)}  failed {len(self.failures)}  "
                          f"storms {self.storms}", file=sys.stderr, flush=True)
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=30)
            alive = self.serve.poll() is None
            if alive:
                self.serve.terminate()
            code = self.serve.wait(timeout=60)
        return self.summary(alive, code)

    def summary(self, alive: bool, code: int) -> dict[str, Any]:
        warm = self.args.warmup * 60
        after = [s for s in self.samples if s["t"] >= warm] or self.samples
        lat = sorted(self.latencies)
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
        rss_slope = slope_per_hour([(s["t"], s["rss_mb"]) for s in after])
        fds = [s["fds"] for s in after]
        thr = [s["threads"] for s in after]
        out = {
            "minutes": self.args.minutes, "warmup_minutes": self.args.warmup,
            "samples": len(self.samples), "scrapes": len(lat), "failed_scrapes": len(self.failures),
            "failures": self.failures[:10],
            "scrape_ms": {"median": statistics.median(lat) if lat else None, "p95": p95,
                          "max": lat[-1] if lat else None},
            "rss_mb": {"first": after[0]["rss_mb"] if after else None,
                       "last": after[-1]["rss_mb"] if after else None,
                       "max": max((s["rss_mb"] for s in self.samples), default=None),
                       "slope_per_hour": rss_slope},
            "fds": {"min": min(fds, default=0), "max": max(fds, default=0),
                    "slope_per_hour": slope_per_hour([(s["t"], s["fds"]) for s in after])},
            "threads": {"min": min(thr, default=0), "max": max(thr, default=0),
                        "slope_per_hour": slope_per_hour([(s["t"], s["threads"])
                                                          for s in after])},
            "max_labelled_series": self.max_series, "series_bound": TOP_K,
            "storms": self.storms, "churned_processes": self.churned,
            "slow_client_bytes": self.slow_bytes,
            "serve_alive_at_end": alive, "serve_exit_status": code,
        }
        checks = {
            "rss growth <= 5 MB/hour": rss_slope <= RSS_SLOPE_TARGET_MB_H,
            "fds flat": out["fds"]["max"] - out["fds"]["min"] <= 4,
            "threads flat": out["threads"]["max"] - out["threads"]["min"] <= 4,
            "series within top_k": all(v <= TOP_K for v in self.max_series.values()),
            "0 failed scrapes": not self.failures,
            "serve alive and exits 0": alive and code == 0,
        }
        out["checks"] = checks
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=5, help="minutes left out of the slopes")
    ap.add_argument("--scrapers", type=int, default=4)
    ap.add_argument("--storm-every", type=float, default=5, help="minutes between fork storms")
    ap.add_argument("--storm-seconds", type=float, default=20)
    ap.add_argument("--sample", type=float, default=10, help="seconds between samples")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: run as root (anontrace serve loads BPF programs)", file=sys.stderr)
        return 2
    result = Soak(args).run()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"soak: {r['minutes']:g} min, {r['scrapes']} scrapes ({r['failed_scrapes']} "
              f"failed), {r['storms']} fork storms, {r['churned_processes']} churned processes")
        print(f"  rss      first {r['rss_mb']['first']:.1f} MB, last {r['rss_mb']['last']:.1f} "
              f"MB, max {r['rss_mb']['max']:.1f} MB, slope {r['rss_mb']['slope_per_hour']:+.2f} "
              f"MB/hour (after {r['warmup_minutes']:g} min)")
        for k in ("fds", "threads"):
            print(f"  {k:8} {r[k]['min']:.0f}..{r[k]['max']:.0f}, slope "
                  f"{r[k]['slope_per_hour']:+.2f}/hour")
        s = r["scrape_ms"]
        print(f"  scrape   median {s['median']:.1f} ms, p95 {s['p95']:.1f} ms, "
              f"max {s['max']:.1f} ms")
        most = max(r["max_labelled_series"].values(), default=0)
        print(f"  series   max per labelled metric {most} (bound {r['series_bound']})")
        for name, ok in r["checks"].items():
            print(f"  {'ok  ' if ok else 'MISS'} {name}")
    return 1 if args.check and not all(result["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
