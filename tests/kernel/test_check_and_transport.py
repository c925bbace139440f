"""`anontrace check --json` on the running kernel, and the perf-buffer path."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from tests.kernel.family import FamilyRun, run_family
from tests.kernel.stack import kernel_preempts
from tracer.format.events import Kind, lost_total
from tracer.kernel.bpf_session import TraceSession
from tracer.kernel.facts import read_kernel_facts
from tracer.kernel.kernel_env import KernelEnv
from tracer.kernel.probes import LOGICAL_PROBES


@pytest.fixture(scope="module")
def check_report(backend):
    if backend != "auto":
        pytest.skip(f"check probes every backend itself; it runs in the auto pass, not {backend}")
    out = subprocess.run([sys.executable, "-m", "tracer", "check", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.auto_pass
def test_check_lists_four_probes(check_report) -> None:
    probes = {p["probe"]: p for p in check_report["probes"]}
    assert list(probes) == list(LOGICAL_PROBES)
    for p in probes.values():
        # Each probe has a method and function, or says why not.
        assert (p["method"] and p["function"]) or p["reason"], p
    assert all(probes[p]["method"] for p in LOGICAL_PROBES[:3])


@pytest.mark.auto_pass
def test_check_names_the_task_state(check_report) -> None:
    # Read the symbols here, not through tracer.kernel.kernel_env.
    with open("/proc/kallsyms") as f:
        names = {line.split()[2] for line in f if len(line.split()) == 3}
    both = {"bpf_task_storage_get", "bpf_get_current_task_btf"} <= names
    assert check_report["task_state"] == ("task storage" if both else "hash map")


@pytest.mark.auto_pass
def test_check_backend_is_first_that_works(check_report) -> None:
    # auto's order: kprobes first where the kernel preempts fentry programs
    # (tracer.kernel.bpf_session.auto_order), as check reports it.
    preempts = kernel_preempts()
    assert check_report["preemptible"]["fentry"] is preempts
    order = ["kprobe", "fentry", "tracepoint"] if preempts else ["fentry", "kprobe", "tracepoint"]
    assert list(check_report["backends"]) == order
    working = [b for b in order if check_report["backends"][b]["ok"]]
    assert check_report["backend"] == working[0]
    for b in order:
        entry = check_report["backends"][b]
        assert entry["ok"] or entry["error"], (b, entry)


@pytest.mark.method_agnostic
def test_perf_buffer_transport(forkchain_bin, backend) -> None:
    run = run_family(forkchain_bin, backend, 2, 2, transport="perf")
    assert run.transport == "perf"
    assert lost_total(run.lost) == 0, run.lost
    for g in (1, 2):
        forks = run.region_events(Kind.ANON_VMA_FORK, g)
        assert sorted(e.depth for e in forks) == [g + 1, g + 1]


@pytest.mark.method_agnostic
def test_pending_state_in_a_hash_map(forkchain_bin, backend) -> None:
    """Kernels before v5.11 have no task storage for tracing programs: the
    tracepoint backend then keeps each task's pending allocations in a hash
    map. Force that path on this kernel and check the family's facts."""
    if backend in ("fentry", "kprobe"):
        # Decided before running the family: under TCG a run costs seconds.
        pytest.skip(f"the pending state exists only on the tracepoint backend, not {backend}")
    facts = read_kernel_facts(KernelEnv())
    if not facts.task_storage:
        pytest.skip("this kernel has no task storage: every tracepoint test here uses the hash map")
    facts = dataclasses.replace(facts, task_storage=False)
    tables: list[bool] = []

    def has_hash(_run: FamilyRun, session: TraceSession) -> None:
        tables.append(session.has_map("pending_map") and not session.has_map("pending"))

    run = run_family(forkchain_bin, backend, 2, 3, while_alive=has_hash, facts=facts)
    if run.probes["anon_vma_fork"][1] != "tracepoint":
        pytest.skip(f"the pending state exists only on the tracepoint backend, not {backend}")
    assert tables == [True]
    assert lost_total(run.lost) == 0, run.lost
    for g in (1, 2, 3):
        forks = run.region_events(Kind.ANON_VMA_FORK, g)
        assert [(e.depth, e.chain_len) for e in forks] == [(g + 1, g + 1)] * 2, (g, forks)
        assert len(run.region_events(Kind.ANON_VMA_CLONE, g)) == 2
