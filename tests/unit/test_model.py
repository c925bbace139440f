"""tracer.model.hierarchy.Model: the anon_vma hierarchy rebuilt from recorded real-kernel
streams (the forkchain family) and from hand-built event sequences."""
from __future__ import annotations

import collections
import json

import pytest

from tests.unit import kfix
from tests.unit.family_shape import gen_mms
from tests.unit.model_streams import FAMILY_STREAMS, ev, first_teardown, model_stream
from tracer.commands.report import build_report
from tracer.format.events import F_THREAD, LOGICAL_KINDS, Event, Kind, Site
from tracer.model.hierarchy import Model
from tracer.model.types import AnonVmaInfo, Process, VmaInfo

PRE_V616 = {"6.1", "6.12"}  # sched_process_exit after exit_mm(): teardown before the exit event


# --- the recorded family ------------------------------------------------------

class Family:
    """A recorded forkchain stream and a model fed up to a point."""

    def __init__(self, series: str, backend: str) -> None:
        self.series, self.backend = series, backend
        self.events = model_stream(series, backend)
        self.meta = kfix.events_meta(series, backend)
        self.G = self.meta["generations"]
        self.R = self.meta["regions"]
        self.pids = {int(g): info["pid"] for g, info in self.meta["gens"].items()}
        self.regions = {int(g): info["regions"] for g, info in self.meta["gens"].items()}
        self.mms = gen_mms(self.events, self.meta)
        self.cut = first_teardown(self.events)
        self.model = Model()
        comm0 = next(e.comm for e in self.events if e.tgid == self.pids[0])
        self.model.add_process(self.pids[0], comm0, preexisting=True)

    def proc(self, g: int) -> Process:
        return self.model.processes[self.pids[g]]

    def region_vma(self, g: int, start: int) -> VmaInfo:
        """Generation g's VMA at ``start``: the one VMA of its mm in the model
        that the events show at that address (the model keeps no addresses)."""
        proc = self.proc(g)
        assert proc.mm is not None
        mine = self.model.mm_vmas(proc.mm)
        ptrs = {e.vma for e in self.events
                if e.mm == proc.mm.ptr and e.vma and e.vm_start == start} & set(mine)
        assert len(ptrs) == 1, (g, hex(start), len(ptrs))
        ptr = ptrs.pop()
        assert self.model.vma_info(proc.mm.ptr, ptr) == mine[ptr]
        return mine[ptr]

    def region_av(self, g: int, start: int) -> AnonVmaInfo:
        vma = self.region_vma(g, start)
        assert vma.anon_vma is not None, (g, hex(start))
        av = self.model.anon_vma_info(vma.anon_vma)
        assert av is not None, (g, hex(start))
        return av


@pytest.fixture(params=FAMILY_STREAMS, ids=lambda p: f"{p[0]}-{p[1]}")
def family(request) -> Family:
    return Family(*request.param)


@pytest.fixture
def alive(family: Family) -> Family:
    """The model fed until just before the first family teardown."""
    family.model.apply_all(family.events[:family.cut])
    return family


def test_family_shape_as_recorded(family: Family) -> None:
    assert (family.R, family.G) == (2, 3)
    assert set(family.pids) == set(range(family.G + 1))
    # the cut point sees all forks and nothing of any teardown
    head = family.events[:family.cut]
    assert sum(e.kind is Kind.PROC_FORK for e in head) == family.G
    assert not any(e.kind in (Kind.PROC_EXIT, Kind.UNLINK_ANON_VMAS) for e in head)


def test_all_generations_alive_with_their_mms(alive: Family) -> None:
    m = alive.model
    assert set(m.processes) == set(alive.pids.values())
    for g in range(alive.G + 1):
        p = alive.proc(g)
        assert p.alive
        assert p.mm is not None and p.mm.ptr == alive.mms[g], g
        assert p.comm == "forkchain"
        assert p.preexisting == (g == 0), g
        if g:
            assert p.ppid == alive.pids[g - 1], g
    assert m.retired == [] and m.take_exited() == []


