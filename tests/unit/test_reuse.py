"""`anontrace replay --reuse`: the anon_vma reuse what-if (tracer.model.reuse,
tracer.model.reuse_stream, tracer.commands.whatif), on the recorded fixtures
and on hand-built operations."""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.kfix import FIXTURES
from tests.unit.model_streams import FAMILY_STREAMS, ev, model_stream
from tests.unit.test_model_properties import events as any_events
from tests.unit.test_model_properties import plausible_events
from tracer.commands.cli import main
from tracer.commands.whatif import run_reuse_replay
from tracer.errors import AnontraceError
from tracer.format.events import F_THREAD, Event, Kind
from tracer.model.hierarchy import Model
from tracer.model.reuse import RULES, World
from tracer.model.reuse_stream import ReuseReplay
from tracer.pipeline.recording import EVENTS, RecordingReader
from tracer.pipeline.stream import EventStream

#: `anontrace record` of tests/workloads/reproducer.c, 2 regions, 16 generations
#: (tests/fixtures/reproducer/README.md says how it was made)
REPRODUCER = FIXTURES / "reproducer" / "reproducer-2x16.tracepoint.atr"
GENERATIONS = 16


@cache
def reproducer_events() -> tuple[Event, ...]:
    """The reproducer recording's events as the model takes them (derived)."""
    if not REPRODUCER.is_file():
        pytest.fail(f"fixture {REPRODUCER} is missing; re-record it (see its README.md)")
    reader = RecordingReader(REPRODUCER)
    stream = EventStream(derive=reader.header["backend"] == "tracepoint", keep_objects=True)
    out: list[Event] = []
    for frame in reader.frames():
        if frame.kind == EVENTS:
            out += stream.feed_events(frame.events or [])
    return tuple(out + stream.flush())


def recorded(model: Model) -> tuple[int, int, int]:
    """The plain replay's live anon_vmas, chain entries and max depth."""
    avs = model.anon_vmas
    return len(avs), model.chains, max((a.depth for a in avs.values()), default=0)


def at_process_events(events) -> Iterator[tuple[Event | None, Model, ReuseReplay]]:
    """Feed the model and every rule; yield (event, model, replay) right
    after each process fork, exec and exit: points where no kernel
    operation is half-way (inside one, the model counts an anon_vma
    between its allocation and its link, or its unlink and its free)."""
    model, replay = Model(), ReuseReplay(RULES)
    for e in events:
        model.apply(e)
        replay.apply(e)
        if e.kind in (Kind.PROC_FORK, Kind.PROC_EXEC, Kind.PROC_EXIT) and not e.flags & F_THREAD:
            yield e, model, replay
    yield None, model, replay


#: (events, whether a whole family stays alive at some point): the forkchain
#: fixtures keep 4 generations alive, the reproducer one or two processes
STREAMS = [pytest.param(lambda s=s, b=b: model_stream(s, b), True, id=f"{s}-{b}")
           for s, b in FAMILY_STREAMS] + [pytest.param(reproducer_events, False,
                                                       id="reproducer")]


def by_rule(replay: ReuseReplay) -> dict:
    return {f.rule: f for f in replay.figures()}


# -- the kernel rule reproduces the recordings ---------------------------------
@pytest.mark.parametrize("events,family", STREAMS)
def test_kernel_rule_equals_the_plain_replay(events, family: bool) -> None:
    points = 0
    for _, model, replay in at_process_events(events()):
        k = by_rule(replay)["kernel"]
        assert (k.anon_vmas, k.anon_vma_chains, k.max_depth) == recorded(model)
        assert k.divergences == 0
        points += recorded(model)[0] > 0
    assert points >= 3   # the comparisons saw a live hierarchy


def test_kernel_rule_made_the_kernels_reuse_choices() -> None:
    """The reproducer's kernel reused an ancestor at most forks: each one is
    checked against the recorded anon_vma (a divergence otherwise)."""
    replay = ReuseReplay(["kernel"])
    replay.apply_all(reproducer_events())
    k = replay.figures()[0]
    assert k.forked_vmas > 10 * GENERATIONS
    assert k.reused > k.forked_vmas // 2
    assert (k.divergences, k.adopted, replay.partial_reasons) == (0, 0, [])


def test_replay_of_the_reproducer_recording_matches_at_every_report_point() -> None:
    reports: list[dict] = []
    assert run_reuse_replay(REPRODUCER, ["kernel", "none"], reports.append) == 0
    ticks = [r for r in reports if r["point"] == "tick"]
    assert len(ticks) >= 3 and reports[-1]["point"] == "end" and reports[-1]["final"]
    for r in reports:
        k = r["rules"]["kernel"]
        assert (k["anon_vmas"], k["anon_vma_chains"], k["max_depth"]) == tuple(
            r["recorded"][x] for x in ("anon_vmas", "anon_vma_chains", "max_depth"))
        assert r["partial"] is False, r["partial_reasons"]
    alive = ticks[-1]
    # the last generation alive: under `none` it carries every level
    assert alive["rules"]["none"]["max_depth"] == GENERATIONS + 1
    assert alive["rules"]["kernel"]["max_depth"] <= 3
    assert reports[-1]["rules"]["none"]["anon_vmas"] == 0   # all freed at the end


