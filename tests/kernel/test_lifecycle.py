"""The forkchain family, traced for real: shape, counts, frees, losses.

generation g of a chain whose members all stay alive holds, on each of the
K regions, an anon_vma of depth g+1 whose parent is generation g-1's anon_vma
for that region, and a chain of g+1 entries (one per ancestor).
"""
from __future__ import annotations

import pytest

from tests.kernel.family import FamilyRun, run_family
from tests.kernel.stack import kernel_preempts, preempted_loss
from tracer.format.events import F_REUSED, Kind, lost_total

# The family end to end is also what the guests' auto pass runs (with the
# check tests): the automatic choice, proven on a real workload.
pytestmark = pytest.mark.auto_pass

REGIONS = 3
GENERATIONS = 4
PAGES_PER_REGION = 4  # tests/workloads/forkchain.c


@pytest.fixture(scope="module")
def family(forkchain_bin, backend) -> FamilyRun:
    return run_family(forkchain_bin, backend, REGIONS, GENERATIONS)


@pytest.fixture(autouse=True)
def _reported_loss(request: pytest.FixtureRequest, family: FamilyRun) -> None:
    """Where the kernel preempts our programs (fentry forced there, or
    tracepoint programs), a run that reported events lost may miss one of
    the family's: its exact figures, and test_no_events_lost, are then
    expected to fail, visibly (xfail, not strict; tests.kernel.stack.
    preempted_loss)."""
    reason = preempted_loss(family.backend, lost_total(family.lost),
                            {k: v for k, v in family.lost.items() if v})
    if reason:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=False))


def test_backend_as_requested(family: FamilyRun, backend: str) -> None:
    methods = {m for _, m in family.probes.values() if m}
    assert methods, family.probes
    expected = {"fentry": {"fentry", "fexit"}, "kprobe": {"kprobe", "kretprobe"},
                "tracepoint": {"tracepoint"}}.get(backend)
    if expected is not None:
        assert methods <= expected, family.probes
    elif kernel_preempts():
        # auto where fentry programs can be preempted: kprobes, whose
        # programs cannot (tracer.kernel.bpf_session.auto_order).
        assert methods <= {"kprobe", "kretprobe"}, family.probes


def test_no_events_lost(family: FamilyRun) -> None:
    # Nothing lost, skipped runs of the rmap-function programs included
    # (with fentry forced on a preempting kernel: xfail, _reported_loss).
    assert lost_total(family.lost) == 0, family.lost
    assert "recursion_misses" in family.lost and "tracepoint_recursion_misses" in family.lost
    # tracepoint_recursion_misses counts runs of a tracepoint program the kernel
    # skipped because it was already running on that CPU: an interrupt's slab
    # operation during a kmem program, never an rmap event
    # (tracer.format.events.NOT_LOST); the exact counts in the other tests
    # show none of the family's were missed. On a busy host (another job's
    # slab churn runs our kmem programs, and interrupts nest in them) misses
    # grow with that load: 204 were seen beside a fork-storm benchmark. Bound
    # them by the load measured: a systematic recursion would show as many.
    misses = family.lost["tracepoint_recursion_misses"]
    if kernel_preempts(tracepoints=True):
        # The premise above fails where a task can be preempted inside a
        # tracepoint program (sid's 7.2): there the programs' second copies
        # run the calls the first skipped (docs/state.md "Recursion misses"),
        # and their marks' task-storage allocations nest slab operations in
        # the first copy, skipped by design: no bound.
        assert "tracepoint_takeovers" in family.lost, family.lost
        return
    bound = 10 if family.other_cpu_per_s < 0.25 else 10 + 1000 * family.other_cpu_per_s
    assert misses <= bound, (family.lost, f"other CPU {family.other_cpu_per_s:.2f}/s")


def test_every_generation_reported(family: FamilyRun) -> None:
    assert sorted(family.gens) == list(range(GENERATIONS + 1))
    for g in range(1, GENERATIONS + 1):
        assert family.mm_of(family.gens[g].pid) != 0


@pytest.mark.parametrize("gen", range(1, GENERATIONS + 1))
def test_fork_depth_and_chain(family: FamilyRun, gen: int) -> None:
    forks = family.region_events(Kind.ANON_VMA_FORK, gen)
    assert len(forks) == REGIONS, [e.to_dict() for e in forks]
    for ev in forks:
        assert ev.depth == gen + 1, ev.to_dict()
        assert ev.chain_len == gen + 1, ev.to_dict()
        assert not ev.flags & F_REUSED  # everyone is alive: nothing to reuse
        assert ev.ret == 0
        assert ev.num_active_vmas == 1 and ev.num_children == 0, ev.to_dict()


