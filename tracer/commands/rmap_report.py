"""Rmap width figures in the interval reports of an ad-hoc run.

At each report an rmap census (tracer.kernel.rmap_census) counts every
anon_vma's rmap width on the host; each live process of the report gets the
largest and the summed width of the anon_vmas its VMAs point at, and the
report gets the same for the traced family as a whole, with the largest
width seen over the run (``peak_max_width``). Exited processes have no rmap
figures (null): their VMAs are gone.
"""
from __future__ import annotations

from typing import Any, Protocol

from tracer.errors import AnontraceError
from tracer.model.rmap import RmapSnapshot


class Census(Protocol):
    def run(self, targets: tuple[int, ...] = ()) -> RmapSnapshot: ...


class RmapMeter:
    """Adds the ``rmap`` figures to reports; ``census`` None (the kernel would
    not run it: ``reason``) leaves a note instead."""

    def __init__(self, census: Census | None, reason: str | None = None) -> None:
        self.census = census
        self.reason = reason
        self.peak = 0

    def annotate(self, report: dict[str, Any]) -> None:
        """Measure now and add the figures to ``report`` in place."""
        rows = report["processes"]
        snap = None
        if self.census is not None:
            try:
                snap = self.census.run()
            except AnontraceError as exc:
                self.census, self.reason = None, str(exc)
        if snap is None:
            for row in rows:
                row["rmap_max_width"] = row["rmap_total_width"] = None
            report["rmap"] = {"available": False, "reason": self.reason,
                              "peak_max_width": self.peak}
            return
        fam_max = fam_total = 0
        for row in rows:
            if not row["alive"]:
                row["rmap_max_width"] = row["rmap_total_width"] = None
                continue
            f = snap.processes.get(row["pid"])
            mx, tot = (f.max_width, f.total_width) if f is not None else (0, 0)
            row["rmap_max_width"], row["rmap_total_width"] = mx, tot
            fam_max = max(fam_max, mx)
            fam_total += tot
        self.peak = max(self.peak, fam_max)
        report["rmap"] = {"available": True, "max_width": fam_max, "total_width": fam_total,
                          "peak_max_width": self.peak, "host_max_width": snap.max_width,
                          "complete": snap.complete, "seconds": round(snap.seconds, 6)}
        if not snap.complete:
            reasons = report.setdefault("partial_reasons", [])
            reasons.append(f"rmap census incomplete ({snap.truncated_chains} chains cut "
                           f"short, {snap.refused} anon_vmas not counted): widths may be low")
            report["partial"] = True