def test_root_process_is_preexisting_so_state_is_partial(alive: Family) -> None:
    m = alive.model
    assert m.partial
    assert len(m.partial_reasons) == 1
    assert "before tracing began" in m.partial_reasons[0]
    assert m.lost_events == 0


def test_region_anon_vmas_have_depth_and_chain_g_plus_1(alive: Family) -> None:
    for g in range(alive.G + 1):
        for start in alive.regions[g]:
            vma = alive.region_vma(g, start)
            av = alive.region_av(g, start)
            assert av.depth == g + 1, (g, hex(start))
            assert vma.chain == g + 1, (g, hex(start))
            assert av.active == 1, (g, hex(start))


def test_forked_anon_vmas_belong_to_the_child_mm(alive: Family) -> None:
    for g in range(1, alive.G + 1):
        for start in alive.regions[g]:
            mm = alive.proc(g).mm
            assert mm is not None and alive.region_av(g, start).mm == mm.ptr, (g, hex(start))


def test_region_hierarchy_links_generation_to_generation(alive: Family) -> None:
    """gen g+1's anon_vma on a region is the child of gen g's; gen 0's is the
    root of all of them. In these recordings gen 0 faulted its regions in
    after tracing began, so even gen 0's anon_vmas are known objects."""
    for start in alive.regions[0]:
        avs = [alive.region_av(g, start) for g in range(alive.G + 1)]
        assert len({a.ptr for a in avs}) == alive.G + 1    # one anon_vma per generation
        assert avs[0].parent is None                       # a root (its parent is itself)
        for g in range(alive.G + 1):
            assert avs[g].root == avs[0].ptr, (g, hex(start))
            assert alive.model.anon_vma_info(avs[g].root) == avs[0], (g, hex(start))
        for g in range(1, alive.G + 1):
            assert avs[g].parent == avs[g - 1].ptr and avs[g].parent_live, (g, hex(start))
        for g in range(alive.G):
            assert avs[g].children == 1, (g, hex(start))  # its one child in gen g+1
        assert avs[alive.G].children == 0


def test_per_process_figures(alive: Family) -> None:
    m = alive.model
    for g in range(alive.G + 1):
        f = m.figures(alive.proc(g))
        assert f.max_depth == g + 1, g
        assert f.max_chain == g + 1, g
        assert f.max_degree == (1 if g < alive.G else 0), g
        assert f.anon_vmas >= alive.R, g
        assert f.events["unlink_anon_vmas"] == 0, g
        if g == 0:
            assert f.events["anon_vma_fork"] == 0
            continue
        # every VMA of a forked child was forked: all at depth and chain g+1
        assert f.anon_vma_chains == (g + 1) * f.anon_vmas, g
        # one anon_vma_clone per VMA with an anon_vma, an anon_vma_fork per
        # VMA (fentry/kprobe fire also for VMAs without one)
        assert f.events["anon_vma_clone"] == f.anon_vmas, g
        assert f.events["anon_vma_fork"] >= f.anon_vmas, g
    # the children of one family have the same mappings
    assert len({m.figures(alive.proc(g)).anon_vmas for g in range(1, alive.G + 1)}) == 1


def test_event_counters_are_attributed_by_mm(alive: Family) -> None:
    head = alive.events[:alive.cut]
    for g in range(alive.G + 1):
        want = collections.Counter(e.kind for e in head
                                   if e.kind in LOGICAL_KINDS and e.mm == alive.mms[g])
        got = alive.model.figures(alive.proc(g)).events
        assert got == {name: want[k] for k, name in LOGICAL_KINDS.items()}, g
    if alive.backend == "tracepoint":
        # no page_set_anon_rmap probe on the kmem backend
        assert all(alive.model.figures(alive.proc(g)).events["page_set_anon_rmap"] == 0
                   for g in range(alive.G + 1))
    else:
        assert all(alive.model.figures(alive.proc(g)).events["page_set_anon_rmap"] > 0
                   for g in range(alive.G + 1))


