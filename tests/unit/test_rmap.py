"""Rmap width: the census's decoding, the per-process and per-family
figures, `tree`, the report and the exporter, on a census recorded from a
real kernel (tests/fixtures/record_rmap.py: forkchain 2 regions x 3
generations, all alive)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exporters.config import ConfigError, parse_config
from exporters.prometheus import ExportState
from exporters.view import FamilyRow, ProcessRow, Snapshot
from tests.unit.scrape import scrape
from tracer.commands.rmap_report import RmapMeter
from tracer.commands.tree import build_tree, format_tree, vma_names
from tracer.errors import AnontraceError
from tracer.kernel.rmap_census import (
    AV_FIELDS,
    AV_VALUE,
    LINK,
    LINK_FIELDS,
    RawCensus,
    decode_anon_vmas,
    decode_census,
    summarize_chunks,
)
from tracer.model.rmap import AnonVmaRmap, RmapFigures, RmapSnapshot

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "rmap").glob("*-forkchain.json"))


def _load(path: Path) -> tuple[RawCensus, dict]:
    d = json.loads(path.read_text())
    raw = RawCensus(gen=d["gen"], links=bytes.fromhex(d["links"]),
                    anon_vmas={int(k, 16): bytes.fromhex(v) for k, v in d["anon_vmas"].items()},
                    stats=d["stats"], counters=d["counters"])
    return raw, d


@pytest.fixture(params=FIXTURES, ids=lambda p: p.name)
def recorded(request) -> tuple[RmapSnapshot, dict]:
    raw, meta = _load(request.param)
    return decode_census(raw), meta


def test_fixtures_exist() -> None:
    assert FIXTURES, "no recorded rmap census under tests/fixtures/rmap"


def _c_struct(name: str) -> list[tuple[str, str]]:
    text = (ROOT / "bpf_programs" / "rmap.bpf.c").read_text()
    body = re.search(rf"struct {name} {{(.*?)}};", text, re.S)
    assert body, name
    return re.findall(r"^\s*(u64|u32)\s+(\w+);", body.group(1), re.M)


def test_python_formats_match_the_c_structs() -> None:
    av = _c_struct("rmap_av")
    assert [n for _, n in av] == list(AV_FIELDS)
    assert AV_VALUE.format == "<" + "".join("Q" if t == "u64" else "I" for t, _ in av)
    link = _c_struct("rmap_link")
    # The Python field order names what LINK unpacks, in the C order.
    assert [n for _, n in link] == list(LINK_FIELDS)
    assert LINK.format == "<" + "".join("Q" if t == "u64" else "I" for t, _ in link)


def test_tree_of_each_generation_has_the_known_shape(recorded) -> None:
    snap, meta = recorded
    G = meta["generations"]
    fam = {int(g): v for g, v in meta["family"].items()}
    assert snap.complete
    for g, info in fam.items():
        tree = build_tree(snap, info["pid"], {}, lambda p: "forkchain")
        vmas = {int(v["start"], 16): v for v in tree["vmas"]}
        for start in info["regions"]:
            chain = vmas[start]["chain"]
            assert [e["depth"] for e in chain] == list(range(g + 1, 0, -1))
            assert [e["rmap_width"] for e in chain] == [G - k + 1 for k in range(g, -1, -1)]
            assert [e["owner_pid"] for e in chain] == [fam[k]["pid"] for k in range(g, -1, -1)]
            assert [e["children"] for e in chain] == [0 if k == G else 1
                                                      for k in range(g, -1, -1)]
        own = {e["id"]: e["rmap_width"] for v in tree["vmas"] for e in v["chain"]
               if e["id"] == v["anon_vma"]}
        assert (tree["anon_vmas"], tree["rmap_max_width"], tree["rmap_total_width"]) == \
            (len(own), max(own.values()), sum(own.values()))


def test_family_figures_cover_every_anon_vma_under_the_roots(recorded) -> None:
    snap, meta = recorded
    g0 = meta["family"]["0"]["pid"]
    roots = {a.anon_vma for a in snap.anon_vmas.values()
             if a.root == a.anon_vma and a.owner == g0}
    under = [a for a in snap.anon_vmas.values() if a.root in roots]
    f = snap.families[g0]
    assert f.anon_vmas == len(under)
    assert f.max_width == max(a.width for a in under) >= meta["generations"] + 1
    assert f.total_width == sum(a.width for a in under)
    # Per process, the family's anon_vmas split by owner.
    pids = [v["pid"] for v in meta["family"].values()]
    assert sum(snap.processes[p].anon_vmas for p in pids) == f.anon_vmas


def test_stale_entries_are_left_for_deletion() -> None:
    fresh = AV_VALUE.pack(1, 1, 2, 1, 7, 0, 5, 0)
    old = AV_VALUE.pack(1, 1, 9, 1, 7, 0, 4, 0)
    avs, stale = decode_anon_vmas({0x10: fresh, 0x20: old}, gen=5)
    assert list(avs) == [0x10] and stale == [0x20]
    assert avs[0x10].width == 2 and avs[0x10].owner == 7


def test_depth_survives_a_parent_cycle() -> None:
    # Pointers reused while the iterator ran could close a loop.
    snap = RmapSnapshot(anon_vmas={
        1: AnonVmaRmap(1, 2, 3, 1, 1, 9, 0), 2: AnonVmaRmap(2, 1, 3, 1, 1, 9, 1)})
    assert snap.depth(1) > 2
    assert snap.depth(42) == 0


def test_root_self_link_is_not_a_child() -> None:
    root = AnonVmaRmap(1, 1, 1, 3, 1, 9, 3)
    assert RmapSnapshot().child_anon_vmas(root) == 2
    assert RmapSnapshot(counters="degree").child_anon_vmas(root) == 3


def test_tree_text_escapes_hostile_names(recorded) -> None:
    snap, meta = recorded
    pid = meta["family"]["1"]["pid"]
    start = meta["family"]["1"]["regions"][0]
    tree = build_tree(snap, pid, {start: "[anon:\x1b[2Jx]"}, lambda p: "\x1b[31mevil\nname")
    text = format_tree(tree)
    assert "\x1b" not in text and "evil?name"[:8] in text
    assert tree["comm"] == "?[31mevil?name"


def test_vma_names_from_proc_maps() -> None:
    maps = ("55d0c6a00000-55d0c6a21000 rw-p 00000000 00:00 0          [heap]\n"
            "7f00aa000000-7f00aa004000 rw-p 00000000 00:00 0 \n"
            "7f00ab000000-7f00ab002000 rw-p 00012000 fe:01 1234   /usr/lib/lib c.so (deleted)\n")
    assert vma_names(maps) == {0x55d0c6a00000: "[heap]", 0x7f00aa000000: "",
                               0x7f00ab000000: "/usr/lib/lib c.so (deleted)"}


class _Census:
    def __init__(self, snap: RmapSnapshot | None) -> None:
        self.snap = snap

    def run(self, targets: tuple[int, ...] = ()) -> RmapSnapshot:
        if self.snap is None:
            raise AnontraceError("the rmap census could not run: EPERM")
        return self.snap


def test_report_gets_process_and_family_figures(recorded) -> None:
    snap, meta = recorded
    pids = [v["pid"] for v in meta["family"].values()]
    rows = [{"pid": p, "alive": True} for p in pids] + [{"pid": 1 << 22, "alive": False}]
    report = {"processes": rows, "partial": False, "partial_reasons": []}
    RmapMeter(_Census(snap)).annotate(report)
    for row in rows[:-1]:
        f = snap.processes[row["pid"]]
        assert (row["rmap_max_width"], row["rmap_total_width"]) == (f.max_width, f.total_width)
    assert rows[-1]["rmap_max_width"] is None
    r = report["rmap"]
    assert r["max_width"] == max(snap.processes[p].max_width for p in pids) == r["peak_max_width"]
    assert r["total_width"] == sum(snap.processes[p].total_width for p in pids)
    assert not report["partial"]


def test_report_says_why_when_the_census_fails() -> None:
    report = {"processes": [{"pid": 1, "alive": True}]}
    meter = RmapMeter(_Census(None))
    meter.annotate(report)
    assert report["rmap"] == {"available": False, "peak_max_width": 0,
                              "reason": "the rmap census could not run: EPERM"}
    assert report["processes"][0]["rmap_max_width"] is None


def test_incomplete_census_makes_the_report_partial(recorded) -> None:
    snap, _ = recorded
    snap.truncated_chains = 3
    report = {"processes": [], "partial": False, "partial_reasons": []}
    RmapMeter(_Census(snap)).annotate(report)
    assert report["partial"] and "3 chains cut short" in report["partial_reasons"][0]




def test_exporter_rmap_series(recorded) -> None:
    snap, _ = recorded
    rows = [ProcessRow(7, "a", 3, 6, 2, 1, True, 5, 9),
            ProcessRow(8, "b", 2, 2, 1, 0, True)]          # not in the last census
    fams = [FamilyRow("7", "a", 3, 0, 2, 5, 9)]
    got = scrape(ExportState(snapshot=Snapshot(processes=rows, families=fams,
                                                rmap=snap.summary(), rmap_time=1700000000.0)))
    assert got["anontrace_rmap_width_max"] == [({}, snap.max_width)]
    assert got["anontrace_rmap_census_timestamp_seconds"] == [({}, 1700000000.0)]
    assert got["anontrace_process_rmap_width_max"] == [({"pid": "7", "comm": "a"}, 5)]
    assert got["anontrace_process_rmap_links"] == [({"pid": "7", "comm": "a"}, 9)]
    assert got["anontrace_family_rmap_links"] == [({"family": "7", "comm": "a"}, 9)]
    # No census yet: no rmap series at all, not zeros.
    none = scrape(ExportState(snapshot=Snapshot(processes=rows[1:])))
    assert "anontrace_rmap_width_max" not in none
    assert "anontrace_process_rmap_width_max" not in none


def test_summed_as_read_equals_the_snapshot() -> None:
    """serve sums the map chunk by chunk (RmapCensus.run_summary); the
    figures equal those of the decoded snapshot, recorded runs, with a
    stale entry of an older run left out and returned for deletion."""
    for path in FIXTURES:
        raw, _ = _load(path)
        snap = decode_census(raw)
        old = AV_VALUE.pack(0, 0xdead0000, 99, 1, 4242, 0, raw.gen - 1, 0)
        entries = [*raw.anon_vmas.items(), (0xdead0000, old)]
        chunks = [(b"".join(k.to_bytes(8, "little") for k, _ in entries[i:i + 7]),
                   b"".join(v for _, v in entries[i:i + 7]), AV_VALUE.size)
                  for i in range(0, len(entries), 7)]
        acc, stale = summarize_chunks(chunks, raw.gen)
        summary = acc.build()
        assert stale == [0xdead0000]
        # The definitions, spelled out (tracer/model/rmap.py's docstring).
        avs = list(snap.anon_vmas.values())
        root_owner = {a.anon_vma: a.owner for a in avs if a.root == a.anon_vma}

        def figures(key, avs=avs):
            out = {}
            for k in {key(a) for a in avs} - {0}:
                ws = [a.width for a in avs if key(a) == k]
                out[k] = RmapFigures(len(ws), max(ws), sum(ws))
            return out

        assert summary.processes == figures(lambda a: a.owner) == snap.processes
        assert summary.families == figures(lambda a, ro=root_owner: ro.get(a.root, 0)) \
            == snap.families
        assert summary.processes and summary.families
        assert summary.max_width == max(a.width for a in avs) == snap.max_width


@pytest.mark.parametrize("text,want", [("rmap_interval: 30s\n", 30.0),
                                       ("rmap_interval: ~\n", None),
                                       ("top_k: 5\n", 15.0)])
def test_rmap_interval_config(text: str, want: float | None) -> None:
    assert parse_config(text, "c.yaml").rmap_interval_seconds == want


def test_rmap_interval_zero_names_file_line_and_field() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("top_k: 5\nrmap_interval: 0\n", "c.yaml")
    assert str(e.value).startswith("c.yaml:2: rmap_interval: ")


def test_chain_is_deepest_first_whatever_the_list_order(recorded) -> None:
    """The kernel's anon_vma rework keeps a VMA's chain list in another order
    (seen on 7.2: own, root, parent); `tree` shows it deepest first."""
    import dataclasses

    snap, meta = recorded
    g = meta["generations"]
    pid = meta["family"][str(g)]["pid"]
    n = g + 1
    snap.links = [dataclasses.replace(lk, index=(lk.index * 2) % n) if lk.tgid == pid else lk
                  for lk in snap.links]
    tree = build_tree(snap, pid, {}, lambda p: "forkchain")
    for v in tree["vmas"]:
        depths = [e["depth"] for e in v["chain"]]
        assert depths == sorted(depths, reverse=True), depths
        assert v["chain"][0]["own"] and v["chain"][0]["id"] == v["anon_vma"]
