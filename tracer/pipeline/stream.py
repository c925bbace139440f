"""The one path from wire records to the events the model takes.

Live runs (TraceSession.poll), replays (run_replay) and serve's event mode
all go through an :class:`EventStream`: the raw records are handed to the
recorder first (``anontrace record``), decoded (a record that cannot be
decoded is counted and skipped, the rest keep their order), and on the
tracepoint backend grouped into the logical probes (tracer.pipeline.derive).
"""
from __future__ import annotations

from collections.abc import Callable

from tracer.format.events import Event, decode_records
from tracer.pipeline.derive import Deriver


class EventStream:
    """Decode, then derive when the backend needs it; keeps the counts."""

    def __init__(self, derive: bool, keep_objects: bool = False) -> None:
        """``derive``: the records come from the tracepoint backend (kmem
        events to group); ``keep_objects``: keep the anon_vma and chain-entry
        events once grouped (``--raw``)."""
        self._deriver = Deriver(keep_objects=keep_objects) if derive else None
        self.records = 0         # wire records seen (before derivation)
        self.decode_errors = 0   # records that could not be decoded

    @property
    def derives(self) -> bool:
        return self._deriver is not None

    def feed_records(self, raw: list[bytes],
                     recorder: Callable[[bytes], None] | None = None) -> list[Event]:
        """A batch of wire records as the kernel delivered them."""
        if not raw:
            return []
        self.records += len(raw)
        blob = b"".join(raw)
        if recorder is not None:
            recorder(blob)
        events, errors = decode_records(raw, blob)
        self.decode_errors += errors
        return self.feed_events(events)

    def feed_events(self, events: list[Event]) -> list[Event]:
        """Events already decoded (a recording's frame)."""
        return self._deriver.feed(events) if self._deriver is not None else events

    def flush(self) -> list[Event]:
        """What derivation still holds back (at the end of a run)."""
        return self._deriver.flush() if self._deriver is not None else []
