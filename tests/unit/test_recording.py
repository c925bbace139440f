"""tracer.pipeline.recording (RecordingWriter/RecordingReader) and runner.run_replay."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.unit import kfix
from tests.unit.model_streams import (
    FAMILY_STREAMS,
    first_teardown,
    model_stream,
    pack,
    pack_all,
    raw_events,
)
from tracer.commands.runner import Tracker, run_replay
from tracer.errors import AnontraceError
from tracer.format.events import WIRE, Event, Kind, Site
from tracer.pipeline.recording import (
    END,
    EVENTS,
    FORMAT_VERSION,
    FRAME,
    MAGIC,
    TICK,
    RecordingError,
    RecordingReader,
    RecordingWriter,
)

HEADER = {"kernel": "6.12.117+deb12-amd64", "backend": "fentry", "transport": "ringbuf",
          "processes": [{"pid": 1, "comm": "x", "ppid": 0, "preexisting": True}]}


def hdr_end(header: dict[str, Any]) -> int:
    """Offset of the first frame for a header."""
    return len(MAGIC) + 1 + 4 + len(json.dumps(header, sort_keys=True).encode())


def sample_events() -> list[Event]:
    return kfix.events("6.12", "fentry")[:25]


def write(path: Path, header: dict[str, Any], frames: list[tuple[int, Any]]) -> list[int]:
    """Write frames ((EVENTS, [Event]), (TICK, meta), (END, meta)); return
    the offset of each frame."""
    w = RecordingWriter(path, header)
    offsets = []
    for kind, payload in frames:
        offsets.append(w._f.tell())
        if kind == EVENTS:
            w.events(pack_all(payload))
        elif kind == TICK:
            w.tick(payload)
        else:
            w.end(payload)
    w.close()
    return offsets


def read_all(path: Path) -> tuple[list, RecordingError | None]:
    r = RecordingReader(path)
    got = []
    try:
        for f in r.frames():
            got.append(f)
    except RecordingError as exc:
        return got, exc
    return got, None


# --- round trip -----------------------------------------------------------------

def test_pack_matches_the_wire_decoder() -> None:
    from tracer.format.events import decode
    for e in sample_events():
        assert len(pack(e)) == WIRE.size
        assert decode(pack(e)) == e


def test_round_trip(tmp_path: Path) -> None:
    evs = sample_events()
    p = tmp_path / "r.rec"
    offsets = write(p, HEADER, [(EVENTS, evs[:10]), (TICK, {"time": 1.5, "lost": {"a": 1}}),
                                (EVENTS, evs[10:]), (END, {"time": 2.5, "lost": {},
                                                           "exit_status": 3})])
    assert offsets[0] == hdr_end(HEADER)
    r = RecordingReader(p)
    assert r.header == HEADER
    frames = list(r.frames())
    assert [f.kind for f in frames] == [EVENTS, TICK, EVENTS, END]
    assert [f.offset for f in frames] == offsets
    assert frames[0].events == evs[:10] and frames[2].events == evs[10:]
    assert frames[1].meta == {"time": 1.5, "lost": {"a": 1}} and frames[1].events is None
    assert frames[3].meta == {"time": 2.5, "lost": {}, "exit_status": 3}
    assert offsets[1] == offsets[0] + FRAME.size + 10 * WIRE.size


def test_writer_counts_events_and_skips_empty_frames(tmp_path: Path) -> None:
    p = tmp_path / "r.rec"
    w = RecordingWriter(p, {})
    w.events(b"")
    w.events(pack_all(sample_events()[:3]))
    w.close()
    assert w.events_written == 3
    frames = list(RecordingReader(p).frames())
    assert len(frames) == 1 and len(frames[0].events or []) == 3
    assert p.stat().st_size == hdr_end({}) + FRAME.size + 3 * WIRE.size


def test_empty_recording_has_no_frames(tmp_path: Path) -> None:
    p = tmp_path / "r.rec"
    RecordingWriter(p, HEADER).close()
    assert list(RecordingReader(p).frames()) == []


# --- errors ---------------------------------------------------------------------

def good_file(tmp_path: Path) -> tuple[Path, bytes, list[int]]:
    evs = sample_events()
    p = tmp_path / "good.rec"
    offsets = write(p, HEADER, [(EVENTS, evs[:5]), (TICK, {"time": 1.0, "lost": {}}),
                                (EVENTS, evs[5:12]), (END, {"time": 2.0, "lost": {}})])
    return p, p.read_bytes(), offsets


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError) as ei:
        RecordingReader(tmp_path / "missing.rec")
    assert ei.value.offset == 0 and "cannot read" in str(ei.value)


@pytest.mark.parametrize("data", [b"", b"ANON", b"NOTANANONTRACEFILE" * 3,
                                  b"anontrace\x00rec\x01\x00\x00\x00\x00"])
def test_bad_magic(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "bad.rec"
    p.write_bytes(data)
    with pytest.raises(RecordingError) as ei:
        RecordingReader(p)
    assert ei.value.offset == 0
    assert "bad magic" in str(ei.value) and "byte offset 0" in str(ei.value)


def test_unsupported_version(tmp_path: Path) -> None:
    _, data, _ = good_file(tmp_path)
    p = tmp_path / "v.rec"
    p.write_bytes(data[:len(MAGIC)] + bytes([FORMAT_VERSION + 1]) + data[len(MAGIC) + 1:])
    with pytest.raises(RecordingError) as ei:
        RecordingReader(p)
    assert ei.value.offset == len(MAGIC)
    assert f"unsupported format version {FORMAT_VERSION + 1}" in str(ei.value)


@pytest.mark.parametrize("cut", [len(MAGIC), len(MAGIC) + 1, len(MAGIC) + 4,
                                 len(MAGIC) + 5, len(MAGIC) + 6, "hdr-1"])
def test_truncated_header(tmp_path: Path, cut: int | str) -> None:
    _, data, offsets = good_file(tmp_path)
    n = offsets[0] - 1 if cut == "hdr-1" else int(cut)
    p = tmp_path / "t.rec"
    p.write_bytes(data[:n])
    with pytest.raises(RecordingError) as ei:
        RecordingReader(p)
    assert "truncated header" in str(ei.value)
    # before the length field is complete, the header starts at the version byte
    assert ei.value.offset == (len(MAGIC) if n < len(MAGIC) + 5 else len(MAGIC) + 5)


def test_corrupt_header_json(tmp_path: Path) -> None:
    p = tmp_path / "h.rec"
    body = b"{not json"
    p.write_bytes(MAGIC + bytes([FORMAT_VERSION]) + struct.pack("<I", len(body)) + body)
    with pytest.raises(RecordingError) as ei:
        RecordingReader(p)
    assert ei.value.offset == len(MAGIC) + 5 and "corrupt header" in str(ei.value)


@pytest.mark.parametrize("frame", [0, 1, 2, 3])
@pytest.mark.parametrize("where", ["in-frame-header", "in-payload", "last-byte"])
def test_truncated_frame(tmp_path: Path, frame: int, where: str) -> None:
    _, data, offsets = good_file(tmp_path)
    end = offsets[frame + 1] if frame + 1 < len(offsets) else len(data)
    n = {"in-frame-header": offsets[frame] + 3, "in-payload": offsets[frame] + FRAME.size + 2,
         "last-byte": end - 1}[where]
    p = tmp_path / "t.rec"
    p.write_bytes(data[:n])
    got, err = read_all(p)
    assert err is not None
    assert err.offset == offsets[frame]
    assert f"byte offset {offsets[frame]}" in str(err)
    assert ("truncated frame header" if where == "in-frame-header" else "truncated frame") \
        in str(err)
    assert [f.offset for f in got] == offsets[:frame]   # every good frame came first
    assert [f.kind for f in got] == [EVENTS, TICK, EVENTS, END][:frame]


def test_unknown_frame_type(tmp_path: Path) -> None:
    _, data, offsets = good_file(tmp_path)
    bad = bytearray(data)
    bad[offsets[2]] = 9
    p = tmp_path / "u.rec"
    p.write_bytes(bytes(bad))
    got, err = read_all(p)
    assert err is not None and err.offset == offsets[2]
    assert "corrupt frame (type 9)" in str(err)
    assert len(got) == 2


def test_oversized_frame_length(tmp_path: Path) -> None:
    _, data, offsets = good_file(tmp_path)
    bad = bytearray(data)
    struct.pack_into("<I", bad, offsets[1] + 4, (64 << 20) + 1)
    p = tmp_path / "o.rec"
    p.write_bytes(bytes(bad))
    got, err = read_all(p)
    assert err is not None and err.offset == offsets[1] and len(got) == 1


def test_partial_event_record(tmp_path: Path) -> None:
    p = tmp_path / "p.rec"
    w = RecordingWriter(p, HEADER)
    w.events(pack_all(sample_events()[:2]))
    second = w._f.tell()
    w.events(pack_all(sample_events()[:2])[:-1])  # one record short by a byte
    w.close()
    got, err = read_all(p)
    assert err is not None and err.offset == second
    assert "partial record" in str(err)
    assert len(got) == 1 and len(got[0].events) == 2


def test_corrupt_event_kind(tmp_path: Path) -> None:
    raw = bytearray(pack(sample_events()[0]))
    struct.pack_into("<I", raw, 13 * 8, 99)   # kind
    p = tmp_path / "k.rec"
    w = RecordingWriter(p, HEADER)
    w.events(bytes(raw))
    w.close()
    got, err = read_all(p)
    assert err is not None and err.offset == hdr_end(HEADER)
    assert "corrupt event" in str(err) and got == []


def test_corrupt_tick_payload(tmp_path: Path) -> None:
    p = tmp_path / "c.rec"
    w = RecordingWriter(p, HEADER)
    w.events(pack_all(sample_events()[:1]))
    at = w._f.tell()
    w._f.write(FRAME.pack(TICK, 3) + b"{{{")
    w.close()
    got, err = read_all(p)
    assert err is not None and err.offset == at and "corrupt frame" in str(err)
    assert len(got) == 1


# --- run_replay -------------------------------------------------------------------

class Recorded:
    """A recording built from a recorded fixture stream: events in frames of
    `batch`, a TICK after the frames listed in `ticks_after`."""

    def __init__(self, tmp_path: Path, series: str, backend: str, batch: int = 50) -> None:
        self.series, self.backend = series, backend
        self.meta = kfix.events_meta(series, backend)
        # recordings store the events before the derivation
        self.raw = raw_events(series, backend)
        self.pids = {int(g): info["pid"] for g, info in self.meta["gens"].items()}
        self.header = {"kernel": self.meta["release"], "backend": backend,
                       "processes": [{"pid": self.pids[0], "comm": "forkchain", "ppid": 1,
                                      "preexisting": True}]}
        self.path = tmp_path / f"{series}-{backend}.rec"
        self.batches = [self.raw[i:i + batch] for i in range(0, len(self.raw), batch)]

    def write(self, end: bool = True, lost: dict[str, int] | None = None) -> list[int]:
        frames: list[tuple[int, Any]] = []
        for i, b in enumerate(self.batches):
            frames.append((EVENTS, b))
            frames.append((TICK, {"time": 100.0 + i, "lost": lost or {}}))
        if end:
            frames.append((END, {"time": 200.0, "lost": lost or {}, "exit_status": 7}))
        return write(self.path, self.header, frames)


def replay(path: Path) -> tuple[list[dict[str, Any]], int | AnontraceError]:
    reports: list[dict[str, Any]] = []
    try:
        rc: int | AnontraceError = run_replay(path, reports.append)
    except AnontraceError as exc:
        rc = exc
    for r in reports:
        json.dumps(r)
    return reports, rc


@pytest.fixture(params=FAMILY_STREAMS, ids=lambda p: f"{p[0]}-{p[1]}")
def recorded(request, tmp_path: Path) -> Recorded:
    return Recorded(tmp_path, *request.param)


def test_replay_reports_at_each_tick_and_a_final_one(recorded: Recorded) -> None:
    recorded.write()
    reports, rc = replay(recorded.path)
    assert rc == 7
    n = len(recorded.batches)
    assert len(reports) == n + 1
    assert [r["final"] for r in reports] == [False] * n + [True]
    assert [r["time"] for r in reports] == [100.0 + i for i in range(n)] + [200.0]
    assert all(r["backend"] == recorded.backend and r["lost_events"] == 0 for r in reports)
    final = reports[-1]
    assert sorted(r["pid"] for r in final["processes"]) == sorted(recorded.pids.values())
    assert not any(r["alive"] for r in final["processes"])
    assert final["totals"] == {"anon_vmas": 0, "anon_vma_chains": 0, "orphaned_anon_vmas": 0}
    assert final["partial"]     # generation 0 was running before tracing began
    # the first report sees generation 0 alive
    assert any(r["pid"] == recorded.pids[0] and r["alive"] for r in reports[0]["processes"])


def test_replay_sees_the_whole_family_alive_mid_run(recorded: Recorded) -> None:
    """A tick at the last moment all generations are alive reports depth g+1."""
    stream = model_stream(recorded.series, recorded.backend)
    cut_ts = stream[first_teardown(stream)].ts
    head = [e for e in recorded.raw if e.ts < cut_ts]
    recorded.batches = [head, recorded.raw[len(head):]]
    recorded.write()
    reports, rc = replay(recorded.path)
    assert rc == 7 and len(reports) == 3
    rows = {r["pid"]: r for r in reports[0]["processes"]}
    for g, pid in recorded.pids.items():
        assert rows[pid]["alive"], g
        assert rows[pid]["max_depth"] == g + 1 and rows[pid]["max_chain"] == g + 1, g
        assert rows[pid]["ppid"] == (recorded.pids[g - 1] if g else 1), g
    assert reports[0]["totals"]["anon_vmas"] > 0


def test_replay_equals_feeding_the_model(recorded: Recorded) -> None:
    recorded.write()
    reports, _ = replay(recorded.path)
    t = Tracker(recorded.backend, recorded.header["processes"])
    t.feed(model_stream(recorded.series, recorded.backend))
    want = t.report(200.0, 0, final=True)
    assert reports[-1]["processes"] == want["processes"]
    assert reports[-1]["totals"] == want["totals"]


def test_replay_reports_lost_counters(recorded: Recorded) -> None:
    recorded.write(lost={"output_full": 2, "perf_lost": 3, "undecodable": 0,
                         "tracepoint_recursion_misses": 40, "tracepoint_takeovers": 9})
    reports, rc = replay(recorded.path)
    assert rc == 7
    assert all(r["lost_events"] == 5 for r in reports)
    # What lost_events is made of: the counters that count, not the shown ones.
    assert all(r["lost_by_reason"] == {"output_full": 2, "perf_lost": 3} for r in reports)
    assert reports[-1]["partial_reasons"][0].startswith("5 events lost")


@pytest.mark.parametrize("frame_no", [0, 3, 5])
def test_replay_of_a_truncated_file(tmp_path: Path, frame_no: int) -> None:
    rec = Recorded(tmp_path, "6.12", "fentry")
    offsets = rec.write()
    broken = offsets[frame_no]
    data = rec.path.read_bytes()
    rec.path.write_bytes(data[:broken + FRAME.size + 5])
    reports, rc = replay(rec.path)
    assert isinstance(rc, AnontraceError)
    assert f"byte offset {broken}" in str(rc)
    ticks_before = sum(1 for i in range(frame_no) if i % 2 == 1)
    assert len(reports) == ticks_before + 1
    final = reports[-1]
    assert final["final"] and final["partial"]
    assert f"recording unreadable from byte offset {broken}" in final["partial_reasons"]
    # what came before is there: the events of every complete frame
    want = Tracker("fentry", rec.header["processes"])
    want.feed([e for b in rec.batches[:(frame_no + 1) // 2] for e in b])
    assert final["processes"] == want.report(0, 0, final=True)["processes"]


def test_replay_without_end(recorded: Recorded) -> None:
    recorded.write(end=False)
    reports, rc = replay(recorded.path)
    assert isinstance(rc, AnontraceError)
    assert "without an end marker" in str(rc)
    assert len(reports) == len(recorded.batches) + 1 and reports[-1]["final"]
    assert any("no end marker" in r for r in reports[-1]["partial_reasons"])
    # everything was applied (the tracepoint deriver flushed)
    assert reports[-1]["totals"] == {"anon_vmas": 0, "anon_vma_chains": 0,
                                     "orphaned_anon_vmas": 0}


def test_replay_of_a_bad_file_reports_nothing(tmp_path: Path) -> None:
    p = tmp_path / "bad.rec"
    p.write_bytes(b"garbage")
    reports, rc = replay(p)
    assert reports == []
    assert isinstance(rc, AnontraceError) and "byte offset 0" in str(rc)


def test_truncated_tracepoint_replay_flushes_the_deriver(tmp_path: Path) -> None:
    rec = Recorded(tmp_path, "6.18", "tracepoint")
    # end a frame right after an unlink-site chain free: its unlink group is open
    i = next(i for i, e in enumerate(rec.raw)
             if e.kind is Kind.AVC_FREE and e.site is Site.UNLINK)
    rec.batches = [rec.raw[:i + 1], rec.raw[i + 1:]]
    offsets = write(rec.path, rec.header, [(EVENTS, rec.batches[0]), (EVENTS, rec.batches[1])])
    data = rec.path.read_bytes()
    rec.path.write_bytes(data[:offsets[1] + 4])
    truncated, err = replay(rec.path)
    assert isinstance(err, AnontraceError)
    write(rec.path, rec.header, [(EVENTS, rec.batches[0])])   # the same, without END
    no_end, err2 = replay(rec.path)
    assert isinstance(err2, AnontraceError)
    # the flushed unlink dropped the VMA (and its chain entries)
    with_flush = no_end[-1]["totals"]["anon_vma_chains"]
    assert 0 < with_flush
    assert truncated[-1]["totals"] == no_end[-1]["totals"]