# -- none: one anon_vma per forked VMA, unbounded on the reproducer -------------
def _forks(events) -> int:
    return sum(1 for e in events if e.kind is Kind.ANON_VMA_FORK and not e.ret
               and (e.anon_vma or e.chain_len))


def _before_teardown(events: list[Event]) -> int:
    """Index of the first event that may free an anon_vma made by a fork: a
    process exit, or an unlink in a forked process's mm (the reproducer's
    exec tears down the shell's mm before anything forks)."""
    forked_mms = set()
    for i, e in enumerate(events):
        if e.kind is Kind.PROC_FORK:
            forked_mms.add(e.mm)
        elif (e.kind is Kind.PROC_EXIT and not e.flags & F_THREAD) or (
                e.kind is Kind.UNLINK_ANON_VMAS and e.mm in forked_mms):
            return i
    return len(events)


@pytest.mark.parametrize("events,family", STREAMS)
def test_none_gives_one_anon_vma_per_forked_vma(events, family: bool) -> None:
    evs = list(events())
    cut = _before_teardown(evs)
    model, replay = Model(), ReuseReplay(["none"])
    model.apply_all(evs[:cut])
    replay.apply_all(evs[:cut])
    none = replay.figures()[0]
    roots = sum(1 for a in model.anon_vmas.values() if a.depth == 1)
    assert _forks(evs[:cut]) >= 12 and roots >= 2
    assert none.forked_vmas == _forks(evs[:cut]) and none.reused == 0
    assert none.anon_vmas == roots + _forks(evs[:cut])
    replay.apply_all(evs[cut:])
    assert replay.figures()[0].forked_vmas == _forks(evs)


def test_reproducer_none_grows_every_generation_kernel_stays_bounded() -> None:
    gens = [by_rule(r) for e, _, r in at_process_events(reproducer_events())
            if e is not None and e.kind is Kind.PROC_FORK]
    assert len(gens) == GENERATIONS
    none = [(g["none"].anon_vmas, g["none"].max_depth) for g in gens]
    kernel = [(g["kernel"].anon_vmas, g["kernel"].max_depth) for g in gens]
    for (a0, d0), (a1, d1) in pairwise(none):
        assert a1 > a0 and d1 == d0 + 1, none
    assert none[-1][1] == GENERATIONS + 1
    assert max(d for _, d in kernel) <= 3, kernel
    # bounded: from the third generation on the kernel's figures no longer grow
    assert max(a for a, _ in kernel[2:]) == kernel[2][0], kernel
    assert none[-1][0] > 5 * kernel[-1][0]


# -- single-child: fewer anon_vmas, wider rmap walks ---------------------------
@pytest.mark.parametrize("events,family", STREAMS)
def test_single_child_trades_anon_vmas_for_rmap_width(events, family: bool) -> None:
    fewer = wider = 0
    for _, _, replay in at_process_events(events()):
        f = by_rule(replay)
        k, s = f["kernel"], f["single-child"]
        assert s.anon_vmas <= k.anon_vmas
        assert s.rmap_max >= k.rmap_max
        assert s.rmap_mean >= k.rmap_mean
        assert s.max_depth <= k.max_depth
        fewer += s.anon_vmas < k.anon_vmas
        wider += s.rmap_mean > k.rmap_mean
    assert fewer > 0
    if family:
        assert wider > 0   # live generations share the reused anon_vmas


# -- the rules on hand-built operations ----------------------------------------
def _chain_of_generations(world: World, gens: int) -> list[tuple[int, int]]:
    """The reproducer's shape by hand: one VMA, each generation forks the
    next and exits. Returns (live anon_vmas, max depth) per generation."""
    world.prepare((1, 10), rec=0x100)
    out = []
    for g in range(1, gens + 1):
        parent, child = (g, g * 10), (g + 1, (g + 1) * 10)
        world.fork_clone(child, parent)
        world.fork_done(child, rec=0, rec_depth=0, rec_chain=0)
        world.unlink(parent)
        f = world.figures()
        out.append((f.anon_vmas, f.max_depth))
    return out


def test_rules_by_hand_on_the_2012_shape() -> None:
    assert _chain_of_generations(World("none"), 5) == [(g + 1, g + 1) for g in range(1, 6)]
    # the kernel reuses the grandparent's anon_vma: depth alternates 2, 3
    kernel = _chain_of_generations(World("kernel"), 6)
    assert kernel == [(2, 2), (3, 3), (3, 3), (3, 3), (3, 3), (3, 3)]
    assert [d for _, d in _chain_of_generations(World("single-child"), 5)] == [2] * 5


