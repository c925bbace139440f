"""Shared fixtures: the C workloads, built once per session, and the
per-kernel summary line the CI log is read for."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "tests" / "workloads"
BUILD = ROOT / "build" / "workloads"


def build_workload(name: str, src_dir: Path = WORKLOADS) -> Path:
    """Compile <src_dir>/<name>.c (tests/workloads by default; bench/workloads
    for the benchmarks' fork loop) once and return the binary."""
    src = src_dir / f"{name}.c"
    out = BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed: two test shards may build the same
        # workload at once, and one may already be running the old binary.
        tmp = out.with_name(f".{name}.{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp), str(src)],
                       check=True)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def forkchain_bin() -> Path:
    return build_workload("forkchain")


def test_backend() -> str:
    """The backend kernel tests force: ANONTRACE_TEST_BACKEND (default auto)."""
    return os.environ.get("ANONTRACE_TEST_BACKEND", "auto")


@pytest.fixture(scope="session")
def backend() -> str:
    return test_backend()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print `kernel <release> <method>: N passed, M failed` for kernel tests
    (and `, X xfailed, Y xpassed` when there are any)."""
    stats = terminalreporter.stats
    def kernel_reports(key: str) -> int:
        return sum(1 for r in stats.get(key, [])
                   if getattr(r, "when", "call") in ("call", "setup")
                   and "kernel" in getattr(r, "keywords", {})
                   and (key != "failed" or r.when in ("call", "setup"))
                   and (key != "passed" or r.when == "call"))
    passed, failed = kernel_reports("passed"), kernel_reports("failed") + kernel_reports("error")
    # A pass whose tests all ended as expected failures (a loss the run
    # reported, on a kernel that preempts fentry programs) still gets its
    # line: a pass with no line looked like one that never ran.
    xfailed, xpassed = kernel_reports("xfailed"), kernel_reports("xpassed")
    if passed or failed or xfailed or xpassed:
        shard = test_shard()
        part = f" [shard {shard[0]}/{shard[1]}]" if shard else ""
        extra = f", {xfailed} xfailed, {xpassed} xpassed" if xfailed or xpassed else ""
        terminalreporter.write_line(f"kernel {os.uname().release} {test_backend()}{part}: "
                                    f"{passed} passed, {failed} failed{extra}")


def test_shard() -> tuple[int, int] | None:
    """(i, n) from ANONTRACE_SHARD="i/n": this pytest runs the i-th of n
    concurrent shards of the kernel tests (scripts/test.sh, in the guests)."""
    raw = os.environ.get("ANONTRACE_SHARD")
    if not raw:
        return None
    i, _, n = raw.partition("/")
    shard = (int(i), int(n))
    if not 1 <= shard[0] <= shard[1]:
        raise ValueError(f"ANONTRACE_SHARD={raw!r}: want i/n with 1 <= i <= n")
    return shard


@pytest.fixture(scope="session")
def reproducer_bin() -> Path:
    return build_workload("reproducer")


@pytest.fixture(scope="session")
def splits_bin() -> Path:
    return build_workload("splits")
