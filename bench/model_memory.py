#!/usr/bin/env python3
"""Benchmark: memory the model holds per live anon_vma.

Feeds a fresh ``Model`` ``--anon-vmas`` ANON_VMA_FORK events (1,000,000 by
default) spread over ``--procs`` processes (4,000: 250 VMAs each), each
event with a distinct anon_vma and a distinct VMA, and measures what the
model then holds, divided by the live anon_vmas. Each ANON_VMA_FORK also
records a VMA, so the per-anon_vma figure includes its VMA.

The stream looks like a fentry recording: kernel pointers in the direct map
(0xffff8881........, so every pointer is a 64-bit int object), user addresses
0x7f..., processes forked as a binary tree (process p's parent is (p-1)//2),
each VMA's anon_vma child of the parent process's anon_vma for the same VMA
(depth = generation + 1, root = generation 0's), PROC_FORK after the fork's
ANON_VMA_FORK events, like the kernel. Events go through the wire decoder
(tracer.format.events.decode), so the model keeps exactly the objects a replay
would give it.

Two passes, each in a fresh interpreter:

* ``rss``:         resident set growth while feeding (no tracemalloc);
* ``tracemalloc``: bytes allocated and still held after feeding, with a
                   breakdown by allocating source line, plus a size
                   breakdown (sys.getsizeof of the model's dicts, ``array``
                   columns and the int objects they hold; reads the model's
                   private storage, see tracer/model/hierarchy.py).

Examples::

    .venv/bin/python bench/model_memory.py
    .venv/bin/python bench/model_memory.py --anon-vmas 200000 --json

Exit status: 0, or 1 with ``--check`` when bytes/anon_vma (tracemalloc)
exceeds ``--target`` (250).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracer.format.events import WIRE, Event, Kind, decode  # noqa: E402
from tracer.model.hierarchy import Model  # noqa: E402

TARGET = 250
LAUNCHER_PID = 1000
AV_BASE = 0xffff888104000000     # anon_vma slab, 0xd0 apart
VMA_BASE = 0xffff888180000000    # vm_area_struct slab, 0xb8 apart
MM_BASE = 0xffff888160000000     # mm_struct slab
COMM = b"forkchain"


def stream(n_avs: int, n_procs: int) -> Iterator[Event]:
    """The events, computed on the fly (nothing kept here: the only memory
    left behind is what the model holds)."""
    per = -(-n_avs // n_procs)

    def av_ptr(p: int, i: int) -> int:
        return AV_BASE + (p * per + i) * 0xd0

    ts = 10**9
    for p in range(n_procs):
        pid, mm = LAUNCHER_PID + 1 + p, MM_BASE + p * 0x480
        depth = (p + 1).bit_length()          # generation + 1 in the binary tree
        q = (p - 1) // 2
        ppid = LAUNCHER_PID + 1 + q if p else LAUNCHER_PID
        pmm = MM_BASE + q * 0x480 if p else MM_BASE - 0x480
        for i in range(max(0, min(per, n_avs - p * per))):
            n = p * per + i
            av, vma = av_ptr(p, i), VMA_BASE + n * 0xb8
            start = 0x7f0000000000 + i * 0x200000
            parent = av_ptr(q, i) if p else av
            root = av_ptr(0, i)
            ts += 1000
            # generation 0's anon_vmas are roots, made in its own context
            yield decode(WIRE.pack(ts, mm, pmm if p else mm, vma, start, start + 0x21000, av,
                                   parent, root, 0, 0, 0, 1, Kind.ANON_VMA_FORK,
                                   ppid if p else pid, ppid if p else pid, depth, depth, 0, 0,
                                   0, 0, 0, COMM))
        ts += 1000
        yield decode(WIRE.pack(ts, mm, pmm, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, Kind.PROC_FORK, ppid,
                               ppid, 0, 0, 0, pid, pid, 0, 0, COMM))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def new_model() -> Model:
    m = Model()
    m.add_process(LAUNCHER_PID, "launcher", 1, preexisting=True)
    return m


def pass_rss(args: argparse.Namespace) -> dict:
    gc.collect()
    before = rss_bytes()
    m = new_model()
    t0 = time.perf_counter()
    for ev in stream(args.anon_vmas, args.procs):
        m.apply(ev)
    secs = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    return {"rss_delta": after - before, "live_anon_vmas": len(m.anon_vmas),
            "vmas": m.vma_count(), "mms": len(m.mms), "processes": len(m.processes),
            "feed_seconds": round(secs, 2)}


def _size_breakdown(m: Model) -> dict[str, int]:
    """sys.getsizeof of what the model holds, grouped (ints counted once)."""
    seen: set[int] = set()

    def intsz(v: object) -> int:
        if not isinstance(v, int) or -5 <= v <= 256 or id(v) in seen:
            return 0  # small ints are shared singletons
        seen.add(id(v))
        return sys.getsizeof(v)

    out = {"anon_vma dict (Model._avs)": sys.getsizeof(m._avs),
           "anon_vma columns (arrays)": 0, "Mm.vmas dicts": 0, "anon_vma key ints": 0,
           "anon_vma id ints (not shared with a VMA)": 0, "VMA key ints": 0,
           "VMA packed value ints": 0, "Mm + Process objects": 0}
    for col in (m._ptr, m._parent, m._root, m._avmm, m._depth, m._children, m._active,
                m._serial, m._plink):
        out["anon_vma columns (arrays)"] += sys.getsizeof(col)
    for mm in m.mms.values():
        out["Mm.vmas dicts"] += sys.getsizeof(mm.vmas)
        for k, v in mm.vmas.items():
            out["VMA key ints"] += intsz(k)
            out["VMA packed value ints"] += intsz(v)
        out["Mm + Process objects"] += sys.getsizeof(mm) + sys.getsizeof(mm.events)
    for k, v in m._avs.items():
        out["anon_vma key ints"] += intsz(k)
        out["anon_vma id ints (not shared with a VMA)"] += intsz(v)
    for p in m.processes.values():
        out["Mm + Process objects"] += sys.getsizeof(p) + sys.getsizeof(p.__dict__) \
            + sys.getsizeof(p.mms)
    return out


def pass_tracemalloc(args: argparse.Namespace) -> dict:
    events = stream(args.anon_vmas, args.procs)
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.take_snapshot()
    base_bytes = tracemalloc.get_traced_memory()[0]
    m = new_model()
    for ev in events:
        m.apply(ev)
    del ev
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base_bytes
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = snap.filter_traces(filt).compare_to(base.filter_traces(filt), "lineno")
    lines = []
    for st in stats[:args.top]:
        if st.size_diff <= 0:
            continue
        fr = st.traceback[0]
        src = ""
        try:
            src = Path(fr.filename).read_text().splitlines()[fr.lineno - 1].strip()
        except (OSError, IndexError):
            pass
        if fr.filename.endswith(os.path.join("tracer", "events.py")):
            # The int objects of the decoded fields the model keeps (tracemalloc
            # names whatever line of decode() was running, not the unpack).
            src = "(ints decoded from the wire: pointers, vm_start/vm_end)"
        lines.append({"where": f"{os.path.relpath(fr.filename)}:{fr.lineno}", "source": src,
                      "bytes": st.size_diff, "blocks": st.count_diff})
    live = len(m.anon_vmas)
    return {"held": held, "live_anon_vmas": live, "vmas": m.vma_count(), "mms": len(m.mms),
            "processes": len(m.processes), "by_line": lines, "by_object": _size_breakdown(m)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anon-vmas", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=4000)
    ap.add_argument("--target", type=float, default=TARGET, help="bytes per live anon_vma")
    ap.add_argument("--top", type=int, default=12, help="source lines in the breakdown")
    ap.add_argument("--pass", dest="which", choices=("rss", "tracemalloc"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    if args.which:
        res = pass_rss(args) if args.which == "rss" else pass_tracemalloc(args)
        print(json.dumps(res))
        return 0

    res = {"anon_vmas": args.anon_vmas, "procs": args.procs, "target": args.target}
    for which in ("rss", "tracemalloc"):
        cmd = [sys.executable, __file__, "--pass", which, "--anon-vmas", str(args.anon_vmas),
               "--procs", str(args.procs), "--top", str(args.top)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[which] = json.loads(out)
    live = res["tracemalloc"]["live_anon_vmas"]
    res["bytes_per_anon_vma"] = res["tracemalloc"]["held"] / live
    res["rss_bytes_per_anon_vma"] = res["rss"]["rss_delta"] / res["rss"]["live_anon_vmas"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        t = res["tracemalloc"]
        print(f"{live:,} live anon_vmas, {t['vmas']:,} VMAs, {t['mms']:,} mms, "
              f"{t['processes']:,} processes")
        print(f"  tracemalloc: {t['held'] / 1e6:8.1f} MB held  "
              f"{res['bytes_per_anon_vma']:6.1f} bytes/anon_vma  (target {args.target:.0f})")
        print(f"  RSS delta:   {res['rss']['rss_delta'] / 1e6:8.1f} MB       "
              f"{res['rss_bytes_per_anon_vma']:6.1f} bytes/anon_vma  "
              f"(feed took {res['rss']['feed_seconds']}s)")
        print("  held, by allocating line (bytes/anon_vma):")
        for ln in t["by_line"]:
            print(f"    {ln['bytes'] / live:7.1f}  {ln['where']:<26} {ln['source'][:70]}")
        print("  held, by object (sys.getsizeof, bytes/anon_vma):")
        tot = 0
        for k, v in sorted(t["by_object"].items(), key=lambda kv: -kv[1]):
            tot += v
            print(f"    {v / live:7.1f}  {k}")
        print(f"    {tot / live:7.1f}  total (getsizeof; pymalloc rounds blocks up to 16 bytes)")
    return 1 if args.check and res["bytes_per_anon_vma"] > args.target else 0


if __name__ == "__main__":
    sys.exit(main())