def test_kernel_rule_never_reuses_an_anon_vma_a_vma_points_at() -> None:
    """A fork chain of live processes: nothing can be reused (kernel), while
    single-child makes every generation share the first child anon_vma."""
    kernel, single = World("kernel"), World("single-child")
    for w in (kernel, single):
        w.prepare((1, 1), rec=0x100)
        for g in range(1, 5):
            w.fork_clone((g + 1, 1), (g, 1))
            w.fork_done((g + 1, 1), rec=0, rec_depth=0, rec_chain=0)
    k, s = kernel.figures(), single.figures()
    assert (k.anon_vmas, k.max_depth, k.reused, k.anon_vma_chains) == (5, 5, 0, 1 + 2 + 3 + 4 + 5)
    assert (s.anon_vmas, s.max_depth, s.reused, s.anon_vma_chains) == (2, 2, 3, 1 + 2 * 4)
    # root: 5 VMAs; the shared child: 4; every VMA's own anon_vma
    assert (s.rmap_max, s.rmap_mean) == (5, (5 + 4 * 4) / 5)
    assert (k.rmap_max, k.rmap_mean) == (5, (5 + 4 + 3 + 2 + 1) / 5)


def test_unlink_frees_what_no_vma_links_to() -> None:
    w = World("none")
    w.prepare((1, 1), rec=0x100)
    w.fork_clone((2, 1), (1, 1))
    w.fork_done((2, 1), rec=0, rec_depth=0, rec_chain=0)
    w.unlink((1, 1))
    assert w.figures().anon_vmas == 2          # the root stays: the child links to it
    w.unlink((2, 1))
    f = w.figures()
    assert (f.anon_vmas, f.anon_vma_chains, f.rmap_total) == (0, 0, 0)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reuse rule 'sometimes'"):
        World("sometimes")


# -- divergences and missing history are reported, never silent ---------------
def _diverging_stream() -> list[Event]:
    """fentry-style events: a root, a fork that makes a new anon_vma, and a
    fork where the "kernel" reuses the root (which no kernel does)."""
    r = dict(vm_start=0x1000, vm_end=0x2000, tgid=1, comm="t")
    return [
        ev(Kind.PAGE_SET_ANON_RMAP, mm=0xA, cur_mm=0xA, vma=0xA1, anon_vma=0x100, depth=1,
           chain_len=1, **r),
        ev(Kind.ANON_VMA_CLONE, mm=0xB, cur_mm=0xA, vma=0xB1, aux=0xA1, chain_len=1, **r),
        ev(Kind.ANON_VMA_FORK, mm=0xB, cur_mm=0xA, vma=0xB1, aux=0xA1, anon_vma=0x200,
           depth=2, chain_len=2, **r),
        ev(Kind.ANON_VMA_CLONE, mm=0xC, cur_mm=0xB, vma=0xC1, aux=0xB1, anon_vma=0x100,
           depth=1, chain_len=2, **r),
        ev(Kind.ANON_VMA_FORK, mm=0xC, cur_mm=0xB, vma=0xC1, aux=0xB1, anon_vma=0x100,
           depth=1, chain_len=2, **r),
    ]


def test_a_fork_the_kernel_chose_otherwise_is_counted_and_followed() -> None:
    replay = ReuseReplay(["kernel", "none"])
    replay.apply_all(_diverging_stream())
    k, n = replay.figures()
    assert (k.divergences, k.reused, k.anon_vmas, k.anon_vma_chains) == (1, 1, 2, 5)
    assert (n.divergences, n.anon_vmas, n.anon_vma_chains) == (0, 3, 6)


def test_divergence_is_a_partial_reason_in_the_report(tmp_path: Path) -> None:
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in _diverging_stream()))
    reports: list[dict] = []
    run_reuse_replay(stream, ["kernel"], reports.append)
    final = reports[-1]
    assert final["partial"] is True and final["rules"]["kernel"]["divergences"] == 1
    assert any("1 forks where the recorded kernel chose another anon_vma" in r
               for r in final["partial_reasons"])


def test_vmas_without_history_make_the_figures_partial() -> None:
    """The forkchain fixtures were traced from a running process without a
    census: the VMAs it had before are adopted, and the report says so."""
    replay = ReuseReplay(RULES)
    replay.apply_all(model_stream("6.1", "fentry"))
    assert replay.unresolved > 0
    assert any("whose source VMA is not in the recording" in r
               for r in replay.partial_reasons)