def test_totals_while_alive(alive: Family) -> None:
    m = alive.model
    t = m.totals()
    assert t["anon_vmas"] == len(m.anon_vmas) > 0
    assert t["orphaned_anon_vmas"] == 0     # every live anon_vma has a VMA
    assert t["anon_vma_chains"] == sum(m.figures(alive.proc(g)).anon_vma_chains
                                       for g in range(alive.G + 1))


def test_exits_free_everything(family: Family) -> None:
    """After the whole recording: nobody alive and, as observed on every
    recorded kernel and backend, nothing left over in the totals (tracing
    saw every free of what it saw allocated)."""
    m = family.model
    m.apply_all(family.events)
    assert m.processes == {}
    assert [p.pid for p in m.retired] == [family.pids[g] for g in range(family.G, -1, -1)]
    assert [p.pid for p in m.take_exited()] == [p.pid for p in m.retired]
    assert all(not p.alive and p.exited_ts > 0 for p in m.retired)
    assert m.totals() == {"anon_vmas": 0, "anon_vma_chains": 0, "orphaned_anon_vmas": 0}
    assert m.anon_vmas == {} and m.vmas == {}
    assert all(m.mm_vmas(mm) == {} for mm in m.mms.values())
    report = build_report(m, when=1.0, backend=family.backend, lost_events=0, exited=[],
                          final=True)
    json.dumps(report)
    assert [r["pid"] for r in report["processes"]] == sorted(family.pids.values())
    assert not any(r["alive"] for r in report["processes"])


def test_figures_at_exit(family: Family) -> None:
    """Figures at exit are those from just before the process's own mm
    teardown, on every kernel: since v6.16 the exit event comes first; before,
    exit_mm() tears the mm down first, and the figures are taken at the first
    unlink of that teardown (current->mm already NULL)."""
    m = family.model
    m.apply_all(family.events)
    by_pid = {p.pid: p for p in m.retired}
    for g in range(family.G + 1):
        p = by_pid[family.pids[g]]
        f = m.figures(p)
        assert f.max_depth == g + 1 and f.max_chain == g + 1, g
        assert f.max_degree == 0, g   # the child exited first
        assert f.events["unlink_anon_vmas"] == 0, g   # its own teardown is not counted
        assert p.exiting == (family.series in PRE_V616), g


@pytest.mark.parametrize("series,backend", [p for p in FAMILY_STREAMS if p[0] in PRE_V616])
def test_report_during_teardown_shows_figures_at_exit(series: str, backend: str) -> None:
    """A report made between the start of a process's own teardown and its
    exit event (kernels before v6.16; since then there is no such window)
    shows it alive with its figures from before the teardown, never a
    half-emptied mm."""
    family = Family(series, backend)
    m = family.model
    pid = family.pids[0]
    seen = 0
    for e in family.events:
        m.apply(e)
        proc = m.processes.get(pid)
        if proc is not None and proc.alive and proc.exiting:
            f = m.figures(proc)
            assert (f.max_depth, f.max_chain) == (1, 1)
            assert f.anon_vmas > 0 and f.anon_vma_chains > 0
            seen += 1
    assert seen > 0     # the stream has events inside the window


@pytest.mark.parametrize("series,backend", FAMILY_STREAMS)
def test_clean_stream_has_no_anomalies(series: str, backend: str) -> None:
    m = Model()
    m.apply_all(model_stream(series, backend))
    assert m.anomalies == 0


