"""tracer.kernel.kstate: the decoder of the BPF state maps.

The struct layouts are checked against bpf_programs/anontrace.bpf.c itself
(a field added on one side alone fails here), and the figures against the
definitions the Python model uses.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from tracer.kernel import kstate
from tracer.kernel.bpf_source import MAIN_PROGRAM
from tracer.kernel.kstate import NB, KernelState, MmRow, StateDump, hist_max_at

C_TYPES = {"u64": 8, "u32": 4, "s64": 8, "char": 1}


def _c_fields(name: str) -> list[tuple[str, int, int]]:
    """(type, count, size) of each member of ``struct name`` in the C file."""
    text = MAIN_PROGRAM.read_text()
    m = re.search(r"struct " + re.escape(name) + r" \{(.*?)\n\};", text, re.S)
    assert m, f"struct {name} not found in {MAIN_PROGRAM.name}"
    out = []
    for line in m.group(1).splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        f = re.fullmatch(r"(struct \w+|\w+) (\w+)(?:\[(\w+)\])?;", line)
        assert f, f"cannot read member {line!r} of struct {name}"
        typ, count = f.group(1), f.group(3)
        n = 1 if count is None else (NB if count == "NB" else int(count))
        size = _c_size(typ.split()[1]) if typ.startswith("struct ") else C_TYPES[typ]
        out.append((typ, n, size))
    return out


def _c_size(name: str) -> int:
    return sum(n * size for _, n, size in _c_fields(name))


@pytest.mark.parametrize("cname, fmt", [
    ("vstate", kstate.VSTATE), ("avstate", kstate.AVSTATE), ("mmstate", kstate.MMSTATE),
    ("pstate", kstate.PSTATE), ("famstate", kstate.FAMSTATE)])
def test_layouts_match_the_c_source(cname: str, fmt: struct.Struct) -> None:
    assert fmt.size == _c_size(cname)


def test_nb_matches_the_c_source() -> None:
    m = re.search(r"#define NB (\d+)", MAIN_PROGRAM.read_text())
    assert m and int(m.group(1)) == NB


def test_global_indexes_match_the_c_source() -> None:
    text = MAIN_PROGRAM.read_text()
    defs = dict(re.findall(r"#define (G_\w+) (\d+)", text))
    assert int(defs["G_AVS"]) == kstate.G_AVS
    assert int(defs["G_EVENTS"]) == kstate.G_EVENTS
    assert int(defs["G_ANOMALIES"]) == kstate.G_ANOMALIES
    assert int(defs["G_FULL"]) == kstate.G_FULL
    assert int(defs["G_NR"]) == kstate.G_NR == kstate.G_FULL + len(kstate.MAP_NAMES)


def test_process_flags_match_the_c_source() -> None:
    defs = dict(re.findall(r"#define (P_\w+) (\d+)", MAIN_PROGRAM.read_text()))
    assert {k: int(v) for k, v in defs.items()} == {
        "P_ALIVE": kstate.P_ALIVE, "P_UNSEEN": kstate.P_UNSEEN,
        "P_CENSUS": kstate.P_CENSUS, "P_EXITING": kstate.P_EXITING}


def hist_max(hist: list[int], big: int) -> int:
    """The reference (C: hist_max): the last non-empty bin, or ``big`` for the top one."""
    top = max((i for i, v in enumerate(hist) if v), default=0)
    return big if top == NB - 1 else top


def _packed(h: list[int]) -> bytes:
    return struct.pack(f"<{NB}I", *h)


def test_hist_max() -> None:
    h = [0] * NB
    assert hist_max_at(_packed(h), 0, 0) == hist_max(h, 0) == 0
    h[3] = 2
    h[1] = 5
    assert hist_max_at(_packed(h), 0, 0) == hist_max(h, 0) == 3
    h[NB - 1] = 1
    # the top bin's largest value
    assert hist_max_at(_packed(h), 0, 200) == hist_max(h, 200) == 200


def _mm_raw(tgid: int, vmas: int, avs: int, chains: int, events: tuple[int, ...],
            depth: dict[int, int], chain: dict[int, int], degree: dict[int, int]) -> bytes:
    hists = []
    for h in (depth, chain, degree):
        row = [0] * NB
        for k, v in h.items():
            row[k] = v
        hists.extend(row)
    return kstate.MMSTATE.pack(tgid, vmas, avs, chains, *events, 0, 0, 0, 0, *hists)


def test_decode_live_and_exited_processes() -> None:
    mm = _mm_raw(100, 13, 13, 39, (13, 13, 0, 0), {3: 1, 2: 1, 1: 11}, {3: 13}, {1: 2, 0: 11})
    row = MmRow.decode(0xAA, mm)
    assert (row.anon_vmas, row.anon_vma_chains, row.max_depth, row.max_chain,
            row.max_degree) == (13, 39, 3, 3, 1)
    live = kstate.PSTATE.pack(0xAA, 0, 99, kstate.P_ALIVE, 1, 2, 0, 0, b"live",
                              *struct.unpack(kstate.MMSTATE.format, bytes(kstate.MMSTATE.size)))
    exited = kstate.PSTATE.pack(0, 123, 100, 0, 0, 0, 0, 0, b"gone\0junk",
                                *kstate.MMSTATE.unpack(mm))
    dump = StateDump(mms={0xAA: mm}, procs={100: live, 101: exited}, families={},
                     global_sums=[0] * kstate.G_NR, depths=[0] * 129)
    st = KernelState.decode(dump)
    p = st.processes[100]
    assert p.alive and p.comm == "live" and p.ppid == 99
    # a live process: its mm's figures, plus the events of mms it had before
    assert p.figures.anon_vmas == 13 and p.figures.events["anon_vma_fork"] == 14
    assert p.figures.events["anon_vma_clone"] == 15
    q = st.processes[101]
    assert not q.alive and q.comm == "gone"
    assert (q.figures.anon_vmas, q.figures.max_depth, q.figures.max_chain) == (13, 3, 3)


def test_decoders_find_the_maxima_hist_max_finds() -> None:
    """The decoders scan the histograms as bytes; the reference unpacks every
    bin and takes :func:`hist_max`. Values of every byte width, the top bin
    (whose figure is ``big``), empty histograms."""
    import random
    rng = random.Random(9)
    for _ in range(300):
        hists = [[0] * NB for _ in range(3)]
        for h in hists:
            for b in rng.sample(range(NB), rng.choice((0, 1, 3, 10))):
                h[b] = rng.choice((1, 0xFF, 0x100, 0x10000, 0x1000000, 0xFFFFFFFF))
        big = [rng.randint(NB - 1, 500) for _ in range(3)]
        raw = kstate.MMSTATE.pack(7, 1, 2, 3, 4, 5, 6, 7, *big, 0, *hists[0], *hists[1], *hists[2])
        want = tuple(hist_max(h, b) for h, b in zip(hists, big, strict=True))
        row = MmRow.decode(0xAA, raw)
        assert (row.max_depth, row.max_chain, row.max_degree) == want
        proc = kstate.PSTATE.pack(0, 1, 2, 0, 0, 0, 0, 0, b"p", *kstate.MMSTATE.unpack(raw))
        dump = StateDump(mms={}, procs={5: proc},
                         families={9: kstate.FAMSTATE.pack(3, 1, big[0], 0, *hists[0])},
                         global_sums=[0] * kstate.G_NR, depths=[])
        st = KernelState.decode(dump)
        f = st.processes[5].figures
        assert (f.max_depth, f.max_chain, f.max_degree) == want
        assert st.families[9].max_depth == want[0]


def test_exiting_process_reports_its_copy_not_its_shrinking_mm() -> None:
    """Before v6.16 the teardown precedes the exit event: an alive process
    flagged exiting reports the copy taken when its teardown began."""
    held = _mm_raw(100, 13, 13, 39, (13, 13, 0, 0), {3: 1, 2: 1, 1: 11}, {3: 13}, {0: 13})
    shrinking = _mm_raw(100, 2, 2, 6, (13, 13, 5, 0), {3: 1, 2: 1}, {3: 2}, {0: 2})
    p = kstate.PSTATE.pack(0xAA, 0, 99, kstate.P_ALIVE | kstate.P_EXITING, 0, 0, 0, 0, b"x",
                           *kstate.MMSTATE.unpack(held))
    st = KernelState.decode(StateDump(mms={0xAA: shrinking}, procs={100: p}, families={},
                                      global_sums=[0] * kstate.G_NR, depths=[]))
    row = st.processes[100]
    assert row.alive and not row.exited
    f = row.figures
    assert (f.anon_vmas, f.anon_vma_chains, f.max_depth) == (13, 39, 3)
    assert f.events["unlink_anon_vmas"] == 0


def test_partial_reasons_name_full_maps() -> None:
    sums = [0] * kstate.G_NR
    sums[kstate.G_FULL + 1] = 7
    st = KernelState.decode(StateDump({}, {}, {}, sums, []))
    assert st.globals.map_full["anon_vmas"] == 7
    assert any("anon_vmas 7" in r for r in st.partial_reasons())
    assert st.partial_reasons(0) and not KernelState.decode(
        StateDump({}, {}, {}, [0] * kstate.G_NR, [])).partial_reasons()


def test_module_is_pure() -> None:
    src = Path(kstate.__file__).read_text()
    assert "import bcc" not in src and "from bcc" not in src


def test_torn_reads_finds_alive_processes_whose_mm_the_dump_missed() -> None:
    zero_mm = struct.unpack(kstate.MMSTATE.format, bytes(kstate.MMSTATE.size))

    def proc(mm: int, flags: int) -> bytes:
        return kstate.PSTATE.pack(mm, 0, 1, flags, 0, 0, 0, 0, b"p", *zero_mm)

    mms = {0xA: b""}
    procs = {1: proc(0xA, kstate.P_ALIVE),                        # its mm is in the dump
             2: proc(0xB, kstate.P_ALIVE),                        # forked/exec'd after it
             3: proc(0xC, kstate.P_ALIVE | kstate.P_EXITING),     # reports its exit copy
             4: proc(0xD, 0),                                     # exited
             5: proc(0, kstate.P_ALIVE)}                          # no mm known
    assert kstate.torn_reads(procs, mms) == [2]


def test_decode_cache_reuses_unchanged_rows_and_only_those() -> None:
    """serve decodes with a DecodeCache: over a run of dumps where entries
    change, appear and go (an mm changing under an unchanged live process
    included), every decode equals a decode without the cache, and an entry
    whose bytes did not change keeps its row object."""
    import random
    rng = random.Random(4)
    cache = kstate.DecodeCache()

    def mm_raw() -> bytes:
        return _mm_raw(rng.randint(1, 5), rng.randint(0, 9), rng.randint(0, 9), 3,
                       (1, 2, 3, 4), {rng.randint(0, 5): 1}, {2: 1}, {0: rng.randint(0, 2)})

    mms = {0x1000 + i: mm_raw() for i in range(20)}
    procs = {100 + i: kstate.PSTATE.pack(0x1000 + i, 0, 1, kstate.P_ALIVE, 0, 0, 0, 0, b"p",
                                         *struct.unpack(kstate.MMSTATE.format,
                                                        bytes(kstate.MMSTATE.size)))
             for i in range(20)}
    fams = {100 + i: kstate.FAMSTATE.pack(i, 0, 63, 0, *([0] * NB)) for i in range(20)}
    before: tuple[dict[int, bytes], KernelState] | None = None
    reused = 0
    for _ in range(30):
        for key in rng.sample(sorted(mms), 3):
            mms[key] = mm_raw()
        gone = rng.choice(sorted(procs))
        procs[gone] = kstate.PSTATE.pack(0, 5, 1, 0, 0, 0, 0, 0, b"x",
                                         *kstate.MMSTATE.unpack(mms[0x1000 + gone - 100]))
        fams[rng.choice(sorted(fams))] = kstate.FAMSTATE.pack(rng.randint(0, 9), 0, 63, 0,
                                                              *([0] * NB))
        dump = StateDump(mms=dict(mms), procs=dict(procs), families=dict(fams),
                         global_sums=[0] * kstate.G_NR, depths=[])
        got = KernelState.decode(dump, cache)
        assert got == KernelState.decode(dump)
        if before is not None:
            old_mms, old_state = before
            for mm, raw in mms.items():
                if old_mms[mm] == raw:
                    assert got.mms[mm] is old_state.mms[mm]
                    reused += 1
        before = (dict(mms), got)
    assert reused > 400
