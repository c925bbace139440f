"""The rmap-walk measurement without a kernel: the record format against the
BPF source, the histogram bins, the attach plan and -D flags on BTF and
kallsyms recorded from real kernels (tests/fixtures/rmapwalk/), the report
and the CLI's help."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracer.commands.cli import main
from tracer.commands.rmapwalk_report import WalkRun, format_table, ranked, to_json
from tracer.format.rmapwalk import (
    FIELDS,
    FORMAT,
    NBINS,
    WalkStats,
    bin_label,
    decode_stats,
    layout_mismatch,
    ratio_bin,
)
from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.kernel_env import Kallsyms
from tracer.kernel.layout import read_walk_layout
from tracer.kernel.rmapwalk import (
    LOSS_COUNTERS,
    WALK_PROGRAM,
    WalkPlan,
    WalkReading,
    plan_walks,
    refusal_message,
    walk_cflags,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rmapwalk"
SOURCE = WALK_PROGRAM.read_text()


def recorded() -> list[Path]:
    paths = sorted(FIXTURES.glob("*.json"))
    assert paths, f"no recorded kernels in {FIXTURES}"
    return paths


def kernel(release_prefix: str) -> tuple[Btf, Kallsyms, bool]:
    """BTF, kallsyms and kprobe availability recorded from one kernel."""
    path = next((p for p in recorded() if p.name.startswith(release_prefix + ".")), None)
    if path is None:
        pytest.fail(f"no fixture for {release_prefix} in {FIXTURES}")
    data = json.loads(path.read_text())
    return Btf(data["btf"]["types"]), Kallsyms(data["kallsyms"]), data["kprobe_events"]


def defines(flags: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for f in flags:
        assert f.startswith("-D"), f
        k, sep, v = f[2:].partition("=")
        assert k not in out, f"{k} defined twice"
        out[k] = v if sep else None
    return out


# ---------------------------------------------------------------- format

def test_fields_are_the_c_struct() -> None:
    body = re.search(r"struct walk_stats \{(.*?)\};", SOURCE, re.S)
    assert body is not None
    sizes = {"u64": "Q", "u32": "I"}
    members = []
    for line in body.group(1).strip().splitlines():
        m = re.fullmatch(r"\s*(u64|u32|char) (\w+)(?:\[(\w+)\])?;", line)
        assert m, line
        typ, name, count = m.groups()
        count = str(NBINS) if count == "NBINS" else count
        if typ == "char":
            members.append((name, f"{count}s"))
        else:
            members.append((name, f"{count}{sizes[typ]}" if count else sizes[typ]))
    assert members == list(FIELDS)
    assert re.search(rf"^#define NBINS {NBINS}$", SOURCE, re.M)


def test_loss_counters_are_the_c_ones() -> None:
    found = dict((int(v), k) for k, v in re.findall(r"^#define C_(\w+) (\d+)", SOURCE, re.M))
    assert [found[i].lower() for i in sorted(found)] == list(LOSS_COUNTERS)
    assert f"#define NR_WALK_COUNTERS {len(LOSS_COUNTERS)}" in SOURCE


def _c_bin(visited: int, mapped: int) -> int:
    # rmapwalk.bpf.c ratio_bin(), step by step
    r, b = visited // mapped, 0
    for i in range(1, NBINS):
        if r >> i:
            b = i
    return b


def test_ratio_bins() -> None:
    assert [ratio_bin(v, 1) for v in (1, 2, 3, 4, 7, 8, 16, 31, 32)] == [0, 1, 1, 2, 2, 3, 4, 4, 5]
    assert ratio_bin(5, 2) == 1 and ratio_bin(4, 4) == 0
    assert ratio_bin(1 << 40, 1) == NBINS - 1
    assert ratio_bin(1, 2) is None and ratio_bin(0, 1) is None and ratio_bin(3, 0) is None
    for visited in [*range(1, 4100), (1 << 15) - 1, 1 << 15, 1 << 16, (1 << 32) - 1]:
        for mapped in (1, 2, 3, 7):
            if visited >= mapped:
                assert ratio_bin(visited, mapped) == _c_bin(visited, mapped), (visited, mapped)


def test_bin_labels() -> None:
    assert [bin_label(i) for i in range(5)] == ["1", "2-3", "4-7", "8-15", "16-31"]
    assert bin_label(NBINS - 1) == f"{1 << (NBINS - 1)}+"
    for bad in (-1, NBINS):
        with pytest.raises(ValueError):
            bin_label(bad)


def _raw(walks: int = 3, visited: int = 40, measured: int = 34, mapped: int = 2,
         unmapped: int = 1, unmeasured: int = 0, below: int = 0,
         hist: dict[int, int] | None = None, tgid: int = 4242,
         comm: bytes = b"falias") -> bytes:
    h = [0] * NBINS
    for i, n in (hist or {4: 1, 0: 1}).items():
        h[i] = n
    return FORMAT.pack(walks, visited, measured, mapped, unmapped, unmeasured, below, *h,
                       tgid, 0, comm)


def test_decode_stats() -> None:
    s = decode_stats(0xFFFF888012345600, _raw())
    assert (s.walks, s.visited, s.measured_visited, s.mapped) == (3, 40, 34, 2)
    assert (s.unmapped_walks, s.unmeasured_walks, s.below_one_walks) == (1, 0, 0)
    assert (s.owner_pid, s.owner_comm) == (4242, "falias")
    assert s.mean_ratio == 17.0
    assert s.histogram_labels() == {"1": 1, "16-31": 1}
    d = s.to_dict()
    assert d["root"] == "0xffff888012345600" and d["mean_ratio"] == 17.0
    assert d["histogram"] == {"1": 1, "16-31": 1} and d["owner_pid"] == 4242
    # nobody named, nothing measured
    s = decode_stats(1, _raw(measured=0, mapped=0, unmapped=3, hist={}, tgid=0, comm=b""))
    assert s.mean_ratio is None and s.to_dict()["owner_pid"] is None
    with pytest.raises(ValueError, match="expected"):
        decode_stats(1, _raw()[:-1])


def test_layout_mismatch() -> None:
    names = [n for n, _ in FIELDS]
    assert layout_mismatch(names, FORMAT.size) is None
    assert "expected" in str(layout_mismatch(names[:-1], FORMAT.size))
    assert "bytes" in str(layout_mismatch(names, FORMAT.size + 8))


# ---------------------------------------------------------------- plan and flags

def test_fixtures_cover_the_guest_kernels() -> None:
    names = {p.name for p in recorded()}
    for series in ("6.1.", "6.12.", "7.2."):
        assert any(n.startswith(series) for n in names), (series, names)


@pytest.mark.parametrize("path", recorded(), ids=lambda p: p.stem)
def test_every_macro_of_the_program_is_defined(path: Path) -> None:
    btf, kallsyms, kprobes = kernel(path.stem)
    layout = read_walk_layout(btf)
    for method, code in (("fentry", "1"), ("kprobe", "2")):
        plan = plan_walks(method, kallsyms, btf, True)
        assert plan.usable, plan
        d = defines(walk_cflags(plan, layout))
        assert d["WALK_METHOD"] == code and d["WALK_FUNC"] == "rmap_walk_anon"
        assert d["WALK_ARGS"] == "u64 a0, u64 a1, u64 a2" and d["WALK_FOLIO"] == "a0"
        assert d["ITER_FIRST_ARGS"] == d["ITER_NEXT_ARGS"] == "u64 a0, u64 a1, u64 a2"
        assert d["NBINS"] == str(NBINS)
        used = set(re.findall(r"\bOFF_\w+", SOURCE)) | {"PG_HEAD"}
        optional = {"OFF_FOLIO_LARGE_MAPCOUNT": "HAVE_LARGE_MAPCOUNT",
                    "OFF_MM_OWNER": "HAVE_MM_OWNER"}
        for macro in used:
            if macro in optional and optional[macro] not in d:
                continue
            assert macro in d, (path.stem, macro)


def test_large_mapcount_by_feature() -> None:
    old, new = read_walk_layout(kernel("6.1.0-57-amd64")[0]), None
    for prefix in ("6.12.117+deb12-amd64", "7.2.13+deb14-amd64"):
        new = read_walk_layout(kernel(prefix)[0])
        assert new.large_mapcount and "HAVE_LARGE_MAPCOUNT" in new.defines()
        assert new.pg_head == 6
    # 6.1's folio has no _large_mapcount: its large folios are not measured;
    # and its pageflags number PG_head differently (config-dependent enum).
    assert not old.large_mapcount and "HAVE_LARGE_MAPCOUNT" not in old.defines()
    assert old.pg_head == 16
    assert old.owner and new is not None and new.owner


def test_layout_without_folio_reads_struct_page() -> None:
    btf = kernel("6.12.117+deb12-amd64")[0]
    with_folio = read_walk_layout(btf)
    types = [dict(t, name="not_folio") if t.get("name") == "folio" else t
             for t in btf._by_id.values()]
    with_page = read_walk_layout(Btf(types))
    # The folio's first members overlay struct page's: same offsets, but
    # no large-folio counter to read.
    for key in ("FOLIO_FLAGS", "FOLIO_MAPPING", "FOLIO_MAPCOUNT"):
        assert with_page.offsets[key] == with_folio.offsets[key], key
    assert with_folio.large_mapcount and not with_page.large_mapcount
    assert "OFF_FOLIO_LARGE_MAPCOUNT" not in with_page.defines()


def test_enum_value_errors() -> None:
    btf = kernel("6.12.117+deb12-amd64")[0]
    with pytest.raises(BtfError, match="no 'PG_nonesuch'"):
        btf.enum_value("pageflags", "PG_nonesuch")
    with pytest.raises(BtfError, match="enum nonesuch is not"):
        btf.enum_value("nonesuch", "X")


def test_plan_says_why_not() -> None:
    btf, kallsyms, _ = kernel("6.12.117+deb12-amd64")
    inlined = Kallsyms("\n".join(ln for ln in (kallsyms_text("6.12.117+deb12-amd64"))
                                 .splitlines() if not ln.endswith(" rmap_walk_anon")))
    plan = plan_walks("fentry", inlined, btf, True)
    assert not plan.usable and plan.reason == "rmap_walk_anon not in kallsyms (inlined or absent)"
    plan = plan_walks("kprobe", kallsyms, btf, False)
    assert not plan.usable and "kprobes unavailable" in str(plan.reason)
    no_proto = Btf([t for t in btf._by_id.values() if t.get("name") != "rmap_walk_anon"])
    plan = plan_walks("fentry", kallsyms, no_proto, True)
    assert not plan.usable and "fentry needs the prototype" in str(plan.reason)
    # kprobes read registers: the usual position of the folio will do
    assert plan_walks("kprobe", kallsyms, no_proto, True).usable
    with pytest.raises(ValueError):
        walk_cflags(WalkPlan("fentry", "no"), read_walk_layout(btf))
    with pytest.raises(ValueError):
        plan_walks("tracepoint", kallsyms, btf, True)


def kallsyms_text(release: str) -> str:
    return str(json.loads((FIXTURES / f"{release}.json").read_text())["kallsyms"])


def test_refusal_message() -> None:
    both = refusal_message({"fentry": "EPERM (lockdown)", "kprobe": "kprobes unavailable"})
    assert both == ("cannot measure rmap walks: neither fentry nor kprobes can attach to "
                    "rmap_walk_anon on this kernel (fentry: EPERM (lockdown); "
                    "kprobe: kprobes unavailable)")
    assert refusal_message({"kprobe": "nope"}) == (
        "cannot measure rmap walks: kprobe cannot attach to rmap_walk_anon (nope)")


# ---------------------------------------------------------------- report and CLI

def _stats(root: int, visited: int, walks: int, owner: int = 0) -> WalkStats:
    hist = [0] * NBINS
    hist[ratio_bin(visited, walks) or 0] = walks
    return WalkStats(root, walks, visited, visited, walks, 0, 0, 0, tuple(hist), owner,
                     "app" if owner else "")


def test_report() -> None:
    run = WalkRun("kprobe", 2.0, WalkReading(
        [_stats(0x10, 4, 2), _stats(0x20, 64, 2, owner=77), _stats(0x30, 8, 8)],
        {"roots_full": 0, "walkers_full": 3}))
    assert [s.root for s in ranked(run.reading.roots, 0)] == [0x20, 0x30, 0x10]
    text = format_table(run, 2)
    lines = text.splitlines()
    assert lines[0] == ("rmap walks of anonymous folios over 2.0 s (kprobe on rmap_walk_anon): "
                        "12 walks, 3 families (root anon_vmas)")
    assert lines[1] == "not counted: walkers_full=3"
    assert lines[3].split() == ["20", "77", "app", "2", "64", "2", "32.00", "0", "0", "32-63:2"]
    assert lines[4].split() == ["30", "-", "8", "8", "8", "1.00", "0", "0", "1:8"]
    assert lines[-1] == "(1 more families; --top 0 lists all)"
    doc = to_json(run, 0)
    assert doc["walks"] == 12 and doc["families"] == 3 and len(doc["roots"]) == 3
    assert doc["roots"][0]["owner_pid"] == 77 and doc["lost"]["walkers_full"] == 3
    json.dumps(doc)


def test_help_has_an_example() -> None:
    out = CliRunner().invoke(main, ["rmapwalk", "--help"], prog_name="anontrace")
    assert out.exit_code == 0, out.output
    assert "sudo anontrace rmapwalk -d 30" in out.output
    for opt in ("--duration", "--json", "--top", "--method"):
        assert opt in out.output


def test_bad_values_are_usage_errors() -> None:
    out = CliRunner().invoke(main, ["rmapwalk", "-d", "-1"])
    assert out.exit_code == 2 and "--duration and --top take values >= 0" in out.output