def test_hierarchy_links_generations(family: FamilyRun) -> None:
    """Each fork's parent is the previous generation's anon_vma for the same
    region, and every generation shares the region's root."""
    by_gen = {g: {e.vm_start: e for e in family.region_events(Kind.ANON_VMA_FORK, g)}
              for g in range(1, GENERATIONS + 1)}
    for start in family.gens[0].regions:
        root = by_gen[1][start].root
        assert by_gen[1][start].parent == root
        for g in range(2, GENERATIONS + 1):
            assert by_gen[g][start].parent == by_gen[g - 1][start].anon_vma
            assert by_gen[g][start].root == root


@pytest.mark.parametrize("gen", range(1, GENERATIONS + 1))
def test_one_clone_per_region_per_fork(family: FamilyRun, gen: int) -> None:
    clones = family.region_events(Kind.ANON_VMA_CLONE, gen)
    assert len(clones) == REGIONS, [e.to_dict() for e in clones]
    for ev in clones:
        assert ev.ret == 0


def test_root_generation_depth_one(family: FamilyRun) -> None:
    """Generation 0's regions get root anon_vmas (depth 1, chain 1) on first
    fault: seen by page_set_anon_rmap, or by the derived allocation facts."""
    g0 = family.gens[0]
    facts = [e for e in family.events if e.tgid == g0.pid and e.vm_start in g0.regions
             and e.depth and e.kind in (Kind.PAGE_SET_ANON_RMAP, Kind.AVC_ALLOC)
             and e.mm == e.cur_mm]
    if family.probes["page_set_anon_rmap"][1] is None and not any(
            e.kind is Kind.AVC_ALLOC for e in facts):
        pytest.fail("no event carries generation 0's anon_vma facts")
    assert {e.vm_start for e in facts} == set(g0.regions)
    for ev in facts:
        assert (ev.depth, ev.chain_len) == (1, 1), ev.to_dict()


@pytest.mark.parametrize("gen", range(0, GENERATIONS + 1))
def test_page_set_anon_rmap_counts(family: FamilyRun, gen: int) -> None:
    function, method = family.probes["page_set_anon_rmap"]
    if method is None:
        pytest.skip("page_set_anon_rmap has no attach point with this backend "
                    f"({family.backend}): see anontrace check")
    rmaps = [e for e in family.region_events(Kind.PAGE_SET_ANON_RMAP, gen)]
    # Every page of every region is written once per generation: a first
    # fault in generation 0, a copy-on-write fault in the others.
    assert len(rmaps) == REGIONS * PAGES_PER_REGION, (function, [e.to_dict() for e in rmaps])
    for ev in rmaps:
        assert ev.depth == gen + 1


def test_family_frees_all_its_objects(family: FamilyRun) -> None:
    tgids = {g.pid for g in family.gens.values()}
    allocated_av = {e.anon_vma for e in family.events
                    if e.kind is Kind.AV_ALLOC and e.tgid in tgids}
    allocated_avc = {e.aux for e in family.events
                     if e.kind is Kind.AVC_ALLOC and e.tgid in tgids}
    freed_av = {e.anon_vma for e in family.events if e.kind is Kind.AV_FREE}
    freed_avc = {e.aux for e in family.events if e.kind is Kind.AVC_FREE}
    forked = {e.anon_vma for g in range(1, GENERATIONS + 1)
              for e in family.region_events(Kind.ANON_VMA_FORK, g)}
    assert len(forked) == REGIONS * GENERATIONS
    assert forked <= allocated_av
    # Each fork allocates the new anon_vma, its own chain entry and one
    # entry per ancestor: at least that many chain entries were made.
    assert len(allocated_avc) >= sum(REGIONS * (g + 1) for g in range(1, GENERATIONS + 1))
    assert allocated_av - freed_av == set(), "anon_vmas never freed"
    assert allocated_avc - freed_avc == set(), "anon_vma_chains never freed"


def test_unlink_seen_for_every_region_vma(family: FamilyRun) -> None:
    for g in range(1, GENERATIONS + 1):
        mm = family.mm_of(family.gens[g].pid)
        unlinked = {e.vm_start for e in family.events
                    if e.kind is Kind.UNLINK_ANON_VMAS and e.mm == mm}
        assert set(family.gens[g].regions) <= unlinked


def test_filter_excludes_bystander(family: FamilyRun) -> None:
    assert family.bystander_pid
    assert not [e for e in family.events if e.tgid == family.bystander_pid]
