"""`anontrace top` without a kernel: ranking, growth, families, the text
and the screen, fed with two reads of the state maps recorded on the 6.18
host (tests/fixtures/record_top_state.py) and with hand-made rows."""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracer.commands import top_screen
from tracer.commands.cli import main
from tracer.commands.top import (
    FAMILIES,
    FAMILY_SORT_KEYS,
    PROCESSES,
    SORT_KEYS,
    FamilyLine,
    Frame,
    Header,
    ProcLine,
    TopTracker,
    View,
    rank_families,
    rank_processes,
)
from tracer.commands.top_live import RmapWidths
from tracer.commands.top_screen import Screen, fit, frame_text, run_plain, table_lines
from tracer.errors import AnontraceError
from tracer.kernel.kstate import FamilyState, Globals, KernelState, ProcRow, StateDump
from tracer.model.rmap import AnonVmaRmap, RmapSnapshot
from tracer.model.types import PROBE_NAMES, ProcessFigures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "top"


# -- the recorded reads ------------------------------------------------------

@cache
def recording() -> dict[str, Any]:
    files = sorted(FIXTURES.glob("state-*.json.gz"))
    if len(files) != 1:
        pytest.fail(f"expected one recording under {FIXTURES}, found {files}; record it "
                    "with tests/fixtures/record_top_state.py")
    with gzip.open(files[0], "rt") as f:
        return json.load(f)


def _state(read: dict[str, Any]) -> KernelState:
    d = read["dump"]

    def raw(m: dict[str, str]) -> dict[int, bytes]:
        return {int(k): bytes.fromhex(v) for k, v in m.items()}

    return KernelState.decode(StateDump(raw(d["mms"]), raw(d["procs"]), raw(d["families"]),
                                        d["global_sums"], d["depths"]))


def recorded_frames() -> tuple[Frame, Frame, float]:
    """The two recorded reads through one tracker, and the seconds between."""
    rec = recording()
    r1, r2 = rec["reads"]
    tracker = TopTracker(rec["backend"], rec["census_missing"])
    f1 = tracker.update(_state(r1), r1["mono"], r1["wall"], r1["lost"])
    f2 = tracker.update(_state(r2), r2["mono"], r2["wall"], r2["lost"])
    return f1, f2, r2["mono"] - r1["mono"]


def gens() -> dict[int, int]:
    """forkchain generation -> pid."""
    return {int(g): pid for g, pid in recording()["gens"].items()}


def by_pid(frame: Frame) -> dict[int, ProcLine]:
    return {p.pid: p for p in frame.processes}


def test_recording_has_the_family_and_the_hostile_process() -> None:
    rec = recording()
    assert len(gens()) == rec["generations"] + 1
    _, f2, _ = recorded_frames()
    procs = by_pid(f2)
    assert set(gens().values()) <= set(procs)
    assert rec["hostile_pid"] in procs


def test_forkchain_generations_have_their_shape() -> None:
    _, f2, _ = recorded_frames()
    procs = by_pid(f2)
    for g, pid in gens().items():
        p = procs[pid]
        assert p.comm == "forkchain"
        assert p.depth == g + 1
        if g:
            # Nothing reused while the chain lives: every VMA of generation g
            # is linked to g+1 anon_vmas.
            assert p.chains == p.anon_vmas * (g + 1)


def test_ranked_by_depth_the_deepest_generation_comes_first() -> None:
    _, f2, _ = recorded_frames()
    g = recording()["generations"]
    ranked = rank_processes(f2.processes, "depth")
    assert ranked[0].pid == gens()[g] and ranked[0].depth == g + 1
    depths = [p.depth for p in ranked]
    assert depths == sorted(depths, reverse=True)
    assert [p.pid for p in rank_processes(f2.processes, "depth", reverse=True)][-1] == gens()[g]


def test_growth_between_the_two_reads() -> None:
    f1, f2, dt = recorded_frames()
    assert dt > 0
    assert all(p.growth is None for p in f1.processes), "no growth before a second read"
    before, after = by_pid(f1), by_pid(f2)
    regions = recording()["regions"]
    g0 = after[gens()[0]]
    # Released, generation 0 mapped its regions: one root anon_vma each.
    assert g0.anon_vmas - before[g0.pid].anon_vmas == regions
    assert g0.growth == pytest.approx(regions / dt)
    for g, pid in gens().items():
        if g:
            assert pid not in before
            assert after[pid].growth == pytest.approx(after[pid].anon_vmas / dt)
    for pid, p in after.items():
        if pid in before and p.anon_vmas == before[pid].anon_vmas:
            assert p.growth == 0.0


