"""`serve --log.level/--log.format`: timestamped lines on stderr, in logfmt
(the Prometheus exporters' default, and journald-friendly) or JSON.

Every line has ``ts`` (UTC, milliseconds), ``level`` and ``msg``; structured
fields come from ``extra={"fields": {...}}``::

    ts=2026-12-03T00:31:02.123Z level=info msg="programs attached" backend=tracepoint seconds=2.61

:class:`RateLimited` keeps recurring conditions (losses, full maps) to one
line per interval, with the counts accumulated since the last one.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER = "anontrace"
LEVELS = ("debug", "info", "warn", "error")
FORMATS = ("logfmt", "json")
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "error", logging.CRITICAL: "error"}


def _ts(record: logging.LogRecord) -> str:
    t = datetime.fromtimestamp(record.created, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": _ts(record), "level": _LEVEL_NAMES.get(record.levelno, "info"),
                           "msg": record.getMessage()}
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        out.update(extra)
    if record.exc_info:
        out["err"] = logging.Formatter().formatException(record.exc_info)
    return out


def _logfmt_value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "NaN"
    text = str(value) if not isinstance(value, bool) else str(value).lower()
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    # Quoted, with escapes: a process name may hold anything.
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """key=value pairs; values with spaces, quotes or control bytes quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "logfmt",
                  stream: TextIO | None = None) -> logging.Logger:
    """Configure and return the ``anontrace`` logger (replacing earlier
    handlers, so that calling it twice does not double lines)."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(FORMATS)}")
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter() if fmt == "logfmt" else JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel({"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                     "error": logging.ERROR}[level])
    logger.propagate = False
    return logger


def log(level: int, msg: str, **fields: Any) -> None:
    """One line on the ``anontrace`` logger with structured fields."""
    logging.getLogger(LOGGER).log(level, msg, extra={"fields": fields})


class RateLimited:
    """At most one line per ``interval`` seconds for a recurring condition:
    :meth:`add` accumulates counts, :meth:`flush` logs them when due."""

    def __init__(self, msg: str, interval: float = 60.0, level: int = logging.WARNING,
                 clock: Any = time.monotonic) -> None:
        self.msg, self.interval, self.level, self.clock = msg, interval, level, clock
        self.pending: dict[str, int] = {}
        self._last = -float("inf")

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            if v:
                self.pending[k] = self.pending.get(k, 0) + v

    def flush(self, force: bool = False) -> bool:
        """Log the accumulated counts if any and if due; True when logged."""
        now = self.clock()
        if not self.pending or (not force and now - self._last < self.interval):
            return False
        log(self.level, self.msg, **self.pending)
        self.pending = {}
        self._last = now
        return True
