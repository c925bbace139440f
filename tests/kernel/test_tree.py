"""`anontrace tree` and the rmap figures of the reports, on a family whose
shape is known in advance.

forkchain R G forks a chain of G generations, all alive, over R regions:
generation g's VMA of a region has the chain [own (depth g+1), ..., root
(depth 1)], and the anon_vma of generation k is linked into the VMAs of
generations k..G, so its rmap width is G-k+1. The rmap census traces
nothing, so this runs once per kernel (not in the host's tracepoint pass nor
the guests' kprobe pass); drgn checks every width on 6.12
(test_ground_truth.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.family import idle_family

ROOT = Path(__file__).resolve().parents[2]
REGIONS = 2
GENERATIONS = 4

pytestmark = pytest.mark.method_agnostic


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def family(forkchain_bin, backend):
    if backend == "tracepoint":
        pytest.skip("the rmap census traces nothing: it runs in the auto pass, not tracepoint")
    with idle_family(forkchain_bin, REGIONS, GENERATIONS) as gens:
        yield gens


@pytest.fixture(scope="module")
def trees(family) -> dict[int, dict]:
    out = _cli("tree", "--json", *(str(family[g]["pid"]) for g in sorted(family)))
    assert out.returncode == 0, out.stderr
    by_pid = {t["pid"]: t for t in map(json.loads, out.stdout.splitlines())}
    return {g: by_pid[family[g]["pid"]] for g in family}


def test_region_chains_have_the_known_shape(family, trees) -> None:
    G = GENERATIONS
    for g, tree in trees.items():
        assert tree["complete"]
        vmas = {int(v["start"], 16): v for v in tree["vmas"]}
        for start in family[g]["regions"]:
            chain = vmas[start]["chain"]
            # Newest first: own anon_vma (depth g+1, made by generation g) up
            # to the root that generation 0 faulted in.
            assert [e["depth"] for e in chain] == list(range(g + 1, 0, -1))
            assert [e["rmap_width"] for e in chain] == [G - k + 1 for k in range(g, -1, -1)]
            assert [e["owner_pid"] for e in chain] == [family[k]["pid"]
                                                        for k in range(g, -1, -1)]
            assert [e["children"] for e in chain] == [0 if k == G else 1
                                                      for k in range(g, -1, -1)]
            assert all(e["vmas"] == 1 for e in chain)
            assert vmas[start]["anon_vma"] == chain[0]["id"]
            assert [e["own"] for e in chain] == [True] + [False] * g
            # Each entry's parent is the next one up.
            assert [e["parent"] for e in chain] == [e["id"] for e in chain[1:]] + [None]


def test_process_figures_sum_its_own_anon_vmas(trees) -> None:
    for g, tree in trees.items():
        own: dict[int, int] = {}
        for v in tree["vmas"]:
            own.update({e["id"]: e["rmap_width"] for e in v["chain"] if e["id"] == v["anon_vma"]})
        assert tree["anon_vmas"] == len(own)
        assert tree["rmap_max_width"] == max(own.values())
        assert tree["rmap_total_width"] == sum(own.values())
        # Every anonymous VMA of generation g came down the chain: none is
        # wider than what the G-g+1 generations from g down share, unless
        # VMAs of one process share an anon_vma (a split region).
        assert tree["rmap_max_width"] >= GENERATIONS - g + 1


def test_adhoc_report_rmap_equals_tree(family, trees, backend) -> None:
    """`anontrace -p` reports the same per-process rmap figures as `tree` of
    the same (idle) family."""
    pids = [a for g in sorted(family) for a in ("-p", str(family[g]["pid"]))]
    out = _cli("--json", *pids, "-i", "1", "-d", "2.5", "--backend", backend)
    assert out.returncode == 0, out.stderr
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    report = [r for r in reports if not r["final"]][-1]
    assert report["rmap"]["available"] and report["rmap"]["complete"]
    by_pid = {p["pid"]: p for p in report["processes"]}
    for tree in trees.values():
        row = by_pid[tree["pid"]]
        assert (row["rmap_max_width"], row["rmap_total_width"]) == \
            (tree["rmap_max_width"], tree["rmap_total_width"]), tree["pid"]
    assert report["rmap"]["max_width"] == max(t["rmap_max_width"] for t in trees.values())
    assert report["rmap"]["total_width"] == sum(t["rmap_total_width"] for t in trees.values())


def test_unknown_pid_is_a_clear_error() -> None:
    out = _cli("tree", "4194304")
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: no such process: 4194304"
