"""The tracepoint backend agrees with fentry (or kprobes), process by process.

The tracepoint backend rebuilds the logical probes from slab allocations
and frees (README "Logical probes"), so it depends on the order in which
the kernel allocates: since the 7.0 anon_vma rework ``anon_vma_fork()``
allocates its anon_vma and chain entry before cloning the parent's chain,
and frees both when the clone reused an ancestor. On a kernel where fentry
works, the same workloads traced both ways must give the same figures:

* a fork chain (new anon_vmas at every level), alive;
* the 2012 reproducer shape (every generation forks the next and exits, so
  the reuse rule applies), at every generation's exit: bounded, and a
  reusing fork counted as one ``anon_vma_fork``, not as a new anon_vma.

Runs in the pass of the method auto takes on the kernel only: fentry, or
kprobes where the kernel can preempt fentry programs (one pass proves the
point; CI time budget).
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import test_backend as forced_backend
from tests.kernel.cli_run import STARTUP_S, CliRun, start, start_chain
from tests.kernel.stack import auto_method

FIELDS = ("anon_vmas", "anon_vma_chains", "max_depth", "max_degree", "max_chain", "events")
REGIONS, GENERATIONS = 3, 4
REPRO_GENERATIONS = 12


# Decided at collection, so that the test shards are balanced on what runs.
METHOD = auto_method()
pytestmark = pytest.mark.skipif(forced_backend() != METHOD, reason="compares the tracepoint "
                                f"backend with {METHOD}: runs in the {METHOD} pass")


def _by_gen(run: CliRun, report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    rows = {p["pid"]: p for p in report["processes"]}
    out = {g: {k: rows[pid][k] for k in FIELDS} for g, pid in run.pids().items()}
    for figures in out.values():
        # The tracepoint backend has no attach point for page_set_anon_rmap.
        figures["events"] = {k: v for k, v in figures["events"].items()
                             if k != "page_set_anon_rmap"}
    return out


def _differ(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> list[str]:
    return [f"generation {g}: tracepoint {a.get(g)} {METHOD} {b.get(g)}"
            for g in sorted(set(a) | set(b)) if a.get(g) != b.get(g)]


def _chain(forkchain_bin, backend: str) -> dict[int, dict[str, Any]]:
    run = start_chain(forkchain_bin, REGIONS, GENERATIONS, backend)
    try:
        have = len(run.reports)
        run.read_until(lambda r: len(r.reports) >= have + 2)
        alive = run.reports[-1]
        assert not alive["partial"], alive["partial_reasons"]
        figures = _by_gen(run, alive)
    finally:
        status = run.finish()
    assert status == 0, run.stderr
    return figures


def _reproducer(reproducer_bin, backend: str) -> dict[int, dict[str, Any]]:
    run = start(["--", str(reproducer_bin), "2", str(REPRO_GENERATIONS)], backend)
    try:
        run.read_until(lambda r: any(m["event"] == "ready" for m in r.workload),
                       timeout=STARTUP_S)
    finally:
        status = run.finish()
    assert status == 0, run.stderr
    final = run.reports[-1]
    assert final["final"] and final["lost_events"] == 0 and not final["partial"], final
    assert len(run.pids()) == REPRO_GENERATIONS + 1
    return _by_gen(run, final)


def test_fork_chain_figures_agree(forkchain_bin, backend) -> None:
    direct = _chain(forkchain_bin, METHOD)
    tracepoint = _chain(forkchain_bin, "tracepoint")
    for g in range(GENERATIONS + 1):
        assert direct[g]["max_depth"] == g + 1, direct[g]
    assert not _differ(tracepoint, direct), "\n".join(_differ(tracepoint, direct))


def _without_unlinks(figs: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {g: {**f, "events": {k: v for k, v in f["events"].items() if k != "unlink_anon_vmas"}}
            for g, f in figs.items()}


def test_reproducer_figures_agree_and_reuse_is_counted_as_such(reproducer_bin, backend) -> None:
    direct = _reproducer(reproducer_bin, METHOD)
    tracepoint = _reproducer(reproducer_bin, "tracepoint")
    a, b = _without_unlinks(tracepoint), _without_unlinks(direct)
    assert not _differ(a, b), "\n".join(_differ(a, b))
    # Unlinks are counted differently by definition (docs/state.md): the
    # direct probes every traced unlink of a VMA with an anon_vma, the tracepoint backend
    # only those of VMAs it tracks. Two runs of this workload on 7.2 under
    # load (the guests' concurrent test shards) differed by one unlink in one
    # generation, the direct probes' higher, the figures equal (seen in 3 of 5 runs).
    for g in direct:
        assert (direct[g]["events"]["unlink_anon_vmas"]
                >= tracepoint.get(g, {"events": {"unlink_anon_vmas": 0}})["events"][
                    "unlink_anon_vmas"]), (g, tracepoint.get(g), direct[g])
    for g in range(2, REPRO_GENERATIONS + 1):
        f = direct[g]
        # Bounded: the reuse rule keeps depth at 2-3 and each anon VMA at no
        # more than three anon_vmas (its root and two alternating levels).
        assert f["max_depth"] <= 3, (g, f)
        # One anon_vma_fork per anon VMA of the parent, reused or new.
        assert f["events"]["anon_vma_fork"] == direct[g - 1]["anon_vmas"], (g, f, direct[g - 1])