def test_sorted_by_growth_the_new_generations_lead() -> None:
    _, f2, _ = recorded_frames()
    n = len(gens())
    ranked = rank_processes(f2.processes, "growth", limit=n)
    assert {p.pid for p in ranked} == set(gens().values())
    growth = [p.growth for p in ranked]
    assert growth == sorted(growth, reverse=True)    # type: ignore[type-var]
    assert ranked[-1].pid == gens()[0]               # 3 roots: the slowest of them


def test_exited_and_empty_processes_are_not_lines() -> None:
    rec = recording()
    state = _state(rec["reads"][1])
    exited = [pid for pid, r in state.processes.items() if r.exited]
    assert exited, "the recording should hold an exited process (re-record?)"
    frame = TopTracker("tracepoint").update(state, 1.0, 1.0, 0)
    shown = {p.pid for p in frame.processes}
    assert not shown & set(exited)
    alive = {pid for pid, r in state.processes.items() if r.alive and r.figures.anon_vmas}
    assert shown == alive


def test_header_totals_from_the_state() -> None:
    rec = recording()
    state = _state(rec["reads"][1])
    _, f2, _ = recorded_frames()
    h = f2.header
    g = state.globals
    assert (h.anon_vmas, h.chains, h.orphaned) == (g.anon_vmas, g.anon_vma_chains,
                                                    g.orphaned_anon_vmas)
    assert h.processes == sum(1 for r in state.processes.values() if r.alive)
    assert h.backend == rec["backend"] and h.refused == 0
    assert h.anon_vmas >= sum(p.anon_vmas for p in f2.processes if p.comm == "forkchain")


def test_family_of_the_chain() -> None:
    f1, f2, dt = recorded_frames()
    g = recording()["generations"]
    top = rank_families(f2.families, "depth")[0]
    assert top.pid == gens()[0] and top.comm == "forkchain" and top.depth == g + 1
    # Every anon_vma of the chain hangs below generation 0's roots.
    procs = by_pid(f2)
    assert top.anon_vmas == sum(procs[pid].anon_vmas for pid in gens().values())
    earlier = {f.pid: f for f in f1.families}[top.pid]
    assert top.growth == pytest.approx((top.anon_vmas - earlier.anon_vmas) / dt)
    assert rank_families(f2.families, "growth")[0].pid == top.pid


def test_hostile_name_never_reaches_the_terminal_raw() -> None:
    rec = recording()
    _, f2, _ = recorded_frames()
    line = by_pid(f2)[rec["hostile_pid"]]
    assert bytes.fromhex(rec["hostile_name"]).startswith(b"\x1b")
    assert line.comm.isprintable() and "\x1b" not in line.comm and "\n" not in line.comm
    view = View(maxrows=100)
    text = frame_text(f2, view)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", text.replace("\n", ""))
    rows = table_lines(f2, view)
    assert len(rows) == 1 + len(f2.processes)    # no name split a row
    assert all(len(r) == len(rows[0]) for r in rows), "every row as wide as the header"


# -- hand-made rows ------------------------------------------------------------

def _row(pid: int, comm: str, avs: int, chains: int = 0, depth: int = 1,
         alive: bool = True) -> ProcRow:
    figs = ProcessFigures(avs, chains or avs, depth, 0, depth, dict.fromkeys(PROBE_NAMES, 0))
    return ProcRow(pid, 1, comm, alive, 1 if alive else 0, 0xA0 + pid, 0 if alive else 5, figs)


def _state_of(rows: list[ProcRow], fams: list[FamilyState] | None = None,
              full: dict[str, int] | None = None) -> KernelState:
    fams = fams or []
    g = Globals(anon_vmas=sum(r.figures.anon_vmas for r in rows))
    if full:
        g.map_full.update(full)
    return KernelState({}, {r.pid: r for r in rows}, {f.pid: f for f in fams}, g)


def test_growth_is_per_second_and_counts_new_processes_from_nothing() -> None:
    t = TopTracker("fentry")
    t.update(_state_of([_row(1, "a", 10), _row(2, "b", 10)]), 100.0, 0.0, 0)
    f = t.update(_state_of([_row(1, "a", 30), _row(2, "b", 4), _row(3, "c", 6)]), 102.0, 0.0, 0)
    got = {p.pid: p.growth for p in f.processes}
    assert got == {1: 10.0, 2: -3.0, 3: 3.0}
    assert [p.pid for p in rank_processes(f.processes, "growth")] == [1, 3, 2]
    assert [p.pid for p in rank_processes(f.processes, "growth", reverse=True)] == [2, 3, 1]


