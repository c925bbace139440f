"""tracer.pipeline.derive.Deriver: logical probes rebuilt from kmem events."""
from __future__ import annotations

import collections
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit import kfix
from tests.unit.family_shape import expected_shape, region_events, shape
from tests.unit.model_streams import raw_events
from tracer.commands.report import build_report
from tracer.format.events import F_DEFERRED, F_REUSED, F_SYNTHETIC, Event, Kind, Site
from tracer.model.hierarchy import Model
from tracer.pipeline.derive import Deriver

HOST = ("6.18", "tracepoint")
REAL = [("6.1", "fentry"), ("6.1", "kprobe"), ("6.12", "fentry"), ("6.12", "kprobe")]


def raw_stream(series: str, backend: str) -> list[Event]:
    """What the BPF side sent: the recording minus the session's derived events."""
    return [ev for ev in kfix.events(series, backend) if not ev.flags & F_SYNTHETIC]


def derive(events: list[Event], batch: int | None = None) -> list[Event]:
    d = Deriver()
    out: list[Event] = []
    if batch is None:
        out = d.feed(events)
    else:
        for i in range(0, len(events), batch):
            out.extend(d.feed(events[i:i + batch]))
    return out + d.flush()


# --- the recorded host stream -------------------------------------------------

def test_recorded_stream_is_raw_plus_derived() -> None:
    recorded = kfix.events(*HOST)
    raw = raw_stream(*HOST)
    assert 0 < len(raw) < len(recorded)
    assert all(ev.flags & F_DEFERRED for ev in raw if ev.kind is Kind.AVC_ALLOC)
    # no logical event came from BPF on this backend
    assert not any(ev.probe for ev in raw)


@pytest.mark.parametrize("batch", [None, 1, 7, 64])
def test_rederiving_reproduces_the_session(batch: int | None) -> None:
    """Feeding the raw events again, in any batch size, gives what the live
    TraceSession produced on 6.18: the same synthetic events in the same
    order, and the same raw events (the deriver moves anon_vma frees held
    for an unlink behind it, so raw order is compared as a multiset)."""
    again = derive(raw_stream(*HOST), batch)
    live = kfix.events(*HOST)
    assert [e for e in again if e.flags & F_SYNTHETIC] == [
        e for e in live if e.flags & F_SYNTHETIC]
    assert sorted(map(repr, again)) == sorted(map(repr, live))


def test_family_counts_and_depths_per_generation() -> None:
    meta = kfix.events_meta(*HOST)
    assert (meta["regions"], meta["generations"]) == (2, 3)
    sh = shape(derive(raw_stream(*HOST)), meta)
    want = expected_shape(meta["regions"], meta["generations"])
    for g in range(meta["generations"] + 1):
        assert sh[g]["anon_vma_fork"] == want[g]["anon_vma_fork"], g
        assert sh[g]["anon_vma_clone"] == want[g]["anon_vma_clone"], g
        # one unlink per region at exit, counting the g+1 chain entries freed
        assert [c for _, c, _ in sh[g]["unlink_anon_vmas"]] == [g + 1] * meta["regions"], g


def test_synthetic_events_are_flagged_and_stripped() -> None:
    out = derive(raw_stream(*HOST))
    synth = [ev for ev in out if ev.flags & F_SYNTHETIC]
    assert collections.Counter(ev.kind for ev in synth).keys() <= {
        Kind.ANON_VMA_FORK, Kind.ANON_VMA_CLONE, Kind.UNLINK_ANON_VMAS}
    assert all(ev.aux == 0 and ev.aux2 == 0 for ev in synth)
    # gen 1's forks hang off the roots gen 0 faulted in
    meta = kfix.events_meta(*HOST)
    forks1 = region_events(out, meta, Kind.ANON_VMA_FORK, 1)
    assert all(ev.parent == ev.root != 0 for ev in forks1)
    forks2 = {ev.vm_start: ev for ev in region_events(out, meta, Kind.ANON_VMA_FORK, 2)}
    for ev in forks1:
        assert forks2[ev.vm_start].parent == ev.anon_vma