def test_counts_equal_a_recount_at_every_step(family: Family) -> None:
    """The counts kept as events arrive (live children, VMAs per anon_vma,
    the totals) equal a recount from the model's own VMAs after every event
    of a real kernel's stream."""
    m = family.model
    for e in family.events:
        m.apply(e)
        check_consistent(m)
        vmas = [v for mm in m.mms.values() for v in m.mm_vmas(mm).values()]
        t = m.totals()
        assert t["anon_vmas"] == len(m.anon_vmas)
        assert t["anon_vma_chains"] == sum(v.chain for v in vmas)
        assert t["orphaned_anon_vmas"] == sum(1 for av in m.anon_vmas.values() if not av.active)


# --- hand-built sequences ------------------------------------------------------

MM_A, MM_B, MM_C = 0xA000, 0xB000, 0xC000
AV_1, AV_2, AV_3 = 0x1100, 0x2200, 0x3300
VMA_1, VMA_2, VMA_3 = 0x10, 0x20, 0x30


def own(kind: Kind, tgid: int, mm: int, vma: int, av: int, depth: int, parent: int = 0,
        root: int = 0, chain: int = 0, comm: str = "p") -> Event:
    """A logical VMA event in the process's own context."""
    return ev(kind, tgid=tgid, mm=mm, cur_mm=mm, vma=vma, vm_start=vma << 12,
              vm_end=(vma + 1) << 12, anon_vma=av, depth=depth, chain_len=chain or depth,
              parent=parent or av, root=root or av, comm=comm)


def fork(parent: int, child: int, child_mm: int, parent_mm: int = 0, flags: int = 0,
         comm: str = "p") -> Event:
    return ev(Kind.PROC_FORK, tgid=parent, pid2=child, tid2=child, mm=child_mm,
              cur_mm=parent_mm, flags=flags, comm=comm, ts=1)


def exit_(tgid: int, flags: int = 0, ts: int = 2) -> Event:
    return ev(Kind.PROC_EXIT, tgid=tgid, flags=flags, ts=ts)


def check_consistent(m: Model) -> None:
    avs = dict(m.anon_vmas)
    vmas = [v for mm in m.mms.values() for v in m.mm_vmas(mm).values()]
    for ptr, av in avs.items():
        assert av.ptr == ptr
        assert av.active == sum(1 for v in vmas if v.anon_vma == ptr)
        assert av.children == sum(1 for c in avs.values() if c.parent == ptr and c.parent_live)


def test_a_root_process_and_its_child() -> None:
    m = Model()
    m.add_process(100, "p")
    assert not m.partial and m.partial_reasons == []
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(fork(100, 101, MM_B, MM_A))
    # anon_vma_fork runs in the parent's context, for the child's mm
    m.apply(ev(Kind.ANON_VMA_FORK, tgid=100, mm=MM_B, cur_mm=MM_A, vma=VMA_2, anon_vma=AV_2,
               depth=2, chain_len=2, parent=AV_1, root=AV_1))
    child = m.processes[101]
    assert child.ppid == 100 and child.mm is not None and child.mm.ptr == MM_B
    assert m.anon_vmas[AV_2].parent == AV_1 and m.anon_vmas[AV_2].parent_live
    assert m.anon_vmas[AV_2].root == AV_1 and AV_1 in m.anon_vmas
    assert m.anon_vmas[AV_1].children == 1
    f = m.figures(child)
    assert (f.anon_vmas, f.anon_vma_chains, f.max_depth, f.max_degree, f.max_chain) == \
        (1, 2, 2, 0, 2)
    assert f.events["anon_vma_fork"] == 1
    assert m.figures(m.processes[100]).max_degree == 1
    assert m.figures(m.processes[100]).events["page_set_anon_rmap"] == 1
    assert not m.partial
    check_consistent(m)