def test_sort_keys_and_ties() -> None:
    rows = [_row(5, "a", 10, chains=50, depth=2), _row(6, "b", 20, chains=30, depth=2),
            _row(7, "c", 20, chains=40, depth=9)]
    f = TopTracker("x").update(_state_of(rows), 1.0, 0.0, 0)
    order = {k: [p.pid for p in rank_processes(f.processes, k)] for k in SORT_KEYS}
    assert order["anon_vmas"] == [7, 6, 5]       # tie on 20: the deeper first
    assert order["chains"] == [5, 7, 6]
    assert order["depth"] == [7, 6, 5]            # tie on 2: more anon_vmas first
    assert order["rmap"] == [7, 6, 5]             # no widths: all last, ties as ever
    assert [p.pid for p in rank_processes(f.processes, "anon_vmas", limit=2)] == [7, 6]
    with pytest.raises(AnontraceError, match="unknown sort key 'size'"):
        rank_processes(f.processes, "size")


def test_widths_show_and_sort() -> None:
    rows = [_row(1, "a", 5), _row(2, "b", 5), _row(3, "c", 5), _row(4, "d", 50)]
    widths = {1: (4, 10), 2: (9, 9), 3: (4, 30)}
    f = TopTracker("x").update(_state_of(rows), 1.0, 0.0, 0, widths)
    p = by_pid(f)
    assert (p[1].rmap_max, p[1].rmap_total) == (4, 10)
    assert (p[4].rmap_max, p[4].rmap_total) == (0, 0)   # the census gave it no anon_vma
    assert [x.pid for x in rank_processes(f.processes, "rmap")] == [2, 3, 1, 4]
    assert [x.pid for x in rank_processes(f.processes, "rmap", reverse=True)] == [4, 1, 3, 2]
    assert "    9       9" in top_screen.proc_row(p[2])


def test_without_widths_rmap_shows_dashes_and_sorts_last() -> None:
    rows = [_row(1, "a", 5), _row(2, "b", 9)]
    t = TopTracker("x")
    f = t.update(_state_of(rows), 1.0, 0.0, 0, None, "rmap widths unavailable: EPERM")
    assert all(x.rmap_max is None for x in f.processes)
    assert re.search(r"\s-\s+-\s", top_screen.proc_row(f.processes[0]))
    assert [x.pid for x in rank_processes(f.processes, "rmap", reverse=True)] == [2, 1]
    assert "rmap widths unavailable: EPERM" in frame_text(f, View())


class FakeCensus:
    def __init__(self, result: RmapSnapshot | Exception) -> None:
        self.result = result

    def run(self) -> RmapSnapshot:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_rmap_widths_from_a_census() -> None:
    avs = {0x10: AnonVmaRmap(0x10, 0, 0x10, 3, 1, 7, 2),
           0x20: AnonVmaRmap(0x20, 0x10, 0x10, 1, 1, 8, 0),
           0x30: AnonVmaRmap(0x30, 0, 0x30, 5, 1, 7, 1)}
    widths = RmapWidths(FakeCensus(RmapSnapshot(anon_vmas=avs)))
    assert widths() == {7: (5, 8), 8: (1, 1)} and widths.note is None
    # Families by the owner of their root: 0x10 and 0x20 under 7's root 0x10, 0x30 its own.
    assert widths.families == {7: (5, 9)}
    cut = RmapWidths(FakeCensus(RmapSnapshot(anon_vmas=avs, truncated_chains=2)))
    assert cut() is not None and "undercount: 2 chains" in (cut.note or "")
    refused = RmapWidths(FakeCensus(AnontraceError("the rmap census could not run: EIO")))
    assert refused() is None and refused.note == ("rmap widths unavailable: the rmap census "
                                                  "could not run: EIO")


