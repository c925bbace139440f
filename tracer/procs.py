"""Process lookups in /proc."""
from __future__ import annotations

from pathlib import Path

from tracer.errors import AnontraceError


def require_pids(pids: tuple[int, ...], proc: Path = Path("/proc")) -> None:
    """Fail clearly on PIDs that do not exist."""
    missing = [p for p in pids if p <= 0 or not (proc / str(p)).is_dir()]
    if missing:
        raise AnontraceError("no such process: " + ", ".join(map(str, missing)))
