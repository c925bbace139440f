"""`anontrace tree PID`: one process's anon_vma hierarchy now, from an rmap
census (no tracing): each anonymous VMA, its chain (deepest first, up to
the root, its own anon_vma marked), and for each anon_vma its owner, depth,
children and rmap width.

Kernel pointers are not printed: anon_vmas get small ids (``#1``, ``#2``,
...) in the order they first appear, enough to see which VMAs share one.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracer.format.events import safe_comm, safe_text
from tracer.kernel.procs import proc_comm, require_pids
from tracer.model.rmap import ChainLink, RmapSnapshot

_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+\S+\s+\S+\s+\S+\s+\S+\s*(.*)$")


def vma_names(maps_text: str) -> dict[int, str]:
    """VMA start address -> the name /proc/PID/maps gives it ('' for none)."""
    out: dict[int, str] = {}
    for line in maps_text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            out[int(m.group(1), 16)] = m.group(3).strip()
    return out


def read_maps(pid: int, proc: Path = Path("/proc")) -> str:
    """A process's /proc/PID/maps, '' if it is gone."""
    try:
        return (proc / str(pid) / "maps").read_text()
    except OSError:
        return ""


def build_tree(snap: RmapSnapshot, pid: int, names: dict[int, str],
               comm_of: Callable[[int], str]) -> dict[str, Any]:
    """The JSON object `tree --json` prints."""
    ids: dict[int, int] = {}

    def ident(av: int) -> int:
        if av not in ids:
            ids[av] = len(ids) + 1
        return ids[av]

    comms: dict[int, str] = {}

    def comm(p: int) -> str:
        if p not in comms:
            comms[p] = comm_of(p)
        return comms[p]

    by_vma: dict[tuple[int, int], list[ChainLink]] = {}
    for link in snap.links_of(pid):
        by_vma.setdefault((link.vm_start, link.vm_end), []).append(link)
    vmas = []
    for (start, end), links in sorted(by_vma.items()):
        chain = []
        own = links[0].anon_vma
        # Deepest first, up to the root: the kernel's list order is not
        # that everywhere (compat: anon_vma_rework reorders it).
        for link in sorted(links, key=lambda lk: (-snap.depth(lk.chain_av), lk.index)):
            a = snap.anon_vmas.get(link.chain_av)
            entry: dict[str, Any] = {"id": ident(link.chain_av), "own": link.chain_av == own}
            if a is None:
                entry.update(known=False)
            else:
                parent = None if a.parent in (0, a.anon_vma) else ident(a.parent)
                entry.update(known=True, parent=parent, depth=snap.depth(a.anon_vma),
                             owner_pid=a.owner or None,
                             owner_comm=safe_comm(comm(a.owner)) if a.owner else None,
                             children=snap.child_anon_vmas(a), vmas=a.active, rmap_width=a.width)
            chain.append(entry)
        vmas.append({"start": f"{start:#x}", "end": f"{end:#x}",
                     "name": safe_text(names.get(start, "")),
                     "anon_vma": ident(own) if own else None, "chain": chain})
    fig = snap.processes.get(pid)
    return {
        "pid": pid,
        "comm": safe_comm(comm(pid)),
        "anon_vmas": fig.anon_vmas if fig else 0,
        "rmap_max_width": fig.max_width if fig else 0,
        "rmap_total_width": fig.total_width if fig else 0,
        "vmas": vmas,
        "complete": snap.complete,
        "census": {"vmas": snap.vmas, "anon_vmas": len(snap.anon_vmas),
                   "chain_entries": snap.chain_entries,
                   "truncated_chains": snap.truncated_chains, "refused": snap.refused,
                   "seconds": round(snap.seconds, 6)},
    }


def format_tree(tree: dict[str, Any]) -> str:
    """The tree as text: each VMA, then its chain from the deepest anon_vma
    up to the root, one anon_vma per line, its own marked with *."""
    c = tree["census"]
    lines = [f"pid {tree['pid']} ({tree['comm']}): {tree['anon_vmas']} anon_vmas, "
             f"rmap width max {tree['rmap_max_width']} total {tree['rmap_total_width']}",
             f"census: {c['vmas']} VMAs, {c['anon_vmas']} anon_vmas, "
             f"{c['chain_entries']} chain entries on the host in {c['seconds'] * 1000:.0f} ms"]
    if not tree["complete"]:
        lines.append(f"incomplete: {c['truncated_chains']} chains cut short, "
                     f"{c['refused']} anon_vmas not counted (map full): widths may be low")
    if not tree["vmas"]:
        lines.append("no VMA with an anon_vma (no anonymous memory written yet, "
                     "or the process exited)")
    if tree["vmas"]:
        lines.append(f"{'VMA; its chain up to the root (* its own)':<44}"
                     f"{'DEPTH':>6}{'RMAP':>6}{'VMAS':>6}{'CHILD':>6}  OWNER")
    for v in tree["vmas"]:
        lines.append(f"{v['start'][2:]}-{v['end'][2:]} {v['name'] or '[anon]'}")
        for e in v["chain"]:
            label = f"  {'*' if e['own'] else ' '} #{e['id']}"
            if not e["known"]:
                lines.append(f"{label:<44}(not counted: map full)")
                continue
            owner = (f"{e['owner_pid']} {e['owner_comm']}" if e["owner_pid"]
                     else "- (no VMA points at it)")
            lines.append(f"{label:<44}{e['depth']:>6}{e['rmap_width']:>6}{e['vmas']:>6}"
                         f"{e['children']:>6}  {owner}")
    return "\n".join(lines)


def run_tree(pids: tuple[int, ...], proc: Path = Path("/proc")) -> list[dict[str, Any]]:
    """Census the host once and build each process's tree."""
    from tracer.kernel.rmap_census import RmapCensus

    require_pids(pids, proc)
    with RmapCensus() as census:
        snap = census.run(targets=pids)
    return [build_tree(snap, pid, vma_names(read_maps(pid, proc)),
                       lambda p: proc_comm(p, proc)) for pid in pids]