def test_families_from_rows() -> None:
    rows = [_row(10, "parent", 3), _row(11, "kid", 3)]
    fams = [FamilyState(10, 30, 2, 4), FamilyState(99, 50, 40, 2), FamilyState(0, 7, 0, 1),
            FamilyState(12, 0, 0, 0)]
    t = TopTracker("x")
    f = t.update(_state_of(rows, fams), 1.0, 0.0, 0)
    assert {x.pid for x in f.families} == {10, 99}   # unowned roots and empty ones skipped
    names = {x.pid: x.comm for x in f.families}
    assert names == {10: "parent", 99: ""}           # 99's creator was never seen
    order = {k: [x.pid for x in rank_families(f.families, k)] for k in FAMILY_SORT_KEYS}
    assert order == {"anon_vmas": [99, 10], "orphaned": [99, 10], "depth": [10, 99],
                     "rmap": [99, 10],             # no widths: ties by anon_vmas
                     "growth": [99, 10]}           # no growth yet: ties by anon_vmas
    wide = TopTracker("x").update(_state_of(rows, fams), 1.0, 0.0, 0,
                                  family_widths={10: (9, 20)})
    assert [(x.pid, x.rmap_max, x.rmap_total) for x in rank_families(wide.families, "rmap")] \
        == [(10, 9, 20), (99, 0, 0)]
    # The creator exits; its family keeps its name.
    f = t.update(_state_of([_row(11, "kid", 3)], [FamilyState(10, 34, 2, 5)]), 3.0, 0.0, 0)
    assert [(x.pid, x.comm, x.growth) for x in f.families] == [(10, "parent", 2.0)]


def test_refused_inserts_and_lost_events_in_the_header() -> None:
    f = TopTracker("tracepoint").update(
        _state_of([_row(1, "a", 1)], full={"anon_vmas": 7, "vmas": 2}), 1.0, 0.0, 3)
    assert f.header.lost == 12 and f.header.refused == 9
    text = frame_text(f, View())
    assert "lost=12" in text and "inserts refused by full maps: 9 (vmas 2, anon_vmas 7)" in text
    clean = TopTracker("tracepoint").update(_state_of([_row(1, "a", 1)]), 1.0, 0.0, 0)
    assert "refused" not in frame_text(clean, View())


def test_census_missing_is_said() -> None:
    f = TopTracker("tracepoint", "EPERM").update(_state_of([]), 1.0, 0.0, 0)
    assert "no census" in frame_text(f, View()) and "EPERM" in frame_text(f, View())


# -- the view and its keys -----------------------------------------------------

def test_keys_cycle_sort_toggle_mode_and_reverse() -> None:
    v = View.start("anon_vmas")
    seen = []
    for _ in SORT_KEYS:
        assert v.press("s") is False
        seen.append(v.key)
    assert seen == list(SORT_KEYS[1:]) + [SORT_KEYS[0]]
    v.press("S")
    assert v.key == SORT_KEYS[-1]
    v.press(">")
    assert v.key == SORT_KEYS[0]
    v.press("<")
    assert v.key == SORT_KEYS[-1]
    v.press("f")
    assert v.mode == FAMILIES and v.key == "anon_vmas"
    v.press("s")
    assert v.key == FAMILY_SORT_KEYS[1]
    v.press("f")
    assert v.mode == PROCESSES and v.key == SORT_KEYS[-1]   # each mode keeps its key
    v.press("r")
    assert v.reverse
    v.press("x")                                             # ignored
    assert v.press("q") is True


def test_view_from_the_command_line() -> None:
    assert View.start("depth", families=True).key == "depth"
    v = View.start("chains", families=True)     # families have no chains
    assert v.mode == FAMILIES and v.key == "anon_vmas" and v.proc_key == "chains"
    with pytest.raises(AnontraceError, match="unknown sort key"):
        View.start("bogus")
    with pytest.raises(AnontraceError, match="maxrows"):
        View.start(maxrows=0)


def test_header_names_the_view_and_sort() -> None:
    _, f2, _ = recorded_frames()
    v = View.start("depth")
    assert "view=processes sort=depth (descending)" in frame_text(f2, v)
    v.press("r")
    v.press("f")
    text = frame_text(f2, v)
    assert "view=families sort=depth (ascending)" in text    # -s set both keys
    assert text.splitlines()[3].split()[:2] == ["FAMILY", "COMM"]


def test_maxrows_cuts_the_table() -> None:
    _, f2, _ = recorded_frames()
    assert len(table_lines(f2, View(maxrows=3))) == 4


# -- the terminal --------------------------------------------------------------

def test_fit_counts_terminal_columns() -> None:
    assert fit("abc", 5) == "abc  "
    assert fit("abcdefgh", 4) == "abcd"
    assert fit("日本語", 5) == "日本 "           # wide characters take two columns
    assert fit("e\u0301x", 3) == "e\u0301x "      # a combining accent takes none