def test_bystander_not_in_stream() -> None:
    meta = kfix.events_meta(*HOST)
    assert all(ev.tgid != meta["bystander_pid"] for ev in kfix.events(*HOST))


@pytest.mark.parametrize("series,backend", REAL)
def test_derived_shape_matches_real_probes(series: str, backend: str) -> None:
    """fork/clone/unlink derived from kmem on 6.18 describe the family like
    the real fexit/kretprobe probes on 6.1 and 6.12 (depth, chain)."""
    host = shape(derive(raw_stream(*HOST)), kfix.events_meta(*HOST))
    meta = kfix.events_meta(series, backend)
    real = shape(kfix.events(series, backend), meta)
    assert sum(meta["lost"].values()) == 0
    for g in host:
        for probe in ("anon_vma_fork", "anon_vma_clone"):
            assert host[g][probe] == real[g][probe], (g, probe)
        assert [c for _, c, _ in host[g]["unlink_anon_vmas"]] == \
            [c for _, c, _ in real[g]["unlink_anon_vmas"]], g
        if g > 0:
            assert host[g]["unlink_anon_vmas"] == real[g]["unlink_anon_vmas"], g


# --- hand-built streams --------------------------------------------------------

PARENT_MM, CHILD_MM = 0xffff8881000a0000, 0xffff8881000b0000
VMA1, VMA2 = 0xffff888100c00000, 0xffff888100c00100


def ev(kind: Kind, site: Site = Site.NONE, *, tid: int = 100, vma: int = VMA1,
       mm: int = CHILD_MM, cur_mm: int = PARENT_MM, depth: int = 0, chain_len: int = 0,
       ts: int = 0, flags: int = F_DEFERRED) -> Event:
    return Event(ts=ts, mm=mm, cur_mm=cur_mm, vma=vma, vm_start=0x7f0000000000,
                 vm_end=0x7f0000004000, anon_vma=0xffff888100d00000, parent=0, root=0,
                 aux=0x1234, aux2=0x5678, num_children=0, num_active_vmas=1, kind=kind,
                 tgid=tid, tid=tid, depth=depth, chain_len=chain_len, ret=0, pid2=0, tid2=0,
                 site=site, flags=flags, comm="t")


def synthetic(out: list[Event]) -> list[tuple[Kind, int]]:
    return [(e.kind, e.flags & F_REUSED) for e in out if e.flags & F_SYNTHETIC]


def test_reuse_clone_into_child_without_fork_allocation() -> None:
    """A fork that reuses an ancestor anon_vma allocates no anon_vma and no
    fork-site chain entry: only the clone group into the child's mm shows."""
    stream = [ev(Kind.AVC_ALLOC, Site.CLONE, chain_len=1),
              ev(Kind.AVC_ALLOC, Site.CLONE, chain_len=2),
              ev(Kind.AVC_ALLOC, Site.CLONE, vma=VMA2, chain_len=1)]
    d = Deriver()
    out = d.feed(stream)
    # the first group closed when VMA2's clone started
    assert synthetic(out) == [(Kind.ANON_VMA_CLONE, 0), (Kind.ANON_VMA_FORK, F_REUSED)]
    clone, fork = [e for e in out if e.flags & F_SYNTHETIC]
    assert clone.vma == fork.vma == VMA1 and clone.chain_len == 2
    assert fork.flags & F_SYNTHETIC and fork.aux == 0
    out2 = d.flush()
    assert synthetic(out2) == [(Kind.ANON_VMA_CLONE, 0), (Kind.ANON_VMA_FORK, F_REUSED)]
    assert all(e.vma == VMA2 for e in out2)
    assert d.flush() == []