def test_pid_reuse_retires_the_old_holder() -> None:
    m = Model()
    m.add_process(100, "p")
    m.apply(fork(100, 101, MM_B, MM_A, comm="old"))
    old = m.processes[101]
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 101, MM_B, VMA_2, AV_2, 1, comm="old"))
    # 101's exit was missed; pid 101 is handed out again, forked by 100
    m.apply(ev(Kind.PROC_FORK, tgid=100, pid2=101, mm=MM_C, cur_mm=MM_A, comm="new", ts=5))
    new = m.processes[101]
    assert new is not old
    assert new.alive and new.mm is not None and new.mm.ptr == MM_C and new.ppid == 100
    assert not old.alive and old.exited_ts == 5
    assert old in m.retired and m.take_exited() == [old]
    assert m.figures(old).anon_vmas == 1          # figures as they were at retirement
    assert m.figures(new).anon_vmas == 0
    check_consistent(m)


def test_pointer_reuse_after_a_missed_free() -> None:
    """The same anon_vma pointer comes back with another depth: its free was
    lost; the stale object is replaced and its VMAs detached."""
    m = Model()
    m.add_process(100, "p")
    m.add_process(200, "q")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(own(Kind.ANON_VMA_CLONE, 100, MM_A, VMA_2, AV_2, 2, parent=AV_1, root=AV_1))
    stale = m.anon_vmas[AV_1]
    assert stale.children == 1
    assert not m.partial
    # AV_1 reappears at depth 3 under AV_3 in another process
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 200, MM_C, VMA_3, AV_1, 3, parent=AV_3, root=AV_3))
    fresh = m.anon_vmas[AV_1]
    assert fresh.serial != stale.serial            # another anon_vma record
    assert (fresh.depth, fresh.active, fresh.children) == (3, 1, 0)
    assert fresh.parent == AV_3 and not fresh.parent_live   # raw pointer: AV_3 never seen
    assert m.vmas[VMA_1].anon_vma is None          # detached from the stale record
    # still the stale record's child, not adopted by the new one
    assert m.anon_vmas[AV_2].parent == AV_1 and not m.anon_vmas[AV_2].parent_live
    assert m.anomalies >= 1
    assert m.partial and any("pointer reused" in r for r in m.partial_reasons)
    assert m.figures(m.processes[200]).max_depth == 3
    assert m.figures(m.processes[100]).max_depth == 2
    check_consistent(m)


@pytest.mark.parametrize("kind", [Kind.PAGE_SET_ANON_RMAP, Kind.AVC_ALLOC])
def test_pointer_reuse_seen_on_the_vma_that_held_it(kind: Kind) -> None:
    """The VMA's own anon_vma pointer comes back with another depth: the
    stale record is dropped (detaching the VMA), the VMA points at the new."""
    m = Model()
    m.apply(own(kind, 100, MM_A, VMA_1, AV_1, 1))
    stale = m.anon_vmas[AV_1]
    m.apply(own(kind, 100, MM_A, VMA_1, AV_1, 2, parent=AV_2, root=AV_2))
    fresh = m.anon_vmas[AV_1]
    assert fresh.serial != stale.serial and (fresh.depth, fresh.active) == (2, 1)
    assert m.vma_info(MM_A, VMA_1) == VmaInfo(AV_1, 2, MM_A)
    assert m.anomalies == 2    # the reuse, and a VMA still pointing at the stale one
    assert m.totals() == {"anon_vmas": 1, "anon_vma_chains": 2, "orphaned_anon_vmas": 0}
    check_consistent(m)


def test_allocation_of_a_live_pointer_means_its_free_was_missed() -> None:
    m = Model()
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(own(Kind.ANON_VMA_CLONE, 101, MM_B, VMA_2, AV_2, 2, parent=AV_1, root=AV_1))
    # both anon_vmas freed unseen; AV_1 is allocated again as a new root
    m.apply(ev(Kind.AV_ALLOC, tgid=200, cur_mm=MM_C, anon_vma=AV_1, site=Site.PREPARE))
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 200, MM_C, VMA_3, AV_1, 1))
    new = m.anon_vmas[AV_1]
    assert new.active == 1 and new.children == 0
    assert m.figures(m.processes[200]).max_degree == 0
    assert m.partial and any("missed" in r for r in m.partial_reasons)


