"""`anontrace --json -- forkloop`: a fork storm traced through the state maps.

Functional, not timed: the loop forks and reaps as fast as it can for a few
seconds (16 written regions: each fork runs anon_vma_fork 16+ times, each
child exit unlink_anon_vmas as often). Every child must be in the final
report with the same fork count, nothing may be lost or partial, everything
must be freed, and anontrace must end by itself when the loop does (before
the state maps, lost exit events kept it waiting for ever).
"""
from __future__ import annotations

import os

from tests.kernel.cli_run import start
from tests.conftest import build_workload
from tests.kernel.stack import ROOT

REGIONS = 16
SECONDS = 3 if os.environ.get("ANONTRACE_GUEST") else 5


def test_fork_storm_is_lossless_and_the_run_ends(backend) -> None:
    loop = build_workload("forkloop", ROOT / "bench" / "workloads")
    run = start(["--", str(loop), str(SECONDS), str(REGIONS)], backend, interval=1.0)
    run.read_until(lambda r: any(m.get("event") == "ready" for m in r.workload))
    run.send(b"g")
    # ends by itself: finish() only closes stdin (the loop has started)
    status = run.finish(timeout=SECONDS + 90)
    assert status == 0, run.stderr
    done = [m for m in run.workload if "forks" in m]
    assert done, run.workload[-3:]
    forks = done[0]["forks"]
    assert forks > 100, done[0]
    final = run.reports[-1]
    assert final["final"] is True
    assert final["lost_events"] == 0 and final["partial"] is False, final["partial_reasons"]
    loop_pid = next(m["pid"] for m in run.workload if m.get("event") == "ready")
    children = [p for p in final["processes"] if p["ppid"] == loop_pid]
    assert len(children) == forks, (len(children), forks)
    assert not [p for p in final["processes"] if p["alive"]]
    fork_counts = {p["events"]["anon_vma_fork"] for p in children}
    assert len(fork_counts) == 1 and min(fork_counts) >= REGIONS, fork_counts
    assert final["totals"]["anon_vmas"] == 0, final["totals"]
    assert final["totals"]["anon_vma_chains"] == 0, final["totals"]
