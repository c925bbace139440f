#!/usr/bin/env python3
"""Benchmark: what one rmap census costs, beside what a user-space tool
pays to merely list the same VMAs.

One run, the host as it is plus ``--procs`` live processes with 4 written
anonymous regions each (bench/workloads/idlers.c), interleaved ``--rounds``
times:

* ``census``: ``RmapCensus.run()`` (bpf_programs/rmap.bpf.c): every VMA's
  chain walked, every anon_vma's rmap width counted, the map read back;
* ``tree``: ``anontrace tree PID`` end to end, as a user starts it (one
  process of the idlers; compile and load included);
* ``proc-maps`` (the nearest peer): reading /proc/PID/maps of every process,
  which lists the VMAs but knows nothing of anon_vmas or chains.

Prints the median seconds of each, VMAs and anon_vmas counted, and the
census's cost per 1,000 VMAs and its ratio to the /proc read.

    sudo .venv/bin/python bench/rmap_census.py [--procs 10000] [--rounds 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import build_workload  # noqa: E402
from tracer.kernel.rmap_census import RmapCensus  # noqa: E402


def read_all_maps() -> int:
    """Read every process's /proc/PID/maps; returns the VMAs listed."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/maps") as f:
                    n += sum(1 for _ in f)
            except OSError:
                pass
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("rmap_census: run as root (the census loads a BPF iterator)")
    idlers = subprocess.Popen([str(build_workload("idlers", ROOT / "bench" / "workloads")),
                               str(args.procs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    res: dict[str, Any] = {"kernel": os.uname().release, "procs": args.procs}
    try:
        assert idlers.stdout is not None
        ready, _, _ = select.select([idlers.stdout], [], [], 600)
        if not ready:
            raise SystemExit("rmap_census: idlers did not get ready")
        json.loads(idlers.stdout.readline())
        target = str(idlers.pid)
        times: dict[str, list[float]] = {"census": [], "tree": [], "proc-maps": []}
        with RmapCensus() as census:
            for _ in range(args.rounds):
                t = time.monotonic()
                snap = census.run()
                times["census"].append(time.monotonic() - t)
                t = time.monotonic()
                res["maps_vmas"] = read_all_maps()
                times["proc-maps"].append(time.monotonic() - t)
                t = time.monotonic()
                subprocess.run([sys.executable, "-m", "tracer", "tree", target], cwd=ROOT,
                               check=True, capture_output=True)
                times["tree"].append(time.monotonic() - t)
        res.update(vmas=snap.vmas, anon_vmas=len(snap.anon_vmas),
                   chain_entries=snap.chain_entries, complete=snap.complete)
        med = {k: statistics.median(v) for k, v in times.items()}
        res["median_s"] = {k: round(v, 4) for k, v in med.items()}
        res["census_ms_per_1000_vmas"] = round(1000 * med["census"] / max(1, snap.vmas) * 1000, 3)
        res["census_vs_proc_maps"] = round(med["census"] / med["proc-maps"], 3)
    finally:
        if idlers.stdin is not None:
            idlers.stdin.close()
        idlers.wait(timeout=120)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"kernel {res['kernel']}: {args.procs} idlers + the host: {res['vmas']} VMAs with "
              f"an anon_vma, {res['anon_vmas']} anon_vmas, {res['chain_entries']} chain "
              f"entries (complete: {res['complete']}); /proc lists {res['maps_vmas']} VMAs")
        for k, v in res["median_s"].items():
            print(f"  {k:<10} median {v * 1000:9.1f} ms over {args.rounds} rounds")
        print(f"  census: {res['census_ms_per_1000_vmas']} ms per 1,000 VMAs; "
              f"{res['census_vs_proc_maps']}x the time of reading every /proc/PID/maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
