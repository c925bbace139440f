"""serve's log lines (logfmt and JSON, hostile values quoted) and the
rate limit on recurring ones; systemd notification over a real socket."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
from pathlib import Path

import pytest

from exporters.logs import RateLimited, log, setup_logging
from exporters.privileges import capget, sd_notify


def _lines(fmt: str, *calls: tuple[int, str, dict[str, object]]) -> list[str]:
    out = io.StringIO()
    setup_logging("debug", fmt, out)
    for level, msg, fields in calls:
        log(level, msg, **fields)
    return out.getvalue().splitlines()


def test_logfmt_quotes_what_needs_it() -> None:
    [line] = _lines("logfmt", (logging.WARNING, "probe not attached",
                               {"probe": "unlink", "reason": 'a "b"\nc', "seconds": 1.25,
                                "ok": True, "comm": "x=y"}))
    assert re.fullmatch(r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warn '
                        r'msg="probe not attached" probe=unlink reason="a \\"b\\"\\nc" '
                        r'seconds=1.25 ok=true comm="x=y"', line), line


def test_json_lines_parse() -> None:
    [line] = _lines("json", (logging.INFO, "census done", {"processes": 21, "seconds": 0.032}))
    doc = json.loads(line)
    assert doc["level"] == "info" and doc["msg"] == "census done"
    assert doc["processes"] == 21 and doc["ts"].endswith("Z")


def test_level_filters_and_bad_values_are_refused() -> None:
    out = io.StringIO()
    setup_logging("warn", "logfmt", out)
    log(logging.INFO, "quiet")
    log(logging.ERROR, "loud")
    assert "quiet" not in out.getvalue() and "level=error" in out.getvalue()
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("verbose", "logfmt")
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging("info", "xml")


def test_rate_limited_accumulates_between_lines() -> None:
    out = io.StringIO()
    setup_logging("info", "logfmt", out)
    now = [0.0]
    limited = RateLimited("lost", interval=60, clock=lambda: now[0])
    limited.add(output=3, map_full_vmas=0)
    assert limited.flush()                       # the first one goes out at once
    limited.add(output=2)
    now[0] = 30
    assert not limited.flush()                   # within the minute: held
    limited.add(output=5, map_full_vmas=1)
    now[0] = 61
    assert limited.flush()
    assert not limited.flush()                   # nothing new
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("output=3") and lines[1].endswith("output=7 map_full_vmas=1")


def test_sd_notify_path_and_abstract_sockets(tmp_path: Path) -> None:
    assert sd_notify("READY=1", env={}) is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert sd_notify("READY=1", env={"NOTIFY_SOCKET": str(path)})
        assert s.recv(64) == b"READY=1"
    name = f"anontrace-unit-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert sd_notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(64) == b"STOPPING=1"


def test_capget_reads_this_process() -> None:
    status = Path("/proc/self/status").read_text()
    eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    assert capget().effective == eff
