#!/usr/bin/env python3
"""Benchmark: how fast the model keeps up with an event stream (one core).

Builds (or, with ``--recording``, reads) a recording of a forkchain-like
family and times three stages over it:

* ``decode``: ``RecordingReader.frames()`` alone (wire records -> Events);
* ``apply``:  decode + ``Model.apply`` for every event (the fentry/kprobe
              path: no Deriver);
* ``replay``: ``tracer.commands.runner.run_replay`` end to end with a no-op emit
              (reports at every TICK frame, the final report, and the
              Deriver when the recording's backend is ``tracepoint``).

Each figure is events per second, best of ``--repeat`` runs, with its ratio to
the target (``--target``, 500,000 events/s by default). With ``--model-only``
the model is also timed alone over pre-decoded events.

The synthetic stream is consistent, like a real fentry recording (see
tests/fixtures/*/events-fentry.jsonl): families of ``--depth`` generations,
each process with ``--vmas`` anonymous VMAs. Generation 0 faults its pages in
(PAGE_SET_ANON_RMAP, new root anon_vmas); every fork clones each VMA into the
child (ANON_VMA_CLONE) and gives it a new anon_vma whose parent is the
parent's (ANON_VMA_FORK, depth and chain length one more), then PROC_FORK;
the child writes ``--pages`` pages per VMA (PAGE_SET_ANON_RMAP). When the
deepest generation is reached the family exits leaf first: per VMA
UNLINK_ANON_VMAS then AV_FREE of its anon_vma, then PROC_EXIT. Freed
pointers are reused (LIFO, like a slab). ``--kmem`` adds the AV_ALLOC,
AVC_ALLOC and AVC_FREE events the fentry backend also sends.

Examples::

    .venv/bin/python bench/replay_throughput.py
    .venv/bin/python bench/replay_throughput.py --events 500000 --repeat 1 --profile apply
    .venv/bin/python bench/replay_throughput.py --recording run.rec --stages decode,replay
    .venv/bin/python bench/replay_throughput.py --stages "" --codecs

Exit status: 0, or 1 with ``--check`` when the ``apply`` stage misses the target.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracer.format.events import WIRE, Kind, Site  # noqa: E402
from tracer.model.hierarchy import Model  # noqa: E402
from tracer.pipeline.recording import EVENTS, RecordingReader, RecordingWriter  # noqa: E402

TARGET = 500_000
LAUNCHER_PID = 1000
COMM = b"forkchain"
PAGE = 4096


class _Slab:
    """Kernel-like pointers: freed objects are reused first (LIFO)."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size, self.n, self.free = base, size, 0, []

    def alloc(self) -> int:
        if self.free:
            return self.free.pop()
        self.n += 1
        return self.base + self.n * self.size

    def release(self, ptr: int) -> None:
        self.free.append(ptr)