def test_lost_events_mark_the_state_partial() -> None:
    m = Model()
    m.add_process(100, "p")
    assert not m.partial
    m.note_lost(7)
    assert m.partial and m.lost_events == 7
    assert m.partial_reasons[0].startswith("7 events lost")
    m.note_lost(0)
    assert not m.partial
    m.add_reason("outside reason")
    assert m.partial and m.partial_reasons == ["outside reason"]


def test_exec_changes_mm_and_comm() -> None:
    m = Model()
    m.add_process(100, "sh")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1, comm="sh"))
    m.apply(ev(Kind.PROC_EXEC, tgid=100, mm=MM_B, cur_mm=MM_B, comm="prog"))
    p = m.processes[100]
    assert p.comm == "prog"
    assert p.mm is not None and p.mm.ptr == MM_B
    assert [mm.ptr for mm in p.mms] == [MM_A, MM_B]
    assert m.figures(p).anon_vmas == 0            # the new mm has no anon_vma yet
    assert m.figures(p).events["page_set_anon_rmap"] == 1   # counted over every mm
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_B, VMA_2, AV_2, 1, comm="prog"))
    assert m.figures(p).anon_vmas == 1 and m.figures(p).events["page_set_anon_rmap"] == 2
    assert not m.partial


def test_exec_into_a_recycled_mm_pointer() -> None:
    m = Model()
    m.add_process(100, "sh")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1, comm="sh"))
    m.apply(ev(Kind.PROC_EXEC, tgid=100, mm=MM_B, cur_mm=MM_B, comm="a"))
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=100, mm=MM_A, vma=VMA_1))   # old mm torn down
    m.apply(ev(Kind.AV_FREE, tgid=100, anon_vma=AV_1, site=Site.PUT))
    m.apply(ev(Kind.PROC_EXEC, tgid=100, mm=MM_A, cur_mm=MM_A, comm="b"))  # MM_A recycled
    p = m.processes[100]
    assert p.comm == "b"
    assert p.mm is not None and p.mm.ptr == MM_A


def test_exit_while_anon_vmas_live_on_under_a_descendant() -> None:
    m = Model()
    m.add_process(100, "p")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(fork(100, 101, MM_B, MM_A))
    m.apply(ev(Kind.ANON_VMA_FORK, tgid=100, mm=MM_B, cur_mm=MM_A, vma=VMA_2, anon_vma=AV_2,
               depth=2, chain_len=2, parent=AV_1, root=AV_1))
    # the parent exits: its VMA goes, its anon_vma stays (the child's chain holds it)
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=100, mm=MM_A, vma=VMA_1, anon_vma=AV_1, depth=1))
    m.apply(exit_(100))
    assert 100 not in m.processes and [p.pid for p in m.take_exited()] == [100]
    assert m.totals() == {"anon_vmas": 2, "anon_vma_chains": 2, "orphaned_anon_vmas": 1}
    root = m.anon_vmas[AV_1]
    assert (root.active, root.children) == (0, 1)
    assert m.figures(m.processes[101]).max_depth == 2
    check_consistent(m)
    # the child exits too: everything goes
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=101, mm=MM_B, vma=VMA_2, anon_vma=AV_2, depth=2))
    m.apply(ev(Kind.AV_FREE, tgid=101, anon_vma=AV_2, site=Site.PUT))
    m.apply(ev(Kind.AV_FREE, tgid=101, anon_vma=AV_1, site=Site.PUT))
    m.apply(exit_(101))
    assert m.totals() == {"anon_vmas": 0, "anon_vma_chains": 0, "orphaned_anon_vmas": 0}
    assert m.processes == {}
    check_consistent(m)