@pytest.mark.parametrize("alloc_kind", [Kind.AV_ALLOC, Kind.AVC_ALLOC])
def test_fork_allocation_after_clone_is_a_new_anon_vma(alloc_kind: Kind) -> None:
    stream = [ev(Kind.AVC_ALLOC, Site.CLONE, chain_len=1),
              ev(alloc_kind, Site.FORK, depth=2, chain_len=2),
              ev(Kind.AVC_ALLOC, Site.FORK, depth=2, chain_len=2)]
    out = Deriver().feed(stream)
    assert (Kind.ANON_VMA_FORK, F_REUSED) not in synthetic(out)
    assert synthetic(out)[0] == (Kind.ANON_VMA_CLONE, 0)
    forks = [e for e in out if e.kind is Kind.ANON_VMA_FORK]
    assert len(forks) == (2 if alloc_kind is Kind.AVC_ALLOC else 1)
    assert all(not e.flags & F_REUSED and e.depth == 2 for e in forks)


def test_clone_within_one_mm_is_not_a_fork() -> None:
    """split/merge/mremap clone inside the same mm: no anon_vma_fork."""
    stream = [ev(Kind.AVC_ALLOC, Site.CLONE, mm=PARENT_MM, chain_len=1)]
    d = Deriver()
    out = d.feed(stream) + d.flush()
    assert synthetic(out) == [(Kind.ANON_VMA_CLONE, 0)]


def test_groups_are_per_task() -> None:
    stream = [ev(Kind.AVC_ALLOC, Site.CLONE, tid=1, chain_len=1),
              ev(Kind.AVC_ALLOC, Site.CLONE, tid=2, chain_len=1),
              ev(Kind.AVC_ALLOC, Site.CLONE, tid=1, chain_len=2),
              ev(Kind.AVC_ALLOC, Site.FORK, tid=1, depth=3),
              ev(Kind.AVC_ALLOC, Site.CLONE, tid=2, chain_len=2)]
    d = Deriver()
    out = d.feed(stream)
    closed = [e for e in out if e.flags & F_SYNTHETIC]
    # tid 1: one clone of 2 entries, then its new anon_vma
    assert [(e.kind, e.tid, e.chain_len) for e in closed] == [
        (Kind.ANON_VMA_CLONE, 1, 2), (Kind.ANON_VMA_FORK, 1, 0)]
    rest = d.flush()
    assert [(e.kind, e.tid, e.chain_len, e.flags & F_REUSED) for e in rest] == [
        (Kind.ANON_VMA_CLONE, 2, 2, 0), (Kind.ANON_VMA_FORK, 2, 2, F_REUSED)]


def test_unlink_groups_across_interleaved_put_frees() -> None:
    """unlink_anon_vmas drops anon_vma references (AV_FREE at __put_anon_vma)
    between the chain frees of one VMA: still one unlink."""
    stream = [ev(Kind.AVC_FREE, Site.UNLINK, mm=CHILD_MM, cur_mm=0, depth=3, chain_len=2),
              ev(Kind.AV_FREE, Site.PUT),
              ev(Kind.AVC_FREE, Site.UNLINK, mm=CHILD_MM, cur_mm=0, chain_len=1),
              ev(Kind.AV_FREE, Site.PUT),
              ev(Kind.AVC_FREE, Site.UNLINK, mm=CHILD_MM, cur_mm=0, chain_len=0),
              ev(Kind.AVC_FREE, Site.UNLINK, vma=VMA2, mm=CHILD_MM, cur_mm=0, chain_len=0),
              ev(Kind.PROC_EXIT)]
    out = Deriver().feed(stream)
    unlinks = [e for e in out if e.kind is Kind.UNLINK_ANON_VMAS]
    assert [(e.vma, e.chain_len) for e in unlinks] == [(VMA1, 3), (VMA2, 1)]
    assert unlinks[0].depth == 3  # facts of the group's first free
    assert all(e.flags & F_SYNTHETIC for e in unlinks)
    # raw events all pass through unchanged; the anon_vma frees come right
    # after the unlink of the VMA whose teardown dropped them
    assert sorted(map(repr, (e for e in out if not e.flags & F_SYNTHETIC))) == sorted(
        map(repr, stream))
    i = out.index(unlinks[0])
    assert out[i - 1] is stream[4]
    assert out[i + 1] is stream[1] and out[i + 2] is stream[3]