def test_census_vmas_with_unknown_chains_are_counted() -> None:
    replay = ReuseReplay(["kernel"])
    replay.apply(ev(Kind.CENSUS_VMA, mm=0xA, vma=0xA1, anon_vma=0x100, depth=1, chain_len=1))
    replay.apply(ev(Kind.CENSUS_VMA, mm=0xA, vma=0xA2, anon_vma=0x300, depth=3, chain_len=3))
    f = replay.figures()[0]
    assert (f.anon_vmas, f.anon_vma_chains, f.max_depth, f.adopted) == (2, 4, 3, 1)
    assert replay.partial_reasons == [
        "1 VMAs of processes running before tracing: the census gives their chains as "
        "lengths only"]


# -- the command ----------------------------------------------------------------
def test_replay_help_mentions_reuse_with_an_example() -> None:
    out = CliRunner().invoke(main, ["replay", "--help"], prog_name="anontrace")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "--reuse [kernel|none|single-child]" in text
    assert "anontrace replay --reuse kernel --reuse none" in text
    for rule in RULES:
        assert f" {rule} " in text


def test_bad_rule_name_is_a_clean_click_error() -> None:
    out = CliRunner().invoke(main, ["replay", "--reuse", "always", str(REPRODUCER)])
    assert out.exit_code == 2
    assert "Invalid value for '--reuse': 'always' is not one of" in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert "Traceback" not in out.output


def test_unreadable_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text("hello\n")
    out = CliRunner().invoke(main, ["replay", "--reuse", "none", str(bad)])
    assert out.exit_code == 1
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output
    assert "x.jsonl:1: neither an anontrace recording nor a stream of JSON events" in lines[0]
    with pytest.raises(AnontraceError, match="cannot read"):
        run_reuse_replay(tmp_path / "missing.atr", ["kernel"], lambda r: None)


def test_json_side_by_side_and_text_table() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["replay", "--json", "--reuse", "none", "--reuse", "kernel",
                               str(REPRODUCER)])
    assert out.exit_code == 0, out.output
    reports = [json.loads(ln) for ln in out.output.splitlines()]
    assert [list(r["rules"]) for r in reports] == [["none", "kernel"]] * len(reports)
    assert reports[-1]["final"] and not any(r["final"] for r in reports[:-1])
    text = runner.invoke(main, ["replay", "--reuse", "kernel", "--reuse", "single-child",
                                str(REPRODUCER)])
    assert text.exit_code == 0, text.output
    last = text.output.strip().split("\n\n")[-1].splitlines()
    assert " FINAL " in last[0]
    assert last[2].split()[:4] == ["RULE", "AVS", "CHAINS", "DEPTH"]
    assert [ln.split()[0] for ln in last[3:]] == ["kernel", "single-child"]
    assert last[4].split()[-1] == "-"   # divergences are the kernel rule's only


def test_event_stream_is_reported_at_process_events() -> None:
    path = FIXTURES / "6.1.0-56-amd64" / "events-fentry.jsonl"
    reports: list[dict] = []
    run_reuse_replay(path, ["kernel"], reports.append)
    points = [r["point"] for r in reports]
    assert points.count("fork") == 3 and points[-1] == "end"
    assert all(r["time"] is None for r in reports)
    forks = [r for r in reports if r["point"] == "fork"]
    assert [r["rules"]["kernel"]["max_depth"] for r in forks] == [2, 3, 4]


# -- any stream: never raises, bookkeeping consistent ---------------------------
def check_world(w: World) -> None:
    """Every counter a World keeps equals what its VMAs' chains say."""
    vmas = list(w.vmas.values())
    assert w.chains == sum(len(v.chain) + v.extra for v in vmas)
    for v in vmas:
        assert v.anon is None or v.anon in v.chain
        assert all(av in w.live for av in v.chain)
    for av in w.live:
        assert av.width == sum(v.chain.count(av) for v in vmas) >= 1
        assert av.active == sum(1 for v in vmas if v.anon is av)
        assert av.children == sum(1 for c in w.live if c.parent is av)
    f = w.figures()
    assert f.anon_vmas == len(w.live) and f.rmap_total <= f.anon_vma_chains


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(plausible_events(), plausible_events(), any_events()), max_size=60))
def test_any_stream_keeps_every_world_consistent(stream: list[Event]) -> None:
    replay = ReuseReplay(RULES)
    for e in stream:
        replay.apply(e)
        for w in replay.worlds:
            check_world(w)


@pytest.mark.parametrize("events,family", STREAMS)
def test_recorded_streams_keep_every_world_consistent(events, family: bool) -> None:
    replay = ReuseReplay(RULES)
    for i, e in enumerate(events()):
        replay.apply(e)
        if i % 25 == 0:
            for w in replay.worlds:
                check_world(w)
    for w in replay.worlds:
        check_world(w)
        assert not w.live and not w.vmas   # everything torn down at the end
