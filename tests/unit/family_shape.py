"""The forkchain family seen in a recorded event stream (no BPF needed).

Mirrors tests/kernel/family.py's attribution: generation g > 0 is the mm
that sched_process_fork reported for its pid; generation 0 is the parent's
mm of generation 1's fork.
"""
from __future__ import annotations

from tracer.format.events import F_REUSED, Event, Kind


def gen_mms(events: list[Event], meta: dict) -> dict[int, int]:
    pids = {int(g): info["pid"] for g, info in meta["gens"].items()}
    out: dict[int, int] = {}
    for ev in events:
        if ev.kind is not Kind.PROC_FORK:
            continue
        for g, pid in pids.items():
            if ev.pid2 == pid:
                out[g] = ev.mm
                if g == 1:
                    out[0] = ev.cur_mm
    missing = set(pids) - set(out)
    assert not missing, f"no proc_fork event for generations {sorted(missing)}"
    return out


def region_events(events: list[Event], meta: dict, kind: Kind, gen: int) -> list[Event]:
    mm = gen_mms(events, meta)[gen]
    regions = set(meta["gens"][str(gen)]["regions"])
    return [ev for ev in events if ev.kind is kind and ev.mm == mm and ev.vm_start in regions]


def shape(events: list[Event], meta: dict) -> dict[int, dict[str, list[tuple[int, int, bool]]]]:
    """gen -> probe -> sorted [(depth, chain_len, reused)] on the family's regions."""
    out: dict[int, dict[str, list[tuple[int, int, bool]]]] = {}
    for g in range(meta["generations"] + 1):
        out[g] = {}
        for kind in (Kind.ANON_VMA_FORK, Kind.ANON_VMA_CLONE, Kind.UNLINK_ANON_VMAS):
            evs = region_events(events, meta, kind, g)
            out[g][kind.name.lower()] = sorted(
                (ev.depth, ev.chain_len, bool(ev.flags & F_REUSED)) for ev in evs)
    return out


def expected_shape(regions: int, generations: int) -> dict:
    """All members alive: generation g forks with depth and chain g+1, clones
    the g chain entries of its parent, and its exit frees g+1 entries per
    region (unlink chain_len as seen at entry)."""
    out = {}
    for g in range(generations + 1):
        out[g] = {
            "anon_vma_fork": [] if g == 0 else [(g + 1, g + 1, False)] * regions,
            "anon_vma_clone": [] if g == 0 else [(0, g, False)] * regions,
        }
    return out
