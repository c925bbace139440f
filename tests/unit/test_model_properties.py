"""tracer.model.hierarchy.Model under random event sequences (hypothesis): it never
raises and its bookkeeping stays consistent after every step."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.model_streams import FAMILY_STREAMS, model_stream
from tracer.commands.report import build_report
from tracer.format.events import (
    F_CHAIN_TRUNCATED,
    F_DEFERRED,
    F_DEPTH_TRUNCATED,
    F_REUSED,
    F_SYNTHETIC,
    F_THREAD,
    Event,
    Kind,
    Site,
)
from tracer.model.hierarchy import Model

# small pools so that pointers, pids and mms collide
AVS = [0, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
VMAS = [0, 0x10, 0x20, 0x30, 0x40]
MMS = [0, 0xA00, 0xB00, 0xC00]
PIDS = [0, 1, 100, 101, 102]
FLAGS = [0, F_DEPTH_TRUNCATED, F_CHAIN_TRUNCATED, F_DEFERRED, F_THREAD, F_REUSED, F_SYNTHETIC]

small = st.integers(0, 6)
u32 = st.one_of(small, st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(AVS + VMAS + MMS), st.integers(0, 2**64 - 1))


@st.composite
def events(draw) -> Event:
    kind = draw(st.sampled_from(list(Kind)))
    av = draw(st.sampled_from(AVS))
    mm = draw(st.sampled_from(MMS))
    same_ctx = draw(st.booleans())
    return Event(
        ts=draw(st.integers(0, 2**64 - 1)),
        mm=mm,
        cur_mm=mm if same_ctx else draw(st.sampled_from(MMS)),
        vma=draw(st.sampled_from(VMAS)),
        vm_start=draw(st.sampled_from([0, 0x1000, 0x2000])),
        vm_end=draw(st.sampled_from([0, 0x2000, 0x3000])),
        anon_vma=av,
        parent=draw(st.one_of(st.just(av), st.sampled_from(AVS))),
        root=draw(st.one_of(st.just(av), st.sampled_from(AVS))),
        aux=draw(u64), aux2=draw(u64),
        num_children=draw(u32), num_active_vmas=draw(u32),
        kind=kind,
        tgid=draw(st.sampled_from(PIDS)),
        tid=draw(st.sampled_from(PIDS + [200])),
        depth=draw(u32),
        chain_len=draw(u32),
        ret=draw(st.integers(-2**31, 2**31 - 1)),
        pid2=draw(st.sampled_from(PIDS)),
        tid2=draw(st.sampled_from(PIDS + [200])),
        site=draw(st.sampled_from(list(Site))),
        flags=draw(st.one_of(st.sampled_from(FLAGS), st.integers(0, 2**32 - 1))),
        comm=draw(st.text(max_size=16)),
    )


@st.composite
def plausible_events(draw) -> Event:
    """Events shaped like real ones (small depths, consistent context), so
    that hierarchies, forks and exits actually build up."""
    kind = draw(st.sampled_from([Kind.ANON_VMA_FORK, Kind.ANON_VMA_CLONE,
                                 Kind.PAGE_SET_ANON_RMAP, Kind.PAGE_SET_ANON_RMAP,
                                 Kind.UNLINK_ANON_VMAS, Kind.AV_ALLOC, Kind.AV_FREE,
                                 Kind.AVC_ALLOC, Kind.PROC_FORK, Kind.PROC_FORK,
                                 Kind.PROC_EXEC, Kind.PROC_EXIT]))
    tgid = draw(st.sampled_from(PIDS[1:]))
    mm = draw(st.sampled_from(MMS[1:]))
    av = draw(st.sampled_from(AVS[1:]))
    depth = draw(st.integers(0, 4))
    fork_ctx = kind is Kind.ANON_VMA_FORK and draw(st.booleans())
    return Event(
        ts=draw(st.integers(0, 1000)), mm=mm,
        cur_mm=draw(st.sampled_from(MMS[1:])) if fork_ctx else mm,
        vma=draw(st.sampled_from(VMAS[1:])), vm_start=0x1000, vm_end=0x2000, anon_vma=av,
        parent=av if depth <= 1 else draw(st.sampled_from(AVS[1:])),
        root=av if depth <= 1 else draw(st.sampled_from(AVS[1:])),
        aux=0, aux2=0, num_children=0, num_active_vmas=0, kind=kind, tgid=tgid, tid=tgid,
        depth=depth, chain_len=depth, ret=0,
        pid2=draw(st.sampled_from(PIDS[1:])), tid2=0,
        site=draw(st.sampled_from([Site.NONE, Site.FORK, Site.PUT, Site.UNLINK])),
        flags=draw(st.sampled_from([0, 0, 0, F_THREAD])),
        comm=draw(st.sampled_from(["a", "b"])),
    )


_ZERO = dict(ts=0, mm=0, cur_mm=0, vma=0, vm_start=0, vm_end=0, anon_vma=0, parent=0, root=0,
             aux=0, aux2=0, num_children=0, num_active_vmas=0, kind=Kind.SYNC, tgid=0, tid=0,
             depth=0, chain_len=0, ret=0, pid2=0, tid2=0, site=Site.NONE, flags=0, comm="")

steps = st.lists(st.one_of(
    plausible_events().map(lambda e: ("apply", e)),
    plausible_events().map(lambda e: ("apply", e)),
    events().map(lambda e: ("apply", e)),
    st.integers(0, 5).map(lambda n: ("lost", n)),
    st.just(("report", None)),
), max_size=80)


def check_invariants(m: Model) -> None:
    avs = dict(m.anon_vmas)
    assert len(avs) == len(m.anon_vmas)
    vmas = [(mm.ptr, ptr, v) for mm in m.mms.values() for ptr, v in m.mm_vmas(mm).items()]
    for ptr, av in avs.items():
        assert av.ptr == ptr and m.anon_vma_info(ptr) == av
        assert av.active == sum(1 for _, _, v in vmas if v.anon_vma == ptr), hex(ptr)
        assert av.children == sum(1 for c in avs.values()
                                  if c.parent == ptr and c.parent_live), hex(ptr)
        assert not av.parent_live or av.parent in avs, hex(ptr)
    assert len({av.serial for av in avs.values()}) == len(avs)
    for mm_ptr, ptr, vma in vmas:
        assert vma.mm == mm_ptr and m.vma_info(mm_ptr, ptr) == vma
        assert vma.anon_vma is None or vma.anon_vma in avs
    t = m.totals()
    assert t["anon_vmas"] == len(m.anon_vmas)
    assert t["orphaned_anon_vmas"] <= t["anon_vmas"]
    # the totals, kept as events arrive, equal the totals recomputed here
    assert t["anon_vma_chains"] == sum(v.chain for _, _, v in vmas)
    assert t["orphaned_anon_vmas"] == sum(1 for av in avs.values() if not av.active)
    assert m.anon_vma_chain_count() == t["anon_vma_chains"]
    assert m.orphaned_count() == t["orphaned_anon_vmas"]
    # A live process's figures, recounted from its mm's VMAs (README
    # "Definitions"); its events are those counted for its mms.
    for p in m.processes.values():
        if p.at_exit is not None and p.exiting:
            continue
        f = m.figures(p)
        mine = [v for mm_ptr, _, v in vmas if p.mm is not None and mm_ptr == p.mm.ptr]
        ids = {v.anon_vma for v in mine if v.anon_vma is not None}
        assert f.anon_vmas == len(ids)
        assert f.anon_vma_chains == sum(v.chain for v in mine)
        assert f.max_chain == max((v.chain for v in mine), default=0)
        assert f.max_depth == max((avs[i].depth for i in ids), default=0)
        assert f.max_degree == max((avs[i].children for i in ids), default=0)
    for pid, p in m.processes.items():
        assert p.pid == pid and p.alive
    assert all(not p.alive for p in m.retired)


def run(m: Model, seq) -> None:
    lost = 0
    for op, arg in seq:
        if op == "apply":
            m.apply(arg)
        elif op == "lost":
            lost += arg
            m.note_lost(lost)
        else:
            rep = build_report(m, when=1.5, backend="fentry", lost_events=lost,
                               exited=m.take_exited(), final=False)
            json.dumps(rep)
            m.forget_mm_if_dead()
        check_invariants(m)
    rep = build_report(m, when=2.0, backend="fentry", lost_events=lost,
                       exited=m.take_exited(), final=True)
    assert json.loads(json.dumps(rep))["totals"] == m.totals()
    assert rep["partial"] == m.partial


@settings(max_examples=300, deadline=None)
@given(steps, st.lists(st.sampled_from(PIDS), max_size=2, unique=True))
def test_random_sequences_keep_the_model_consistent(seq, declared) -> None:
    m = Model(ppid_of=lambda pid: 1)
    for pid in declared:
        m.add_process(pid, "declared", preexisting=pid == 1)
    run(m, seq)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FAMILY_STREAMS), st.data())
def test_real_streams_with_events_dropped_or_garbage_inserted(stream, data) -> None:
    """Lost events modelled as holes in a recorded stream, plus random junk."""
    evs = model_stream(*stream)
    keep = data.draw(st.lists(st.booleans(), min_size=len(evs), max_size=len(evs)))
    junk = data.draw(st.lists(st.tuples(st.integers(0, len(evs)), events()), max_size=10))
    seq = [("apply", e) for e, k in zip(evs, keep, strict=True) if k]
    for pos, e in sorted(junk, key=lambda t: -t[0]):
        seq.insert(min(pos, len(seq)), ("apply", e))
    m = Model()
    run(m, seq)


def test_invariant_checker_catches_a_broken_children_count() -> None:
    """The checker above can fail (guards against a vacuous property)."""
    m = Model()
    m.apply(Event(**{**_ZERO, "kind": Kind.AV_ALLOC, "anon_vma": 1}))
    check_invariants(m)
    m._children[m._avs[1] & 0xFFFF_FFFF] = 1   # corrupt the children column
    try:
        check_invariants(m)
    except AssertionError:
        return
    raise AssertionError("check_invariants accepted children=1 without a child")