class StreamBuilder:
    """Writes a synthetic forkchain-family recording, frame by frame."""

    def __init__(self, writer: RecordingWriter, *, depth: int, vmas: int, pages: int,
                 kmem: bool, frame_events: int, tick_every: int) -> None:
        self.w = writer
        self.depth, self.nvmas, self.pages, self.kmem = depth, vmas, pages, kmem
        self.frame_events, self.tick_every = frame_events, tick_every
        self.buf: list[bytes] = []
        self.count = 0
        self.since_tick = 0
        self.ts = 1_000_000_000
        self.next_pid = LAUNCHER_PID + 1
        self.av_slab = _Slab(0xffff888104000000, 0xd0)    # anon_vma: 208 bytes
        self.vma_slab = _Slab(0xffff888110000000, 0xb8)   # vm_area_struct
        self.mm_slab = _Slab(0xffff888120000000, 0x480)   # mm_struct
        self.avc_slab = _Slab(0xffff888130000000, 0x40)   # anon_vma_chain
        self.launcher_mm = self.mm_slab.alloc()

    # -- one record ---------------------------------------------------------
    def ev(self, kind: int, *, mm: int = 0, cur_mm: int = 0, vma: int = 0, vm_start: int = 0,
           vm_end: int = 0, anon_vma: int = 0, parent: int = 0, root: int = 0, aux: int = 0,
           aux2: int = 0, children: int = 0, active: int = 0, tgid: int = 0, depth: int = 0,
           chain: int = 0, pid2: int = 0, site: int = 0, flags: int = 0) -> None:
        self.ts += 1500
        self.buf.append(WIRE.pack(self.ts, mm, cur_mm, vma, vm_start, vm_end, anon_vma, parent,
                                  root, aux, aux2, children, active, kind, tgid, tgid, depth,
                                  chain, 0, pid2, pid2, site, flags, COMM))
        self.count += 1
        self.since_tick += 1
        if len(self.buf) >= self.frame_events:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.w.events(b"".join(self.buf))
            self.buf = []
        if self.tick_every and self.since_tick >= self.tick_every:
            self.since_tick = 0
            self.w.tick({"time": self.ts / 1e9, "lost": {}})

    # -- one family ---------------------------------------------------------
    def family(self) -> None:
        """Generation 0 forked by the launcher, then ``depth - 1`` forks down
        the chain, then every generation exits, deepest first."""
        gens: list[dict] = []
        pid = self.next_pid
        self.next_pid += 1
        mm = self.mm_slab.alloc()
        self.ev(Kind.PROC_FORK, mm=mm, cur_mm=self.launcher_mm, tgid=LAUNCHER_PID, pid2=pid)
        vmas = []
        for i in range(self.nvmas):
            vma, av = self.vma_slab.alloc(), self.av_slab.alloc()
            start = 0x7f0000000000 + i * 0x100000
            end = start + self.pages * PAGE
            if self.kmem:
                self.ev(Kind.AVC_ALLOC, cur_mm=mm, aux=self.avc_slab.alloc(), tgid=pid,
                        site=Site.PREPARE)
                self.ev(Kind.AV_ALLOC, cur_mm=mm, anon_vma=av, tgid=pid, site=Site.PREPARE)
            for p in range(self.pages):
                self.ev(Kind.PAGE_SET_ANON_RMAP, mm=mm, cur_mm=mm, vma=vma, vm_start=start,
                        vm_end=end, anon_vma=av, parent=av, root=av, aux2=start + p * PAGE,
                        children=1, active=1, tgid=pid, depth=1, chain=1)
            vmas.append((vma, av, start, end))
        gens.append({"pid": pid, "mm": mm, "vmas": vmas, "roots": [v[1] for v in vmas]})
        for k in range(1, self.depth):
            gens.append(self._fork(gens[-1], k))
        for g in reversed(gens):
            self._exit(g)

    def _fork(self, par: dict, k: int) -> dict:
        """Generation k-1 forks generation k (anon_vma depth k+1, chains k+1)."""
        pid = self.next_pid
        self.next_pid += 1
        mm = self.mm_slab.alloc()
        vmas = []
        for i, (pvma, pav, start, end) in enumerate(par["vmas"]):
            vma, av = self.vma_slab.alloc(), self.av_slab.alloc()
            root = par["roots"][i]
            if self.kmem:
                for _ in range(k):
                    self.ev(Kind.AVC_ALLOC, cur_mm=par["mm"], aux=self.avc_slab.alloc(),
                            tgid=par["pid"], site=Site.CLONE)
            self.ev(Kind.ANON_VMA_CLONE, mm=mm, cur_mm=par["mm"], vma=vma, vm_start=start,
                    vm_end=end, aux=pvma, tgid=par["pid"], chain=k)
            if self.kmem:
                self.ev(Kind.AV_ALLOC, cur_mm=par["mm"], anon_vma=av, tgid=par["pid"],
                        site=Site.FORK)
                self.ev(Kind.AVC_ALLOC, cur_mm=par["mm"], aux=self.avc_slab.alloc(),
                        tgid=par["pid"], site=Site.FORK)
            self.ev(Kind.ANON_VMA_FORK, mm=mm, cur_mm=par["mm"], vma=vma, vm_start=start,
                    vm_end=end, anon_vma=av, parent=pav, root=root, aux=pvma, children=0,
                    active=1, tgid=par["pid"], depth=k + 1, chain=k + 1)
            vmas.append((vma, av, start, end))
        self.ev(Kind.PROC_FORK, mm=mm, cur_mm=par["mm"], tgid=par["pid"], pid2=pid)
        for i, (vma, av, start, end) in enumerate(vmas):
            for p in range(self.pages):
                self.ev(Kind.PAGE_SET_ANON_RMAP, mm=mm, cur_mm=mm, vma=vma, vm_start=start,
                        vm_end=end, anon_vma=av, parent=par["vmas"][i][1],
                        root=par["roots"][i], aux2=start + p * PAGE, active=1, tgid=pid,
                        depth=k + 1, chain=k + 1)
        return {"pid": pid, "mm": mm, "vmas": vmas, "roots": par["roots"], "depth": k + 1}

    def _exit(self, g: dict) -> None:
        depth = g.get("depth", 1)
        for i, (vma, av, start, end) in enumerate(g["vmas"]):
            if self.kmem:
                for _ in range(depth):
                    self.ev(Kind.AVC_FREE, mm=g["mm"], vma=vma, vm_start=start, vm_end=end,
                            anon_vma=av, root=g["roots"][i], aux=self.avc_slab.alloc(),
                            tgid=g["pid"], depth=depth, chain=depth, site=Site.UNLINK)
            self.ev(Kind.UNLINK_ANON_VMAS, mm=g["mm"], vma=vma, vm_start=start, vm_end=end,
                    tgid=g["pid"])
            self.ev(Kind.AV_FREE, anon_vma=av, root=g["roots"][i], tgid=g["pid"], depth=depth,
                    site=Site.PUT)
            self.vma_slab.release(vma)
            self.av_slab.release(av)
        self.ev(Kind.PROC_EXIT, tgid=g["pid"])
        self.mm_slab.release(g["mm"])


