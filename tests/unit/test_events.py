"""tracer.format.events: the wire format and the JSON form of events."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit import kfix
from tracer.commands.event_view import format_event, header
from tracer.format import events
from tracer.format.events import (
    F_REUSED,
    LOSS_COUNTERS,
    WIRE,
    Event,
    Kind,
    Site,
    copy_event,
    decode,
    decode_records,
    event_from_dict,
    pack_record,
)
from tracer.kernel.bpf_source import BPF_DIR

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def pack(**kw) -> bytes:
    """A record with kind ANON_VMA_FORK unless given (the layout itself is
    checked against the compiled program: tests/kernel/test_wire_format.py)."""
    kw.setdefault("kind", 1)
    return pack_record(**kw)


def test_wire_size_has_no_padding() -> None:
    # 13 u64, 5 u32, s32, 4 u32, char[16]: 160 bytes, no padding
    assert WIRE.size == 13 * 8 + 5 * 4 + 4 + 4 * 4 + 16 == 160
    assert [o for _, o, _ in events.wire_layout()][-1] + 16 == WIRE.size


def test_decode_every_field() -> None:
    raw = pack(ts=1, mm=0xffff888100073200, cur_mm=0xffff888100073e80, vma=4, vm_start=5,
               vm_end=6, anon_vma=7, parent=8, root=9, aux=10, aux2=11, num_children=12,
               num_active_vmas=13, kind=2, tgid=14, tid=15, depth=16, chain_len=17, ret=-12,
               pid2=18, tid2=19, site=5, flags=F_REUSED, comm=b"forkchain")
    ev = decode(raw)
    assert ev == Event(1, 0xffff888100073200, 0xffff888100073e80, 4, 5, 6, 7, 8, 9, 10, 11,
                       12, 13, Kind.ANON_VMA_CLONE, 14, 15, 16, 17, -12, 18, 19, Site.PUT,
                       F_REUSED, "forkchain")
    assert ev.probe == "anon_vma_clone"
    assert decode(memoryview(raw)) == ev


def test_decode_accepts_trailing_padding() -> None:
    # ring buffer records are rounded up to 8 bytes; perf adds a u32 size
    assert decode(pack(kind=9, comm=b"x") + b"\xff" * 8).comm == "x"


def test_comm_stops_at_nul_and_tolerates_bad_utf8() -> None:
    assert decode(pack(comm=b"ab\0garbage")).comm == "ab"
    assert decode(pack(comm=b"\xff\xfeok")).comm == "\ufffd\ufffdok"
    assert decode(pack(comm=b"a" * 16)).comm == "a" * 16


@pytest.mark.parametrize("n", [0, 1, WIRE.size - 1])
def test_short_record(n: int) -> None:
    with pytest.raises(ValueError, match=f"event record of {n} bytes, expected 160"):
        decode(pack()[:n])


@pytest.mark.parametrize("kw", [{"kind": 0}, {"kind": 14}, {"kind": 2**32 - 1},
                                {"site": 7}])
def test_unknown_kind_or_site(kw: dict) -> None:
    with pytest.raises(ValueError, match="unknown event kind or site"):
        decode(pack(**kw))


@given(ts=U64, mm=U64, anon_vma=U64, kind=st.sampled_from(list(Kind)),
       site=st.sampled_from(list(Site)), tgid=U32, ret=st.integers(-2**31, 2**31 - 1),
       flags=U32, comm=st.binary(max_size=15).filter(lambda b: b"\0" not in b))
def test_decode_roundtrip_property(ts, mm, anon_vma, kind, site, tgid, ret, flags, comm) -> None:
    ev = decode(pack(ts=ts, mm=mm, anon_vma=anon_vma, kind=int(kind), site=int(site),
                     tgid=tgid, ret=ret, flags=flags, comm=comm))
    assert (ev.ts, ev.mm, ev.anon_vma, ev.kind, ev.site, ev.tgid, ev.ret, ev.flags) == (
        ts, mm, anon_vma, kind, site, tgid, ret, flags)
    assert ev.comm == comm.decode("utf-8", "replace")
    assert event_from_dict(json.loads(json.dumps(ev.to_dict()))) == ev


def test_to_dict_shape() -> None:
    ev = decode(pack(mm=0xffff888100073200, kind=5, site=1, comm=b"c"))
    d = ev.to_dict()
    assert d["kind"] == "av_alloc" and d["site"] == "fork"
    assert d["mm"] == "0xffff888100073200" and d["vma"] == "0x0"
    assert d["ts"] == 0 and isinstance(d["depth"], int)
    assert set(d) == set(Event.__slots__)


@pytest.mark.parametrize("series,backend", [("6.18", "tracepoint"), ("6.1", "fentry"),
                                            ("6.1", "kprobe"), ("6.12", "fentry"),
                                            ("6.12", "kprobe")])
def test_recorded_streams_roundtrip(series: str, backend: str) -> None:
    dicts = kfix.event_dicts(series, backend)
    assert len(dicts) > 20
    for d in dicts:
        ev = event_from_dict(d)
        assert ev.to_dict() == d
    kinds = {d["kind"] for d in dicts}
    assert {"anon_vma_fork", "anon_vma_clone", "unlink_anon_vmas", "proc_fork"} <= kinds


def test_event_from_dict_accepts_ints_for_pointers() -> None:
    d = decode(pack(mm=0x10, kind=1)).to_dict()
    d["mm"] = 16
    assert event_from_dict(d).mm == 16


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("kind"),
    lambda d: d.update(kind="nope"),
    lambda d: d.update(site="elsewhere"),
    lambda d: d.update(mm="0xzz"),
    lambda d: d.update(mm=None),
    lambda d: d.update(extra=1),
    lambda d: d.pop("comm"),
])
def test_event_from_dict_errors(mutate) -> None:
    d = decode(pack(kind=1)).to_dict()
    mutate(d)
    with pytest.raises(ValueError, match="not an anontrace event"):
        event_from_dict(d)


def test_event_view_sanitises_comm() -> None:
    ev = decode(pack(kind=1, vm_start=0x7f00, depth=3, chain_len=3, flags=F_REUSED,
                     comm=b"\x1b[2Jevil"))
    line = format_event(ev)
    assert "\x1b" not in line and "?[2Jevil" in line
    assert " fork* " in line and "7f00" in line
    assert "PID" in header()
    fork = format_event(decode(pack(kind=9, pid2=4242, comm=b"p")))
    assert "proc-fork" in fork and "child=4242" in fork


def test_decode_records_keeps_order_and_counts_bad_ones() -> None:
    good = [pack(kind=1, tgid=i, comm=b"a") for i in range(5)]
    events, errors = decode_records(good)
    assert errors == 0 and [e.tgid for e in events] == list(range(5))
    # A short record and an unknown kind: skipped and counted, the rest kept.
    batch = good[:2] + [good[2][:100], pack(kind=99)] + good[3:]
    events, errors = decode_records(batch)
    assert errors == 2
    assert [e.tgid for e in events] == [0, 1, 3, 4]
    assert decode_records([]) == ([], 0)


@pytest.mark.parametrize("series,backend", [("6.18", "tracepoint"), ("6.12", "fentry")])
def test_copy_event_is_equal_and_independent(series: str, backend: str) -> None:
    for d in kfix.event_dicts(series, backend)[:200]:
        ev = event_from_dict(d)
        dup = copy_event(ev)
        assert dup == ev and dup is not ev
        dup.kind, dup.aux = Kind.SYNC, ev.aux + 1
        assert ev.to_dict() == d


def _header_defines(prefix: str) -> dict[str, int]:
    text = (BPF_DIR / "anontrace_common.h").read_text()
    return {m.group(1): int(m.group(2))
            for m in re.finditer(rf"^#define {prefix}(\w+) (\d+)\b", text, re.M)}


def test_kinds_sites_and_flags_match_the_header() -> None:
    assert _header_defines("K_") == {k.name: k.value for k in Kind}
    assert _header_defines("S_") == {s.name: s.value for s in Site if s is not Site.NONE}
    c_flags = _header_defines("F_")
    py_flags = {name[2:]: value for name, value in vars(events).items()
                if name.startswith("F_") and isinstance(value, int)}
    assert c_flags and c_flags.items() <= py_flags.items(), (c_flags, py_flags)
    # Flags only user space sets must not collide with the kernel's.
    user_only = set(py_flags) - set(c_flags)
    assert user_only == {"REUSED", "SYNTHETIC"}
    kernel_bits = 0
    for v in c_flags.values():
        kernel_bits |= v
    assert all(py_flags[n] & kernel_bits == 0 for n in user_only)


def test_loss_counters_match_the_header() -> None:
    c = _header_defines("C_LOST_")
    by_index = {"OUTPUT": "output_full", "ARGS": "kprobe_args_full",
                "NO_ENTRY": "exit_without_entry", "PENDING": "pending_full",
                "FILTER": "filter_full", "SCRATCH": "scratch_failed"}
    assert set(c) == set(by_index), c
    assert [by_index[n] for n, _ in sorted(c.items(), key=lambda kv: kv[1])] == \
        list(LOSS_COUNTERS)
    assert _header_defines("NR_")["COUNTERS"] == len(LOSS_COUNTERS)


def test_pack_record_names_unknown_members() -> None:
    with pytest.raises(TypeError, match="no member 'nope'"):
        pack_record(nope=1)
    assert decode(pack_record(kind=int(Kind.SYNC), tgid=7, comm=b"x")).tgid == 7


def test_tracepoint_recursion_misses_are_not_lost_rmap_ones_are() -> None:
    from tracer.format.events import lost_total
    from tracer.kernel.bpf_session import program_role, tracepoint_of

    assert lost_total({"output_full": 1, "tracepoint_recursion_misses": 500}) == 1
    assert lost_total({"recursion_misses": 2, "tracepoint_recursion_misses": 500}) == 2
    # Skipped process-event runs are lost; kmem runs taken over by the
    # second copies are not, the ones neither copy ran are.
    assert lost_total({"lifecycle_recursion_misses": 3, "tracepoint_recursion_misses": 5}) == 3
    assert lost_total({"tracepoint_takeovers": 40, "tracepoint_recursion_misses": 41}) == 0
    assert lost_total({"tracepoint_runs_lost": 7, "tracepoint_recursion_misses": 7}) == 7
    # A recording made before the split: one count over every program, not a loss then.
    assert lost_total({"output_full": 1, "recursion_misses": 9}) == 1
    from tracer.format.events import lost_by_reason
    assert lost_by_reason({"output_full": 1, "recursion_misses": 9, "perf_lost": 0}) == {
        "output_full": 1}
    assert lost_by_reason({"recursion_misses": 2, "tracepoint_recursion_misses": 5,
                           "tracepoint_takeovers": 3, "scratch_failed": 0}) == {
        "recursion_misses": 2}
    # Names as BCC gives them for the programs of bpf_programs/anontrace.bpf.c.
    roles = {b"raw_tracepoint__kmem_cache_free": "kmem",
             b"tracepoint__kmem__kmem_cache_free": "kmem",
             "raw_tracepoint__kmem_cache_alloc": "kmem",
             b"tp_again__kmem_cache_alloc": "copy",
             b"raw_tracepoint__sys_exit": "sys_exit",
             "raw_tracepoint__exit_mmap": "lifecycle",
             b"raw_tracepoint__sched_process_fork": "lifecycle",
             b"raw_tracepoint__sched_process_free": "lifecycle",
             b"kfunc__vmlinux__unlink_anon_vmas": "rmap",
             b"kretfunc__vmlinux__anon_vma_fork": "rmap",
             b"kp_fork_entry": "rmap", b"kr_clone_exit": "rmap"}
    for name, role in roles.items():
        assert program_role(name) == role, name
    assert tracepoint_of(b"tp_again__kmem_cache_alloc") == "kmem_cache_alloc"
    assert tracepoint_of("tracepoint__kmem__kmem_cache_free") == "kmem_cache_free"
    assert tracepoint_of(b"kp_fork_entry") is None