def test_threads_do_not_create_or_retire_processes() -> None:
    m = Model()
    m.add_process(100, "p")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(ev(Kind.PROC_FORK, tgid=100, tid=100, pid2=100, tid2=105, mm=MM_A, cur_mm=MM_A,
               flags=F_THREAD))
    assert set(m.processes) == {100}
    # a thread faults in the process's mm: attributed to the process
    m.apply(ev(Kind.PAGE_SET_ANON_RMAP, tgid=100, tid=105, mm=MM_A, cur_mm=MM_A, vma=VMA_2,
               anon_vma=AV_2, parent=AV_2, root=AV_2, depth=1, chain_len=1))
    m.apply(ev(Kind.PROC_EXIT, tgid=100, tid=105, flags=F_THREAD))
    p = m.processes[100]
    assert p.alive and m.retired == [] and m.take_exited() == []
    assert m.figures(p).anon_vmas == 2
    assert m.figures(p).events["page_set_anon_rmap"] == 2
    m.apply(exit_(100))
    assert m.processes == {} and not p.alive


def test_preexisting_processes_are_partial() -> None:
    m = Model()
    p = m.add_process(100, "p", ppid=1, preexisting=True)
    assert p.preexisting and p.ppid == 1
    assert m.partial and any("before tracing began" in r for r in m.partial_reasons)


def test_a_process_first_seen_mid_life_is_preexisting() -> None:
    m = Model(ppid_of=lambda pid: 42 if pid == 300 else 0)
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 300, MM_A, VMA_1, AV_1, 1, comm="late"))
    p = m.processes[300]
    assert p.preexisting and p.ppid == 42 and p.comm == "late"
    assert p.mm is not None and p.mm.ptr == MM_A
    assert m.partial and any("before tracing began" in r for r in m.partial_reasons)


def test_fork_does_not_make_the_child_preexisting() -> None:
    m = Model()
    m.add_process(100, "p")
    m.apply(fork(100, 101, MM_B, MM_A))
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 101, MM_B, VMA_2, AV_2, 1))
    assert not m.processes[101].preexisting
    assert not m.partial


def test_av_free_with_vmas_still_pointing_at_it() -> None:
    m = Model()
    m.add_process(100, "p")
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_2, AV_1, 1))
    m.apply(own(Kind.ANON_VMA_CLONE, 100, MM_A, VMA_3, AV_2, 2, parent=AV_1, root=AV_1))
    assert m.anon_vmas[AV_1].active == 2 and m.anon_vmas[AV_1].children == 1
    child = m.anon_vmas[AV_2]
    m.apply(ev(Kind.AV_FREE, tgid=100, anon_vma=AV_1, site=Site.PUT))  # unlinks were lost
    assert AV_1 not in m.anon_vmas
    assert m.vmas[VMA_1].anon_vma is None and m.vmas[VMA_2].anon_vma is None
    assert m.anomalies == 1
    after = m.anon_vmas[AV_2]
    assert after.serial == child.serial            # the same anon_vma, kept
    assert after.parent == AV_1 and not after.parent_live   # its parent's pointer, unlinked
    assert (after.depth, after.active, after.children) == (child.depth, child.active, 0)
    f = m.figures(m.processes[100])
    assert (f.anon_vmas, f.max_depth) == (1, 2)
    assert m.totals()["anon_vmas"] == 1
    check_consistent(m)
    # a free of an unknown pointer is ignored
    m.apply(ev(Kind.AV_FREE, anon_vma=0xDEAD, site=Site.PUT))
    assert m.anomalies == 1 and len(m.anon_vmas) == 1