def build_recording(path: Path, args: argparse.Namespace) -> int:
    header = {"kernel": "synthetic", "backend": args.backend, "transport": "ringbuf",
              "processes": [{"pid": LAUNCHER_PID, "comm": "launcher", "ppid": 1,
                             "preexisting": True}],
              "command": [], "pids": [LAUNCHER_PID], "probes": {}, "offsets": {}}
    w = RecordingWriter(path, header)
    b = StreamBuilder(w, depth=args.depth, vmas=args.vmas, pages=args.pages, kmem=args.kmem,
                      frame_events=args.frame_events, tick_every=args.tick_every)
    while b.count < args.events:
        b.family()
    b.tick_every = 0
    b.flush()
    w.end({"time": b.ts / 1e9, "lost": {}, "exit_status": 0})
    w.close()
    return b.count


# -- stages ------------------------------------------------------------------

def stage_decode(path: Path) -> int:
    n = 0
    for frame in RecordingReader(path).frames():
        if frame.kind == EVENTS:
            n += len(frame.events or ())
    return n


def stage_apply(path: Path) -> int:
    model = Model()
    apply = model.apply
    n = 0
    for frame in RecordingReader(path).frames():
        if frame.kind == EVENTS:
            events = frame.events or ()
            n += len(events)
            for ev in events:
                apply(ev)
    return n


def stage_replay(path: Path) -> int:
    from tracer.commands.runner import run_replay  # here: the other stages need no runner

    reports = []
    try:
        run_replay(path, reports.append)
    except Exception as exc:  # a truncated recording still replays what it has
        print(f"  run_replay: {exc}", file=sys.stderr)
    return -1  # counted by the caller


def load_events(path: Path) -> list:
    out = []
    for frame in RecordingReader(path).frames():
        if frame.kind == EVENTS:
            out.extend(frame.events or ())
    return out


STAGES = {"decode": stage_decode, "apply": stage_apply, "replay": stage_replay}


