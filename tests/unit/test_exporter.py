"""The exporter's view and collector on event streams recorded from real
kernels (forkchain: 2 regions, 3 generations, all alive until teardown)."""
from __future__ import annotations

import pytest
from prometheus_client.registry import CollectorRegistry

from exporters.metrics_spec import METRICS, PROBES, sample_names
from exporters.prometheus import AnontraceCollector, ExportState, ProbeStatus, depth_buckets
from exporters.view import TopView
from tests.unit import kfix
from tests.unit.model_streams import FAMILY_STREAMS, ev, first_teardown, model_stream
from tests.unit.scrape import scrape
from tracer.format.events import Kind, safe_comm
from tracer.model.hierarchy import Model


def _alive_model(series: str, backend: str) -> tuple[Model, dict]:
    events = model_stream(series, backend)
    m = Model()
    m.apply_all(events[:first_teardown(events)])
    return m, kfix.events_meta(series, backend)




@pytest.mark.parametrize("series,backend", FAMILY_STREAMS)
def test_family_figures_from_recorded_streams(series: str, backend: str) -> None:
    m, meta = _alive_model(series, backend)
    snap = TopView(top_k=50, expiry_s=60).snapshot(m, now=0.0)
    gens = meta["gens"]
    root_pid = str(gens["0"]["pid"])
    fams = {f.family: f for f in snap.families}
    assert root_pid in fams, fams
    fam = fams[root_pid]
    # generation g holds depth g + 1 on every region
    assert fam.max_depth == meta["generations"] + 1
    # every generation's anon_vmas on the family's regions hang under gen 0's roots
    assert fam.anon_vmas >= meta["regions"] * (meta["generations"] + 1)
    rows = {r.pid: r for r in snap.processes}
    # Every generation is alive, so no fork reused an anon_vma: each of its
    # anon VMAs sits exactly g + 1 deep.
    assert {info["pid"] for info in gens.values()} <= set(rows), (gens, rows)
    for g, info in gens.items():
        assert rows[info["pid"]].max_depth == int(g) + 1, (g, rows[info["pid"]])
    # The host totals the view exports equal a recount from the model's VMAs
    # and anon_vmas (the model keeps them incrementally).
    vmas = m.vmas.values()
    avs = m.anon_vmas.values()
    assert snap.anon_vmas == sum(1 for _ in avs) > 0
    assert snap.anon_vma_chains == sum(v.chain for v in vmas) > 0
    assert snap.orphaned_anon_vmas == sum(1 for a in m.anon_vmas.values() if not a.active)


def test_top_k_bounds_processes_and_families() -> None:
    m = Model()
    for pid in range(100, 400):       # 300 processes, pid p has p % 7 + 1 anon VMAs
        mm = 0x1000 * pid
        m.apply(ev(Kind.PROC_EXEC, tgid=pid, mm=mm, cur_mm=mm, comm=f"p{pid}"))
        for i in range(pid % 7 + 1):
            av = mm + 0x10 * (i + 1)
            m.apply(ev(Kind.PAGE_SET_ANON_RMAP, tgid=pid, mm=mm, cur_mm=mm, vma=mm + i + 1,
                       anon_vma=av, root=av, parent=av, depth=1, chain_len=1, comm=f"p{pid}"))
    view = TopView(top_k=5, expiry_s=10)
    snap = view.snapshot(m, now=0.0)
    assert len(snap.processes) == 5 and len(snap.families) == 5
    assert all(r.anon_vmas == 7 for r in snap.processes)
    assert [r.anon_vmas for r in snap.families] == [7] * 5
    # Exited processes stay eligible for expiry_s, then go.
    for pid in range(100, 400):
        m.apply(ev(Kind.PROC_EXIT, tgid=pid, comm=f"p{pid}"))
    view.note_exited(m.take_exited(), now=1.0)
    assert len(view.snapshot(m, now=2.0).processes) == 5
    assert view.snapshot(m, now=20.0).processes == []


def test_hostile_comm_labels() -> None:
    # prometheus-client escapes quotes and backslashes itself
    assert safe_comm('a"b\\c\nd\x00e') == 'a"b\\c?d?e'
    assert safe_comm("a\u2028b\u200bc\x9bd") == "a?b?c?d"
    assert len(safe_comm("x" * 100)) == 16
    m = Model()
    mm = 0xffff888100000000
    m.apply(ev(Kind.PROC_EXEC, tgid=42, mm=mm, cur_mm=mm, comm='"}\n{x="1'))
    m.apply(ev(Kind.PAGE_SET_ANON_RMAP, tgid=42, mm=mm, cur_mm=mm, vma=mm + 8, anon_vma=mm + 16,
               root=mm + 16, parent=mm + 16, depth=1, chain_len=1, comm='"}\n{x="1'))
    snap = TopView(top_k=3, expiry_s=1).snapshot(m, now=0.0)
    got = scrape(ExportState(snapshot=snap))
    [(labels, value)] = got["anontrace_process_anon_vmas"]
    assert labels == {"pid": "42", "comm": '"}?{x="1'} and value == 1