def test_unlink_forgets_the_vma_and_av_alloc_then_facts() -> None:
    m = Model()
    m.apply(ev(Kind.AV_ALLOC, tgid=100, cur_mm=MM_A, anon_vma=AV_1, site=Site.PREPARE))
    av = m.anon_vmas[AV_1]
    assert av.depth == 0 and av.active == 0
    assert m.totals()["orphaned_anon_vmas"] == 1
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    now = m.anon_vmas[AV_1]
    assert now.serial == av.serial and now.depth == 1 and now.active == 1   # the same one
    assert now.mm == MM_A and now.root == AV_1 and now.parent is None
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=100, mm=MM_A, cur_mm=MM_A, vma=VMA_1))   # munmap
    assert VMA_1 not in m.vmas and m.anon_vmas[AV_1].active == 0
    assert m.anon_vmas[AV_1].serial == av.serial
    assert m.figures(m.processes[100]).events["unlink_anon_vmas"] == 1
    m.apply(ev(Kind.AV_FREE, anon_vma=AV_1, site=Site.PUT))
    assert m.anon_vmas == {} and m.anomalies == 0


def test_vma_pointer_reused_by_another_mm() -> None:
    """VMAs are looked up in the event's mm: a VMA pointer freed in one mm
    (its unlink seen) and reused in another is two VMAs, one after the other.
    If the unlink was lost, the old mm keeps a stale entry until it goes:
    there is no global VMA index (memory), and the loss already marks the
    state partial."""
    m = Model()
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_1, AV_1, 1))
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=100, mm=MM_A, vma=VMA_1))
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 200, MM_B, VMA_1, AV_2, 1))
    assert m.vmas[VMA_1] == VmaInfo(AV_2, 1, MM_B)
    assert m.vma_info(MM_A, VMA_1) is None and m.mm_vmas(MM_A) == {}
    assert m.anon_vmas[AV_1].active == 0 and m.anon_vmas[AV_2].active == 1
    check_consistent(m)
    # the unlink of VMA_1 in MM_A was lost: both entries live, each counted once
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 100, MM_A, VMA_2, AV_1, 1))
    m.apply(own(Kind.PAGE_SET_ANON_RMAP, 300, MM_C, VMA_2, AV_3, 1))
    assert m.vma_info(MM_A, VMA_2) == VmaInfo(AV_1, 1, MM_A)
    assert m.vma_info(MM_C, VMA_2) == VmaInfo(AV_3, 1, MM_C)
    assert m.anon_vmas[AV_1].active == 1 and m.anon_vmas[AV_3].active == 1
    check_consistent(m)
    # each mm's teardown removes its own entry
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=100, mm=MM_A, vma=VMA_2))
    assert m.vma_info(MM_C, VMA_2) == VmaInfo(AV_3, 1, MM_C)
    assert m.anon_vmas[AV_1].active == 0 and m.anon_vmas[AV_3].active == 1
    check_consistent(m)


def test_a_vfork_child_leaving_an_empty_shared_mm_keeps_it_for_the_parent() -> None:
    """vfork shares the parent's mm with the child until the child execs or
    exits. A child that exits (no exec) while that mm has no anon VMA yet must
    not take the mm with it: the parent still lives on it."""
    mm, parent, child = 0xA000, 10, 11
    m = Model(ppid_of=lambda pid: 1)
    m.add_process(parent, "sh", preexisting=True)
    m.apply(ev(Kind.PROC_EXEC, tgid=parent, mm=mm, cur_mm=mm, comm="sh"))
    m.apply(ev(Kind.PROC_FORK, tgid=parent, pid2=child, mm=mm, cur_mm=mm, comm="sh"))
    m.apply(ev(Kind.PROC_EXIT, tgid=child, mm=mm, cur_mm=mm, comm="sh"))
    assert m.mms.get(mm) is m.processes[parent].mm
    # The parent, resumed, faults its first anonymous page.
    m.apply(ev(Kind.ANON_VMA_FORK, tgid=parent, mm=mm, cur_mm=mm, vma=0x100, vm_start=4096,
               vm_end=8192, anon_vma=0x200, parent=0x200, root=0x200, depth=1, chain_len=1,
               comm="sh"))
    proc = m.processes[parent]
    assert proc.mm is m.mms[mm]
    assert m.figures(proc).anon_vmas == 1