def time_stage(name: str, path: Path, total: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        STAGES[name](path)
        best = min(best, time.perf_counter() - t0)
    return total / best


def time_model_only(path: Path, repeat: int) -> tuple[int, float]:
    events = load_events(path)
    best = float("inf")
    for _ in range(repeat):
        model = Model()
        apply = model.apply
        gc.collect()
        t0 = time.perf_counter()
        for ev in events:
            apply(ev)
        best = min(best, time.perf_counter() - t0)
    return len(events), len(events) / best


def time_codecs(path: Path, repeat: int) -> dict[str, float]:
    """The decoding and copying choices the consumer made, side by side on
    this stream's records: records (or copies) per second of each."""
    import dataclasses

    from tracer.format.events import WIRE, copy_event, decode, decode_many, decode_records

    events = load_events(path)[:200_000]
    blob = b"".join(WIRE.pack(*(getattr(e, n) if n not in ("kind", "site", "comm")
                                else (int(getattr(e, n)) if n != "comm" else e.comm.encode())
                                for n in e.__slots__)) for e in events)
    records = [blob[i:i + WIRE.size] for i in range(0, len(blob), WIRE.size)]
    ways = {
        "decode() per record": lambda: [decode(r) for r in records],
        "decode_many(joined)": lambda: decode_many(blob),
        "decode_records(batch)": lambda: decode_records(records),
        "dataclasses.replace()": lambda: [dataclasses.replace(e) for e in events],
        "copy_event()": lambda: [copy_event(e) for e in events],
    }
    out = {}
    for name, fn in ways.items():
        best = float("inf")
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = len(events) / best
    return out


def count_events(path: Path) -> tuple[int, dict[str, int]]:
    kinds: dict[str, int] = {}
    total = 0
    for frame in RecordingReader(path).frames():
        if frame.kind == EVENTS:
            for ev in frame.events or ():
                kinds[ev.kind.name] = kinds.get(ev.kind.name, 0) + 1
                total += 1
    return total, kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recording", type=Path, help="time this recording instead of a synthetic one")
    ap.add_argument("--keep", type=Path, help="write the synthetic recording here (kept)")
    ap.add_argument("--events", type=int, default=2_000_000, help="synthetic events (at least)")
    ap.add_argument("--depth", type=int, default=32, help="generations per family")
    ap.add_argument("--vmas", type=int, default=8, help="anonymous VMAs per process")
    ap.add_argument("--pages", type=int, default=4, help="pages written per VMA per process")
    ap.add_argument("--kmem", action="store_true",
                    help="add AV_ALLOC/AVC_ALLOC/AVC_FREE events as the fentry backend does")
    ap.add_argument("--backend", default="fentry",
                    help="backend named in the synthetic header (tracepoint runs the Deriver)")
    ap.add_argument("--frame-events", type=int, default=256, help="events per EVENTS frame")
    ap.add_argument("--tick-every", type=int, default=500_000,
                    help="a TICK frame (an interval report) every N events; 0: none")
    ap.add_argument("--stages", default="decode,apply,replay")
    ap.add_argument("--codecs", action="store_true",
                    help="also time the record decoders and event copies against each other")
    ap.add_argument("--model-only", action="store_true",
                    help="also time Model.apply alone over pre-decoded events")
    ap.add_argument("--repeat", type=int, default=3, help="runs per stage (best is kept)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin to this CPU (default: the first allowed one); -1: do not pin")
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--profile", choices=list(STAGES), help="cProfile one run of a stage")
    ap.add_argument("--profile-lines", type=int, default=25)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--check", action="store_true", help="exit 1 if 'apply' misses --target")
    args = ap.parse_args()

    if args.cpu != -1 and hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    tmp = None
    if args.recording is not None:
        path = args.recording
    else:
        if args.keep is not None:
            path = args.keep
        else:
            tmp = tempfile.TemporaryDirectory(prefix="anontrace-bench-")
            path = Path(tmp.name) / "synthetic.rec"
        t0 = time.perf_counter()
        build_recording(path, args)
        if not args.json:
            print(f"built {path} ({path.stat().st_size / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        total, kinds = count_events(path)
        result: dict = {"events": total, "kinds": kinds, "target": args.target,
                        "python": sys.version.split()[0], "stages": {}}
        if not args.json:
            mix = ", ".join(f"{k.lower()} {v / total:.0%}" for k, v in
                            sorted(kinds.items(), key=lambda kv: -kv[1]))
            print(f"{total:,} events: {mix}")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            STAGES[args.profile](path)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_lines)
            return 0
        for name in [s for s in args.stages.split(",") if s]:
            rate = time_stage(name, path, total, args.repeat)
            result["stages"][name] = {"events_per_s": round(rate), "ratio": rate / args.target}
            if not args.json:
                print(f"  {name:<8} {rate:>12,.0f} events/s   {rate / args.target:5.2f}x target")
        if args.model_only:
            n, rate = time_model_only(path, args.repeat)
            result["stages"]["model_only"] = {"events_per_s": round(rate),
                                              "ratio": rate / args.target}
            if not args.json:
                print(f"  {'model':<8} {rate:>12,.0f} events/s   {rate / args.target:5.2f}x "
                      "target (Model.apply alone, pre-decoded)")
        if args.codecs:
            codecs = time_codecs(path, args.repeat)
            result["codecs"] = {k: round(v) for k, v in codecs.items()}
            if not args.json:
                base_d, base_c = codecs["decode() per record"], codecs["dataclasses.replace()"]
                for name, rate in codecs.items():
                    base = base_c if "copy" in name or "replace" in name else base_d
                    print(f"  {name:<24} {rate:>12,.0f} /s   {rate / base:4.1f}x")
        if args.json:
            print(json.dumps(result, indent=2))
        apply = result["stages"].get("apply")
        if args.check and apply is not None and apply["ratio"] < 1:
            return 1
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
