"""`anontrace --json -- COMMAND` on the running kernel, end to end.

(a) an alive fork chain: generation g reports max_depth and max_chain g+1;
(b) the 2012 reproducer shape stays bounded (reuse rule);
(c) mprotect splits add chain entries, not anon_vmas;
(d) a recording replays to the same reports as the run that made it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.kernel.cli_run import CliRun, run_anontrace, start, start_chain

GENERATIONS = 4
REGIONS = 3


def _proc(report: dict, pid: int) -> dict:
    found = [p for p in report["processes"] if p["pid"] == pid]
    assert found, f"pid {pid} not in report"
    return found[0]


def _wait_reports(run: CliRun, n: int = 2) -> None:
    have = len(run.reports)
    run.read_until(lambda r: len(r.reports) >= have + n)


@pytest.fixture(scope="module")
def chain(forkchain_bin, backend) -> tuple[CliRun, dict, int]:
    run = start_chain(forkchain_bin, REGIONS, GENERATIONS, backend)
    _wait_reports(run)
    alive = run.reports[-1]
    status = run.finish()
    return run, alive, status


def test_alive_chain_figures(chain) -> None:
    run, alive, _ = chain
    assert alive["final"] is False and alive["partial"] is False, alive["partial_reasons"]
    for g, pid in run.pids().items():
        p = _proc(alive, pid)
        assert p["alive"] is True
        assert p["max_depth"] == g + 1, p
        assert p["max_chain"] == g + 1, p
        assert p["anon_vma_chains"] >= p["anon_vmas"] * (g + 1) if g else True
        if 0 < g < GENERATIONS:
            assert p["max_degree"] == 1, p          # one child anon_vma per anon_vma
        elif g == GENERATIONS:
            assert p["max_degree"] == 0, p
        else:
            assert p["max_degree"] >= 1, p
        if g:
            # every anon VMA of a forked child came from anon_vma_fork
            assert p["events"]["anon_vma_fork"] == p["anon_vmas"], p
            assert p["events"]["anon_vma_clone"] >= p["anon_vmas"], p
    assert alive["totals"]["anon_vmas"] >= sum(
        _proc(alive, pid)["anon_vmas"] for pid in run.pids().values())


def test_chain_final_report(chain) -> None:
    run, _, status = chain
    assert status == 0, run.stderr
    final = run.reports[-1]
    assert final["final"] is True
    assert all(not r["final"] for r in run.reports[:-1])
    assert final["lost_events"] == 0
    pids = set(run.pids().values())
    assert pids <= {p["pid"] for p in final["processes"]}
    assert not [p for p in final["processes"] if p["alive"]]
    assert final["totals"]["anon_vmas"] == 0, final["totals"]
    assert final["totals"]["anon_vma_chains"] == 0, final["totals"]
    assert "Tracing... Hit Ctrl-C to end." in run.stderr


def test_reproducer_stays_bounded(reproducer_bin, backend) -> None:
    """Every generation forks the next and exits. Before v3.19 each
    generation added a level; with reuse (num_children < 2 &&
    num_active_vmas == 0) generation g+2 reuses the anon_vma of generation
    g, so depth alternates between 2 and 3 and each anon VMA keeps at most
    three anon_vmas: its root and the two alternating levels."""
    generations = 40
    run = start(["--", str(reproducer_bin), "2", str(generations)], backend, interval=0.2)
    run.read_until(lambda r: any(m["event"] == "ready" for m in r.workload))
    _wait_reports(run)
    status = run.finish()
    assert status == 0, run.stderr
    depths = [p["max_depth"] for r in run.reports for p in r["processes"] if p["alive"]]
    per_process = max(p["anon_vmas"] for r in run.reports for p in r["processes"])
    live = [r["totals"]["anon_vmas"] for r in run.reports]
    print(f"reproducer: max_depth={max(depths)} per-process anon_vmas<={per_process} "
          f"live anon_vmas max={max(live)} over {len(run.reports)} reports")
    assert max(depths) <= 3
    assert max(live) <= 3 * per_process
    assert len(run.pids()) == generations + 1
    assert run.reports[-1]["totals"]["anon_vmas"] == 0


def test_mprotect_splits_add_chains_not_anon_vmas(splits_bin, backend) -> None:
    pages = 16
    run = start(["--", str(splits_bin), str(pages)], backend)
    run.read_until(lambda r: any(m["event"] == "mapped" for m in r.workload))
    _wait_reports(run)
    pid = run.reports[-1]["processes"][0]["pid"]
    before = _proc(run.reports[-1], pid)
    run.send(b"g")
    run.read_until(lambda r: any(m["event"] == "split" for m in r.workload))
    _wait_reports(run)
    after = _proc(run.reports[-1], pid)
    assert run.finish() == 0
    assert after["anon_vmas"] == before["anon_vmas"], (before, after)
    # 8 mprotect calls split one VMA into 16: 15 new VMAs, one entry each.
    assert after["anon_vma_chains"] == before["anon_vma_chains"] + pages - 1, (before, after)
    assert after["events"]["anon_vma_clone"] - before["events"]["anon_vma_clone"] == pages - 1


def test_replay_matches_live(forkchain_bin, backend, tmp_path) -> None:
    rec = tmp_path / "run.atr"
    run = run_anontrace(["record", "-o", str(rec), "--json", "-i", "0.3", "--backend", backend,
                         "--", str(forkchain_bin), "2", "2", "touch"])
    run.read_until(lambda r: any(m["event"] == "start" for m in r.workload))
    run.send(b"g")
    run.read_until(lambda r: any(m["event"] == "ready" for m in r.workload))
    _wait_reports(run)
    assert run.finish() == 0, run.stderr
    out = subprocess.run([sys.executable, "-m", "tracer", "replay", str(rec), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    replayed = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(run.reports) >= 3
    assert replayed == run.reports


@pytest.mark.method_agnostic
def test_unknown_pid_is_a_clear_error(backend) -> None:
    out = subprocess.run([sys.executable, "-m", "tracer", "-p", "999999999", "-d", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "no such process: 999999999" in out.stderr
    assert "Traceback" not in out.stderr


def _fentry_loads() -> bool:
    from tracer.errors import AnontraceError
    from tracer.kernel.bpf_session import TraceOptions, TraceSession

    try:
        with TraceSession(TraceOptions(backend="fentry", pids=(os.getpid(),))):
            return True
    except AnontraceError:
        return False


@pytest.mark.method_agnostic
def test_census_of_running_processes(forkchain_bin, backend) -> None:
    """-p on processes that were already running: a task_vma iterator reads
    their VMAs, so the figures are exact from the first report. A kernel that
    refuses the iterator must also refuse fentry (both are TRACING programs;
    the 6.18 host refuses fentry yet runs the iterator): the report then says
    partial, and why."""
    import select

    family = subprocess.Popen([str(forkchain_bin), "3", "3", "touch"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)
    try:
        assert family.stdin is not None and family.stdout is not None
        msgs = [json.loads(family.stdout.readline())]
        family.stdin.write(b"g")
        family.stdin.flush()
        while not (any(m["event"] == "ready" for m in msgs)
                   and sum(m["event"] == "gen" for m in msgs) == 4):
            assert select.select([family.stdout], [], [], 60)[0], msgs
            msgs.append(json.loads(family.stdout.readline()))
        gens = {m["gen"]: m["pid"] for m in msgs if m["event"] == "gen"}
        args = [a for pid in gens.values() for a in ("-p", str(pid))] + ["-d", "1.5"]
        run = start(args, backend, interval=0.5)
        assert run.finish() == 0, run.stderr
    finally:
        family.stdin.close()
        family.wait(timeout=60)
    report = run.reports[-1]
    by_pid = {p["pid"]: p for p in report["processes"]}
    census_missing = [r for r in report["partial_reasons"] if r.startswith("no census")]
    if census_missing:
        assert not _fentry_loads(), census_missing
        assert "refused" in census_missing[0]
        assert report["partial"] is True
        return
    assert report["partial"] is False, report["partial_reasons"]
    for g, pid in gens.items():
        p = by_pid[pid]
        assert (p["max_depth"], p["max_chain"]) == (g + 1, g + 1), p
        assert p["anon_vmas"] > 0 and p["alive"] is True


@pytest.mark.method_agnostic
def test_command_starts_with_extra_descriptors_open(backend) -> None:
    """The paused start does not assume its pipe is descriptor 3 (a shell
    script or a service manager may hand anontrace more open descriptors)."""
    if os.environ.get("ANONTRACE_GUEST"):
        pytest.skip("user-space start-up, the same on every kernel: runs on the host")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ('exec 3</dev/null 4</dev/null 5</dev/null; exec "$0" -m tracer --json '
              f'--backend {backend} -- /bin/true')
    out = subprocess.run(["/bin/sh", "-c", script, sys.executable], capture_output=True,
                         text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout.splitlines()[-1])
    assert final["final"] and [p for p in final["processes"] if p["comm"] == "true"], final