class FakeWindow:
    """What Screen uses of a curses window, recording what is written."""

    def __init__(self, encoding: str = "utf-8", size: tuple[int, int] = (50, 100)) -> None:
        self.encoding = encoding
        self.size = size
        self.lines: dict[int, str] = {}
        self.keys: list[int] = []

    def getmaxyx(self) -> tuple[int, int]:
        return self.size

    def addnstr(self, y: int, x: int, text: str, n: int, attr: int = 0) -> None:
        assert "\n" not in text and "\x1b" not in text
        text.encode(self.encoding)      # curses would fail on what it cannot encode
        self.lines[y] = text[:n]

    def erase(self) -> None:
        self.lines.clear()

    def refresh(self) -> None:
        pass

    def timeout(self, ms: int) -> None:
        pass

    def getch(self) -> int:
        return self.keys.pop(0) if self.keys else -1


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_screen_draws_hostile_names_safely(encoding: str) -> None:
    rec = recording()
    _, f2, _ = recorded_frames()
    win = FakeWindow(encoding)
    Screen(win).draw(f2, View(maxrows=100))
    text = "\n".join(win.lines[y] for y in sorted(win.lines))
    assert "sort=anon_vmas" in text and top_screen.KEYS_HELP in text
    row = next(ln for ln in win.lines.values() if ln.lstrip().startswith(
        f"{rec['hostile_pid']} "))
    assert "?[2J?]0;pwn??" in row


def test_screen_rows_stop_at_the_bottom() -> None:
    _, f2, _ = recorded_frames()
    win = FakeWindow(size=(8, 80))
    Screen(win).draw(f2, View(maxrows=100))
    assert max(win.lines) == 7 and all(len(t) <= 79 for t in win.lines.values())


def test_screen_keys_between_refreshes() -> None:
    _, f2, _ = recorded_frames()
    win = FakeWindow()
    view = View()
    win.keys = [ord("s"), ord("s"), ord("q")]
    assert Screen(win).wait_keys(view, f2, 5.0) is True
    assert view.key == "depth" and "sort=depth" in win.lines[0]


def test_plain_mode_prints_count_tables() -> None:
    _, f2, _ = recorded_frames()
    out, slept = io.StringIO(), []
    assert run_plain(lambda: f2, View(), 2.5, 3, out, sleep=slept.append) == 3
    assert slept == [2.5, 2.5, 2.5]
    assert out.getvalue().count(top_screen.PROC_HEAD) == 3
    assert "\x1b" not in out.getvalue()


def test_header_fields() -> None:
    h = Header(time=0.0, backend="b", anon_vmas=1, chains=2, orphaned=3, processes=4, lost=0)
    f = Frame(h, [ProcLine(1, "x", 1, 1, 1, None, None, None)],
              [FamilyLine(1, "x", 1, 0, 1, None)])
    lines = frame_text(f, View()).splitlines()
    assert re.match(r"\d\d:\d\d:\d\d backend=b lost=0 ", lines[0])
    assert lines[1] == "anon_vmas=1 chains=2 orphaned=3 processes=4"


# -- the command ----------------------------------------------------------------

def test_top_help_has_examples_and_options() -> None:
    result = CliRunner().invoke(main, ["top", "--help"], prog_name="anontrace")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("Usage: anontrace top [OPTIONS] [INTERVAL] [COUNT]")
    for opt in ("--noclear", "--maxrows", "--sort", "--families", "--no-rmap", "--backend",
                "-C", "-r", "-s"):
        assert opt in out
    assert "[anon_vmas|chains|depth|rmap|growth]" in out
    examples = [ln.strip() for ln in out.split("Examples:")[1].split("\n\n")[0].splitlines()
                if ln.strip()]
    assert examples and all(e.startswith("sudo anontrace top") for e in examples)


@pytest.mark.parametrize("args,needle", [
    (["top", "-s", "size"], "Invalid value for '-s'"),
    (["top", "0"], "Invalid value for '[INTERVAL]'"),
    (["top", "1", "0"], "Invalid value for '[COUNT]'"),
    (["top", "-r", "0"], "Invalid value for '-r'"),
])
def test_top_bad_arguments_are_usage_errors(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and needle in result.output, result.output


def test_top_as_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["top", "1", "1"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == ["Error: anontrace needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) "
                     "to load BPF programs: run it with sudo"]


def test_run_sh_checks_then_execs_top() -> None:
    """scripts/run.sh without arguments: `check`, then the live view."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "run.sh"
    lines = [ln.strip() for ln in script.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[-2:] == [".venv/bin/anontrace check", "exec .venv/bin/anontrace top"]