def test_put_free_outside_unlink_closes_clone_group() -> None:
    stream = [ev(Kind.AVC_ALLOC, Site.CLONE, chain_len=1), ev(Kind.AV_FREE, Site.PUT),
              ev(Kind.PROC_EXIT)]
    out = Deriver().feed(stream)
    assert synthetic(out) == [(Kind.ANON_VMA_CLONE, 0), (Kind.ANON_VMA_FORK, F_REUSED)]
    # the held free is released by the task's next event, before it
    assert out[-2] is stream[1] and out[-1] is stream[2]


# --- any stream ----------------------------------------------------------------

events_st = st.builds(
    ev,
    st.sampled_from(list(Kind)),
    st.sampled_from(list(Site)),
    tid=st.integers(1, 3),
    vma=st.sampled_from([0, VMA1, VMA2]),
    mm=st.sampled_from([0, PARENT_MM, CHILD_MM]),
    cur_mm=st.sampled_from([0, PARENT_MM, CHILD_MM]),
    depth=st.integers(0, 5),
    chain_len=st.integers(0, 5),
    ts=st.integers(0, 2**64 - 1),
    flags=st.sampled_from([0, F_DEFERRED, F_REUSED, F_DEFERRED | 8]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(events_st, max_size=12), max_size=6))
def test_feed_never_raises_and_only_adds_synthetic(batches: list[list[Event]]) -> None:
    d = Deriver()
    out: list[Event] = []
    for b in batches:
        out.extend(d.feed(b))
    out.extend(d.flush())
    fed = [e for b in batches for e in b]
    # every input event comes out once, unchanged (anon_vma frees may move
    # behind the unlink they belong to)
    assert sorted(map(repr, (e for e in out if not (e.flags & F_SYNTHETIC)))) == sorted(
        map(repr, fed))
    added = [e for e in out if e.flags & F_SYNTHETIC]
    assert len(added) == len(out) - len(fed)
    for e in added:
        assert e.kind in (Kind.ANON_VMA_FORK, Kind.ANON_VMA_CLONE, Kind.UNLINK_ANON_VMAS)
        assert e.aux == 0 and e.aux2 == 0
    assert d.flush() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(events_st, max_size=30))
def test_input_events_are_not_mutated(stream: list[Event]) -> None:
    before = [dataclasses.replace(e) for e in stream]
    Deriver().feed(stream)
    assert stream == before


def test_dropping_chain_entries_keeps_every_logical_event() -> None:
    """keep_objects=False (a live session without --raw) drops the clone- and
    fork-site chain-entry allocations and every chain-entry free once
    grouped, and changes nothing else, in order."""
    raw = raw_events("6.18", "tracepoint")
    d_all, d_lean = Deriver(), Deriver(keep_objects=False)
    full = d_all.feed(raw) + d_all.flush()
    lean = d_lean.feed(raw) + d_lean.flush()
    dropped = [e for e in full if e.kind is Kind.AVC_FREE or
               (e.kind is Kind.AVC_ALLOC and e.site in (Site.CLONE, Site.FORK))]
    assert dropped and len(lean) == len(full) - len(dropped)
    assert [e for e in full if not any(e is x for x in dropped)] == lean
    assert {Kind.ANON_VMA_FORK, Kind.ANON_VMA_CLONE, Kind.UNLINK_ANON_VMAS,
            Kind.AV_FREE} <= {e.kind for e in lean}


def test_model_figures_same_without_chain_entries() -> None:
    """The model reads nothing from the dropped events: its report over the
    recorded 6.18 stream is the same either way."""
    raw = raw_events("6.18", "tracepoint")
    reports = []
    for keep in (True, False):
        d = Deriver(keep_objects=keep)
        m = Model()
        m.apply_all(d.feed(raw) + d.flush())
        rep = build_report(m, when=0.0, backend="tracepoint", lost_events=0,
                           exited=[], final=True)
        # Per-probe event counts come from the logical kinds only.
        reports.append((rep, m.totals(), m.anomalies))
    assert reports[0] == reports[1]
    assert any(p["events"]["anon_vma_fork"] for p in reports[0][0]["processes"])
