"""Process lookups in /proc."""
from __future__ import annotations

import os
from pathlib import Path

from tracer.errors import AnontraceError


def require_pids(pids: tuple[int, ...], proc: Path = Path("/proc")) -> None:
    """Fail clearly on PIDs that do not exist."""
    missing = [p for p in pids if p <= 0 or not (proc / str(p)).is_dir()]
    if missing:
        raise AnontraceError("no such process: " + ", ".join(map(str, missing)))


def proc_comm(pid: int, proc: Path = Path("/proc")) -> str:
    """A process's comm, '' if it is gone."""
    try:
        return (proc / str(pid) / "comm").read_text().rstrip("\n")
    except OSError:
        return ""


def proc_ppid(pid: int, proc: Path = Path("/proc")) -> int:
    """A process's parent pid from /proc/PID/stat, 0 if unknown.

    The comm field may hold spaces and parentheses, so parse after the last ')'.
    """
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def proc_cgroup(pid: int, proc: Path = Path("/proc")) -> str | None:
    """A process's cgroup v2 path ("0::/path" line of /proc/PID/cgroup), None
    if it is gone or only in v1 hierarchies."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def busy_cpu_seconds(proc: Path = Path("/proc")) -> float:
    """CPU seconds all CPUs spent neither idle nor in iowait since boot
    (``/proc/stat``): what the whole machine was doing, for comparing a
    measured run with everything else that ran beside it."""
    with open(proc / "stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
