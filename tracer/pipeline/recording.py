"""Recordings: the raw event stream of a run, replayable to the same reports.

Layout (little-endian)::

    magic    b"ANONTRACE\\x00REC"  (13 bytes)
    version  u8                   (FORMAT_VERSION)
    hdr_len  u32, then hdr_len bytes of JSON: kernel release, backend,
             transport, struct offsets, probes, traced processes
    frames   u8 type, 3 zero bytes, u32 length, payload:
             EVENTS  raw wire records (tracer.format.events.WIRE), as the kernel sent them
             TICK    JSON {"time": wall clock, "lost": {...}}: a report was made here
             END     JSON {"time", "lost", "exit_status"}: the run ended cleanly

Events are stored before the tracepoint backend's derivation, so a replay
runs exactly the code a live run ran.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tracer.format.events import WIRE, Event, decode_many

MAGIC = b"ANONTRACE\x00REC"
FORMAT_VERSION = 1
FRAME = struct.Struct("<B3xI")
EVENTS, TICK, END = 1, 2, 3
MAX_FRAME = 64 << 20


class RecordingError(Exception):
    """A recording is unreadable from ``offset`` on."""

    def __init__(self, path: str, offset: int, message: str) -> None:
        super().__init__(f"{path}: {message} at byte offset {offset}")
        self.offset = offset


@dataclass
class Frame:
    kind: int
    offset: int
    events: list[Event] | None = None
    meta: dict[str, Any] | None = None


class RecordingWriter:
    """Append frames to a new recording file."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.events_written = 0
        self._f: BinaryIO = open(path, "wb")
        hdr = json.dumps(header, sort_keys=True).encode()
        self._f.write(MAGIC + bytes([FORMAT_VERSION]) + struct.pack("<I", len(hdr)) + hdr)

    def events(self, raw: bytes) -> None:
        if raw:
            self._f.write(FRAME.pack(EVENTS, len(raw)) + raw)
            self.events_written += len(raw) // WIRE.size

    def tick(self, meta: dict[str, Any]) -> None:
        self._meta(TICK, meta)

    def end(self, meta: dict[str, Any]) -> None:
        self._meta(END, meta)

    def _meta(self, kind: int, meta: dict[str, Any]) -> None:
        payload = json.dumps(meta, sort_keys=True).encode()
        self._f.write(FRAME.pack(kind, len(payload)) + payload)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class RecordingReader:
    """Read a recording's header, then iterate its frames.

    Iteration raises :class:`RecordingError` at the first corrupt or
    truncated frame, after yielding every good frame before it.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self._data = Path(path).read_bytes()
        except OSError as exc:
            raise RecordingError(self.path, 0, f"cannot read: {exc.strerror}") from exc
        data = self._data
        if not data.startswith(MAGIC):
            raise RecordingError(self.path, 0, "not an anontrace recording (bad magic)")
        pos = len(MAGIC)
        if len(data) < pos + 5:
            raise RecordingError(self.path, pos, "truncated header")
        if data[pos] != FORMAT_VERSION:
            raise RecordingError(self.path, pos, f"unsupported format version {data[pos]}")
        (hlen,) = struct.unpack_from("<I", data, pos + 1)
        pos += 5
        if hlen > MAX_FRAME or pos + hlen > len(data):
            raise RecordingError(self.path, pos, "truncated header")
        try:
            self.header: dict[str, Any] = json.loads(data[pos:pos + hlen])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordingError(self.path, pos, f"corrupt header ({exc})") from exc
        self._start = pos + hlen

    def frames(self) -> Iterator[Frame]:
        data, pos = self._data, self._start
        view = memoryview(data)
        while pos < len(data):
            if pos + FRAME.size > len(data):
                raise RecordingError(self.path, pos, "truncated frame header")
            kind, length = FRAME.unpack_from(data, pos)
            body = pos + FRAME.size
            if kind not in (EVENTS, TICK, END) or length > MAX_FRAME:
                raise RecordingError(self.path, pos, f"corrupt frame (type {kind})")
            if body + length > len(data):
                raise RecordingError(self.path, pos, "truncated frame")
            if kind == EVENTS:
                if length % WIRE.size:
                    raise RecordingError(self.path, pos, "event frame of a partial record")
                try:
                    events = decode_many(view[body:body + length])
                except ValueError as exc:
                    raise RecordingError(self.path, pos, f"corrupt event ({exc})") from exc
                yield Frame(kind, pos, events=events)
            else:
                try:
                    meta = json.loads(data[body:body + length])
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RecordingError(self.path, pos, f"corrupt frame ({exc})") from exc
                yield Frame(kind, pos, meta=meta)
            pos = body + length
