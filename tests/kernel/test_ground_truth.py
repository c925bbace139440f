"""Compare what the events say with what the kernel holds, read by drgn.

drgn needs a DWARF vmlinux (scripts/fetch-dbg-vmlinux.sh fetches Debian's
for the 6.12 kernel); the comparison runs wherever one exists for the
running kernel, which in CI is the Debian 6.12 guest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.family import FamilyRun, run_family
from tracer.format.events import Kind
from tracer.kernel.bpf_session import TraceSession

ROOT = Path(__file__).resolve().parents[2]
VMLINUX = Path("/var/cache/anontrace") / f"vmlinux-{os.uname().release}"
REGIONS = 3
GENERATIONS = 3


def _drgn(run: FamilyRun, _session: TraceSession) -> None:
    pids = [str(run.gens[g].pid) for g in sorted(run.gens)]
    args = [sys.executable, str(ROOT / "tests" / "guest" / "drgn_walk.py"),
            "--vmlinux", str(VMLINUX), "--json"]
    for pid in pids:
        args += ["--pid", pid]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True)
    run.while_alive["drgn"] = json.loads(out.stdout)


# Decided at collection, so that the test shards are balanced on what runs.
pytestmark = pytest.mark.skipif(
    not VMLINUX.exists(),
    reason=f"no DWARF vmlinux for {os.uname().release} at {VMLINUX}: drgn ground truth runs "
    "in the Debian 6.12 and sid 7.2 guests (scripts/fetch-dbg-vmlinux.sh, fetch-sid-kernel.sh)")


@pytest.fixture(scope="module")
def walked(forkchain_bin, backend) -> FamilyRun:
    return run_family(forkchain_bin, backend, REGIONS, GENERATIONS, while_alive=_drgn)


def test_depth_and_chain_match_drgn(walked: FamilyRun) -> None:
    truth = {p["pid"]: p for p in walked.while_alive["drgn"]["pids"]}
    compared = 0
    for g in range(1, GENERATIONS + 1):
        gen = walked.gens[g]
        kernel = {int(v["vm_start"], 16): v for v in truth[gen.pid]["vmas"]}
        for ev in walked.region_events(Kind.ANON_VMA_FORK, g):
            k = kernel[ev.vm_start]
            assert int(k["anon_vma"], 16) == ev.anon_vma
            assert int(k["parent"], 16) == ev.parent
            assert int(k["root"], 16) == ev.root
            assert k["depth"] == ev.depth == g + 1
            assert k["chain_len"] == ev.chain_len == g + 1
            compared += 1
    assert compared == REGIONS * GENERATIONS


def test_drgn_sees_generation_zero_roots(walked: FamilyRun) -> None:
    truth = {p["pid"]: p for p in walked.while_alive["drgn"]["pids"]}
    g0 = walked.gens[0]
    kernel = {int(v["vm_start"], 16): v for v in truth[g0.pid]["vmas"]}
    roots = {e.vm_start: e.root for e in walked.region_events(Kind.ANON_VMA_FORK, 1)}
    for start in g0.regions:
        assert kernel[start]["depth"] == 1
        assert int(kernel[start]["anon_vma"], 16) == roots[start]


def _drgn_figures(walk: dict) -> dict:
    """The README's per-process figures, computed from drgn's reading."""
    vmas = walk["vmas"]
    avs = {v["anon_vma"]: v for v in vmas}
    # num_children counts a root's link to itself (__anon_vma_prepare); the
    # README's degree counts child anon_vmas only.
    degree = [v["num_children"] - (1 if v["root"] == v["anon_vma"] else 0)
              for v in avs.values()]
    width = {e["anon_vma"]: e["rmap_width"] for v in vmas for e in v["chain"]}
    return {
        "anon_vmas": len(avs),
        "anon_vma_chains": sum(v["chain_len"] for v in vmas),
        "max_depth": max((v["depth"] for v in vmas), default=0),
        "max_degree": max(degree, default=0),
        "max_chain": max((v["chain_len"] for v in vmas), default=0),
        "rmap_max_width": max((width[av] for av in avs), default=0),
        "rmap_total_width": sum(width[av] for av in avs),
    }


def _tree_chains(tree: dict) -> dict[int, list[tuple[int, int]]]:
    """VMA start -> (depth, rmap width) of each chain entry, newest first."""
    return {int(v["start"], 16): [(e["depth"], e["rmap_width"]) for e in v["chain"]]
            for v in tree["vmas"]}


def test_report_fields_match_drgn(forkchain_bin, backend) -> None:
    """With the family paused and alive, every figure of every process in
    `anontrace --json -- forkchain` equals what drgn reads from the kernel."""
    from tests.kernel.cli_run import start_chain

    run = start_chain(forkchain_bin, REGIONS, GENERATIONS, backend, rmap=True)
    try:
        pids = run.pids()
        # A first report: anontrace's own rmap census is compiled by then.
        run.read_until(lambda r: len(r.reports) >= 1)
        # `anontrace tree` of the same paused family, as a user runs it;
        # before drgn, so that no two of the compiles and drgn's debug info
        # are in the 2 GB guest's memory at once.
        tree_out = subprocess.run([sys.executable, "-m", "tracer", "tree", "--json",
                                   *map(str, pids.values())], capture_output=True, text=True,
                                  timeout=300, check=True, cwd=ROOT).stdout
        trees = {t["pid"]: t for t in map(json.loads, tree_out.splitlines())}
        args = [sys.executable, str(ROOT / "tests" / "guest" / "drgn_walk.py"),
                "--vmlinux", str(VMLINUX), "--json"]
        for pid in pids.values():
            args += ["--pid", str(pid)]
        truth = json.loads(subprocess.run(args, capture_output=True, text=True, timeout=600,
                                          check=True).stdout)
        have = len(run.reports)
        run.read_until(lambda r: len(r.reports) >= have + 1)
        report = run.reports[-1]
    finally:
        run.finish()
    assert not report["partial"], report["partial_reasons"]
    by_pid = {p["pid"]: p for p in report["processes"]}
    compared = 0
    for walk in truth["pids"]:
        expected = _drgn_figures(walk)
        got = {k: by_pid[walk["pid"]][k] for k in expected}
        assert got == expected, (walk["pid"], got, expected)
        # Every chain entry of every VMA: the rmap width `tree` reports is
        # the number of anon_vma_chain entries in that anon_vma's interval
        # tree, as drgn counts them.
        # tree lists a chain deepest first; drgn in the kernel's list order.
        kernel = {int(v["vm_start"], 16): [(e["depth"], e["rmap_width"]) for e in sorted(
                      v["chain"], key=lambda e: -e["depth"])] for v in walk["vmas"]}
        assert _tree_chains(trees[walk["pid"]]) == kernel, walk["pid"]
        compared += sum(len(c) for c in kernel.values())
    # Every generation's regions alone hold 1 + 2 + ... + (G+1) entries each.
    assert compared >= REGIONS * (GENERATIONS + 1) * (GENERATIONS + 2) // 2
