"""tracer.pipeline.stream: the one path from wire records to model events."""
from __future__ import annotations

from tests.unit.model_streams import model_stream, raw_events
from tracer.format.events import WIRE, Kind, decode, pack_record
from tracer.pipeline.stream import EventStream


def _wire(events) -> list[bytes]:
    out = []
    for e in events:
        values = {n: getattr(e, n) for n in e.__slots__}
        values["kind"], values["site"] = int(e.kind), int(e.site)
        values["comm"] = e.comm.encode()
        out.append(pack_record(**values))
    return out


def test_tracepoint_records_become_the_model_stream() -> None:
    """The recorded 6.18 tracepoint stream, re-encoded and fed in batches of
    7 records, comes out as the events a replay feeds the model."""
    raw = _wire(raw_events("6.18", "tracepoint"))
    stream = EventStream(derive=True, keep_objects=True)
    recorded: list[bytes] = []
    out = []
    for i in range(0, len(raw), 7):
        out += stream.feed_records(raw[i:i + 7], recorded.append)
    out += stream.flush()
    assert [e.to_dict() for e in out] == [e.to_dict() for e in model_stream("6.18", "tracepoint")]
    assert stream.records == len(raw) and stream.decode_errors == 0
    assert b"".join(recorded) == b"".join(raw)


def test_undecodable_records_are_counted_and_skipped() -> None:
    good = pack_record(kind=int(Kind.SYNC), tgid=1)
    bad = pack_record(kind=99, tgid=2)
    stream = EventStream(derive=False)
    out = stream.feed_records([good, bad, good])
    assert [e.tgid for e in out] == [1, 1]
    assert stream.decode_errors == 1 and stream.records == 3
    assert decode(good).kind is Kind.SYNC and len(good) == WIRE.size
    assert stream.flush() == []
