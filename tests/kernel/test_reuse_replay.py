"""`anontrace replay --reuse` on a recording made now, on the running kernel:
the 2012 reproducer recorded, then replayed under the kernel's reuse rule
(which must give the recorded figures at every report point, having made
every fork's choice as the kernel did) and under no reuse (which must grow
one level per generation)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kernel.cli_run import run_anontrace
from tests.kernel.stack import xfail_preempted

GENERATIONS = 24
# fentry and kprobe give the replay the same events (the clone's source VMA
# in aux): the guests' fentry pass proves it for both (CI time budget).
pytestmark = pytest.mark.method_agnostic


def test_recorded_reproducer_replays_under_the_reuse_rules(reproducer_bin, backend,
                                                           tmp_path) -> None:
    rec = tmp_path / "repro.atr"
    run = run_anontrace(["record", "-o", str(rec), "--json", "-i", "0.3", "--backend", backend,
                         "--", str(reproducer_bin), "2", str(GENERATIONS)])
    run.read_until(lambda r: any(m["event"] == "ready" for m in r.workload))
    have = len(run.reports)
    # two reports after "ready": the last generation alive, every fork in
    run.read_until(lambda r: len(r.reports) >= have + 2)
    alive_index = len(run.reports) - 1
    assert run.finish() == 0, run.stderr
    out = subprocess.run([sys.executable, "-m", "tracer", "replay", "--json", "--reuse",
                          "kernel", "--reuse", "none", str(rec)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(reports) == len(run.reports)
    # An operation lost leaves the replay without a fork the maps counted.
    xfail_preempted(backend, run.reports[-1]["lost_events"], run.reports[-1]["lost_by_reason"])
    assert run.reports[-1]["lost_events"] == 0, run.reports[-1]["partial_reasons"]
    for r in reports:
        k = r["rules"]["kernel"]
        assert (k["anon_vmas"], k["anon_vma_chains"], k["max_depth"]) == (
            r["recorded"]["anon_vmas"], r["recorded"]["anon_vma_chains"],
            r["recorded"]["max_depth"]), r
        assert r["partial"] is False, r["partial_reasons"]
    final = reports[-1]
    assert final["final"] and final["rules"]["kernel"]["divergences"] == 0
    kernel, none = final["rules"]["kernel"], final["rules"]["none"]
    assert kernel["reused"] > kernel["forked_vmas"] // 2   # the kernel reused, and we agreed
    assert none["reused"] == 0 and none["forked_vmas"] == kernel["forked_vmas"]
    alive = reports[alive_index]["rules"]
    print(f"reproducer x{GENERATIONS}: kernel anon_vmas={alive['kernel']['anon_vmas']} "
          f"depth={alive['kernel']['max_depth']}; none anon_vmas={alive['none']['anon_vmas']} "
          f"depth={alive['none']['max_depth']}")
    assert alive["none"]["max_depth"] == GENERATIONS + 1
    assert alive["kernel"]["max_depth"] <= 3
    assert alive["none"]["anon_vmas"] > 5 * alive["kernel"]["anon_vmas"]
