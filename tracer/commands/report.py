"""Interval reports: the JSON object and the terminal table, read from the model."""
from __future__ import annotations

import textwrap
import time as _time
from typing import Any

from tracer.format.events import safe_comm
from tracer.model.hierarchy import Model
from tracer.model.types import Process


def build_report(model: Model, *, when: float, backend: str, lost_events: int,
                 exited: list[Process], final: bool) -> dict[str, Any]:
    """One report: every traced process alive now or exited since the last
    one; the final report covers every process of the whole run."""
    gone = model.retired if final else exited
    procs = sorted(list(model.processes.values()) + gone, key=lambda p: (p.pid, p.alive))
    rows = []
    for p in procs:
        f = model.figures(p)
        rows.append({
            "pid": p.pid, "ppid": p.ppid, "comm": p.comm, "alive": p.alive,
            "anon_vmas": f.anon_vmas, "anon_vma_chains": f.anon_vma_chains,
            "max_depth": f.max_depth, "max_degree": f.max_degree, "max_chain": f.max_chain,
            "events": f.events,
        })
    return {
        "time": round(when, 6),
        "backend": backend,
        "lost_events": lost_events,
        "partial": model.partial,
        "partial_reasons": model.partial_reasons,
        "processes": rows,
        "totals": model.totals(),
        "final": final,
    }



def _tree_order(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    by_pid = {r["pid"]: r for r in rows}
    children: dict[int, list[dict[str, Any]]] = {}
    roots = []
    for r in rows:
        if r["ppid"] in by_pid and r["ppid"] != r["pid"]:
            children.setdefault(r["ppid"], []).append(r)
        else:
            roots.append(r)
    out: list[tuple[int, dict[str, Any]]] = []
    stack = [(0, r) for r in reversed(roots)]
    seen: set[int] = set()
    while stack:
        level, r = stack.pop()
        if id(r) in seen:
            continue
        seen.add(id(r))
        out.append((level, r))
        stack.extend((level + 1, c) for c in reversed(children.get(r["pid"], [])))
    return out


def format_table(report: dict[str, Any]) -> str:
    """The report as a table under 80 columns, processes as a tree."""
    stamp = _time.strftime("%H:%M:%S", _time.localtime(report["time"]))
    t = report["totals"]
    lines = [f"{stamp} {'FINAL ' if report['final'] else ''}backend={report['backend']} "
             f"lost={report['lost_events']} partial={'yes' if report['partial'] else 'no'}",
             f"totals: anon_vmas={t['anon_vmas']} anon_vma_chains={t['anon_vma_chains']} "
             f"orphaned_anon_vmas={t['orphaned_anon_vmas']}",
             f"{'PID':>7} {'PPID':>7} {'COMM':<17} {'ALIVE':<5} {'AVS':>5} {'CHAINS':>6} "
             f"{'DEPTH':>5} {'DEGREE':>6} {'CHAIN':>5} {'RMAP':>5}"]
    rmap = report.get("rmap")
    if rmap and rmap.get("available"):
        lines.insert(2, f"rmap width: max {rmap['max_width']} total {rmap['total_width']} "
                        f"(peak {rmap['peak_max_width']}; census {rmap['seconds'] * 1000:.0f} ms)")
    for level, r in _tree_order(report["processes"]):
        indent = min(level, 8)
        comm = (" " * indent + ("`-" if level else "") + safe_comm(r["comm"]))[:17]
        width = r.get("rmap_max_width")
        lines.append(f"{r['pid']:>7} {r['ppid']:>7} {comm:<17} {'yes' if r['alive'] else 'no':<5} "
                     f"{r['anon_vmas']:>5} {r['anon_vma_chains']:>6} {r['max_depth']:>5} "
                     f"{r['max_degree']:>6} {r['max_chain']:>5} "
                     f"{'-' if width is None else width:>5}")
    for reason in report.get("partial_reasons", []):
        lines.extend(textwrap.wrap(f"partial: {reason}", 79, subsequent_indent="  "))
    return "\n".join(lines)
