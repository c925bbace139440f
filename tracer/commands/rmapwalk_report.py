"""`anontrace rmapwalk`: measure the rmap walks of anonymous folios for a
while and show, per family (root anon_vma), the VMAs visited against the
VMAs that map the folio (docs/rmap-walks.md)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tracer.format.rmapwalk import WalkStats
from tracer.kernel.rmapwalk import WALK_FUNCTION, RmapWalkSession, WalkReading


@dataclass
class WalkRun:
    """One measurement: what was read, how, over how long."""

    method: str
    seconds: float
    reading: WalkReading


def measure(duration: float, method: str = "auto",
            on_start: Callable[[str], None] = lambda m: None) -> WalkRun:
    """Attach, wait ``duration`` seconds (0: until Ctrl-C), read the map."""
    with RmapWalkSession(method) as session:
        assert session.method is not None
        on_start(session.method)
        started = time.monotonic()
        try:
            if duration > 0:
                time.sleep(duration)
            else:
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
        return WalkRun(session.method, time.monotonic() - started, session.read())


def ranked(roots: list[WalkStats], top: int) -> list[WalkStats]:
    """The roots whose walks visited the most VMAs first; ``top`` 0: all."""
    out = sorted(roots, key=lambda s: (-s.visited, -s.walks, s.root))
    return out[:top] if top > 0 else out


def _histogram_cell(s: WalkStats) -> str:
    cells = ([f"<1:{s.below_one_walks}"] if s.below_one_walks else []) + \
        [f"{label}:{n}" for label, n in s.histogram_labels().items()]
    return " ".join(cells) or "-"


def format_table(run: WalkRun, top: int) -> str:
    """The text report."""
    roots = run.reading.roots
    walks = sum(s.walks for s in roots)
    lines = [f"rmap walks of anonymous folios over {run.seconds:.1f} s ({run.method} on "
             f"{WALK_FUNCTION}): {walks} walks, {len(roots)} families (root anon_vmas)"]
    lost = {k: v for k, v in run.reading.lost.items() if v}
    if lost:
        lines.append("not counted: " + ", ".join(f"{k}={v}" for k, v in lost.items()))
    lines.append(f"{'ROOT':<18} {'OWNER':<24} {'WALKS':>7} {'VISITED':>9} {'MAPPED':>8} "
                 f"{'RATIO':>7} {'UNMAPPED':>8} {'N/M':>5}  HISTOGRAM (visited/mapped:walks)")
    for s in ranked(roots, top):
        owner = f"{s.owner_pid} {s.owner_comm}" if s.owner_pid else "-"
        ratio = "-" if s.mean_ratio is None else f"{s.mean_ratio:.2f}"
        lines.append(f"{s.root:<18x} {owner[:24]:<24} {s.walks:>7} {s.visited:>9} "
                     f"{s.mapped:>8} {ratio:>7} {s.unmapped_walks:>8} "
                     f"{s.unmeasured_walks:>5}  {_histogram_cell(s)}")
    shown = len(ranked(roots, top))
    if shown < len(roots):
        lines.append(f"({len(roots) - shown} more families; --top 0 lists all)")
    return "\n".join(lines)


def to_json(run: WalkRun, top: int) -> dict[str, Any]:
    """The --json report."""
    return {
        "method": run.method, "function": WALK_FUNCTION, "seconds": round(run.seconds, 3),
        "walks": sum(s.walks for s in run.reading.roots),
        "families": len(run.reading.roots), "lost": run.reading.lost,
        "roots": [s.to_dict() for s in ranked(run.reading.roots, top)],
    }