def test_collector_describe_and_names() -> None:
    reg = CollectorRegistry()
    calls = []
    col = AnontraceCollector(lambda: calls.append(1) or ExportState(snapshot=_empty()),
                             registry=reg)
    # describe() names every metric without reading the state
    assert [m.name for m in col.describe()] == [m.name for m in METRICS]
    assert not calls
    state = ExportState(snapshot=_empty(), events_by_probe={"anon_vma_fork": 3},
                        lost_events=2, build={"version": "1", "kernel": "k", "backend": "b",
                                              "transport": "t"},
                        probes=[ProbeStatus(p, "f", "fentry", p != PROBES[-1]) for p in PROBES])
    got = scrape(state)
    assert set(got) <= sample_names()
    assert dict((lab["probe"], v) for lab, v in got["anontrace_events_total"]) == {
        "anon_vma_fork": 3, "anon_vma_clone": 0, "unlink_anon_vmas": 0, "page_set_anon_rmap": 0}
    assert got["anontrace_lost_events_total"] == [({}, 2)]
    attached = {lab["probe"]: v for lab, v in got["anontrace_probe_attached"]}
    assert attached[PROBES[0]] == 1 and attached[PROBES[-1]] == 0
    assert got["anontrace_build_info"][0][0]["backend"] == "b"


def test_depth_buckets_are_cumulative() -> None:
    buckets, total = depth_buckets({1: 4, 2: 3, 7: 1, 100: 2})
    b = dict(buckets)
    assert b["1.0"] == 4 and b["2.0"] == 7 and b["6.0"] == 7 and b["8.0"] == 8
    assert b["64.0"] == 8 and b["+Inf"] == 10
    assert total == 4 + 6 + 7 + 200


def _empty():
    from exporters.view import Snapshot
    return Snapshot()


def test_family_survives_root_pointer_reuse() -> None:
    """The slab hands a freed root's pointer to a new root: the family is
    named after the new creator, not the old one (seen live: a fork loop's
    freed roots reused by the next workload)."""
    m = Model()
    view = TopView(top_k=5, expiry_s=1)
    av = 0xffff888100001000

    def own(pid: int, comm: str) -> None:
        mm = 0xffff888200000000 + pid * 0x1000
        m.apply(ev(Kind.PROC_EXEC, tgid=pid, mm=mm, cur_mm=mm, comm=comm))
        m.apply(ev(Kind.PAGE_SET_ANON_RMAP, tgid=pid, mm=mm, cur_mm=mm, vma=mm + 8, anon_vma=av,
                   root=av, parent=av, depth=1, chain_len=1, comm=comm))

    own(10, "old")
    assert [(f.family, f.comm) for f in view.snapshot(m, 0.0).families] == [("10", "old")]
    m.apply(ev(Kind.UNLINK_ANON_VMAS, tgid=10, mm=0xffff888200000000 + 10 * 0x1000,
               vma=0xffff888200000000 + 10 * 0x1000 + 8))
    m.apply(ev(Kind.AV_FREE, anon_vma=av))
    own(20, "new")
    assert [(f.family, f.comm) for f in view.snapshot(m, 1.0).families] == [("20", "new")]


def test_prctl_rename_reaches_the_label_but_thread_names_do_not() -> None:
    m = Model()
    mm = 0xffff888300000000

    def fault(vma: int, tid: int, comm: str) -> None:
        m.apply(ev(Kind.PAGE_SET_ANON_RMAP, tgid=7, tid=tid, mm=mm, cur_mm=mm, vma=vma,
                   anon_vma=vma + 0x100, root=vma + 0x100, parent=vma + 0x100, depth=1,
                   chain_len=1, comm=comm))

    m.apply(ev(Kind.PROC_EXEC, tgid=7, mm=mm, cur_mm=mm, comm="worker"))
    fault(mm + 0x10, 7, "worker")
    fault(mm + 0x20, 8, "gc-thread")          # a thread's name is not the process's
    assert m.processes[7].comm == "worker"
    fault(mm + 0x30, 7, 'a"b\nc')             # the leader renamed itself
    snap = TopView(top_k=1, expiry_s=1).snapshot(m, now=0.0)
    assert [(r.pid, r.comm) for r in snap.processes] == [(7, 'a"b?c')]
