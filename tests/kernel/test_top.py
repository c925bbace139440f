"""`anontrace top` for real: the interactive screen driven in tmux (keys,
sort, families, exit on q and on Ctrl-C) and the plain mode into a pipe,
system-wide on this kernel, with a forkchain family deeper than anything
else on the host.

The family: 1 region, GENERATIONS generations, all alive, so its last
generation's depth is GENERATIONS + 1. The suite's deepest other workload
(test_serve's deepen) reaches 31, and real processes seldom pass 10: the
chain tops a depth ranking by its shape. For the screen it is built before
top starts, so the census reads it; for the pipe, after, so the traced
events build it (depths above 62 go through the histograms' top bin, whose
largest value is kept exact).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.kernel.stack import assert_released, held_prog_ids

# The screen is user-space logic over the state maps, which the other kernel
# tests cover on every kernel and method; three BCC compiles under QEMU TCG
# would cost minutes of the guests' CI budget.
pytestmark = pytest.mark.skipif(bool(os.environ.get("ANONTRACE_GUEST")),
                                reason="anontrace top runs on the host only (CI time budget "
                                       "in the QEMU guests)")

GENERATIONS = 80
DEPTH = GENERATIONS + 1
STARTUP_S = 90.0        # BCC's compile on a busy 2-CPU host, QEMU guests beside
ANONTRACE = [sys.executable, "-m", "tracer"]


class Chain:
    """forkchain 1 GENERATIONS touch, started paused."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary), "1", str(GENERATIONS), "touch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.gens: dict[int, int] = {}
        self._read()                        # {"event":"start",...}

    def _read(self, deadline: float | None = None) -> dict:
        out = self.proc.stdout
        assert out is not None
        left = 60.0 if deadline is None else deadline - time.monotonic()
        assert left > 0 and select.select([out], [], [], left)[0], \
            f"forkchain said nothing: {len(self.gens)} generations"
        return json.loads(out.readline())

    def release(self) -> dict[int, int]:
        """Fork the chain; generation -> pid once every generation is ready."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        deadline = time.monotonic() + 60
        ready = False
        while not ready or len(self.gens) < GENERATIONS + 1:
            msg = self._read(deadline)
            if msg["event"] == "gen":
                self.gens[msg["gen"]] = msg["pid"]
            elif msg["event"] == "ready":
                ready = True
        return self.gens

    def alive(self) -> str:
        """How many of its processes are still there (for failure messages)."""
        n = sum(Path(f"/proc/{pid}").exists() for pid in self.gens.values())
        return f"{n} of the chain's {len(self.gens)} processes alive"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()             # EOF: every generation exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def chain(forkchain_bin: Path) -> Iterator[Chain]:
    """A chain forked before top starts: top's census reads it."""
    c = Chain(forkchain_bin)
    try:
        c.release()
        yield c
    finally:
        c.close()


class Tmux:
    """One tmux server of our own (private socket) running one command."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing: scripts/install.sh --test installs it")
        self.sock = f"anontrace-test-{os.getpid()}"
        self.status = tmp / "status"
        self.stderr = tmp / "stderr"
        cmd = " ".join(_q(a) for a in ANONTRACE + args)
        shell = f"cd {_q(str(ROOT))} && {cmd} 2>{_q(str(self.stderr))}; " \
                f"echo $? >{_q(str(self.status))}"
        self._tmux("new-session", "-d", "-x", "200", "-y", "50", "-s", "top", shell)
        self.pane_pid = int(self._tmux("display-message", "-p", "-t", "top",
                                       "#{pane_pid}").strip())

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def wait_for(self, predicate, what: str, timeout: float = 20.0) -> str:
        """The screen once predicate(screen) holds."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            if not Path(f"/proc/{self.pane_pid}").exists():
                break
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{what}: not on screen within {timeout:g} s:\n{text}\n"
                             f"stderr: {self.read_stderr()}")

    def read_stderr(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def wait_gone(self, timeout: float = 30.0) -> int:
        """The command's exit status once the pane's process is gone."""
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{self.pane_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{self.pane_pid}").exists(), "the pane's process is still there"
        return int(self.status.read_text())

    def kill(self) -> None:
        """End our tmux server and remove its socket (tmux leaves it)."""
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True,
                       check=False)
        tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (tmpdir / self.sock).unlink(missing_ok=True)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _table(screen: str, head: str) -> list[list[str]]:
    """The rows under the column header starting with ``head``."""
    lines = screen.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [head])
    rows = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        rows.append(ln.split())
    return rows


def _rows(screen: str, head: str) -> list[list[str]]:
    """:func:`_table`, or no rows when the column header is not on screen."""
    try:
        return _table(screen, head)
    except StopIteration:
        return []


def _has_rows(head: str):
    def check(screen: str) -> bool:
        return bool(_rows(screen, head))
    return check


def _redrawn(header: str, head: str, rows_ok):
    """A screen with ``header`` whose table (rows under ``head``) passes
    ``rows_ok``. tmux can be read halfway through a redraw (the new header
    and first rows over the previous frame's lower rows), so what a key
    changed is waited for in the rows too; a table that never gets there
    fails the wait."""
    def check(screen: str) -> bool:
        rows = _rows(screen, head)
        return header in screen and bool(rows) and rows_ok(rows)
    return check


def _rmap_descending(rows: list[list[str]]) -> bool:
    widths = [(int(r[5]), int(r[6])) for r in rows]
    return widths == sorted(widths, reverse=True)


def _top_pid(pane_pid: int) -> int:
    kids = Path(f"/proc/{pane_pid}/task/{pane_pid}/children").read_text().split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_interactive_screen_keys_and_q(chain: Chain, backend: str, tmp_path: Path) -> None:
    tm = Tmux(tmp_path, ["top", "-s", "depth", "--backend", backend, "0.5"])
    try:
        screen = tm.wait_for(_has_rows("PID"), "the process table", STARTUP_S)
        head = screen.splitlines()[0]
        assert "view=processes sort=depth (descending)" in head, screen
        assert ("backend=" + backend) in head if backend != "auto" else "backend=" in head
        assert "lost=" in head
        totals = screen.splitlines()[1].split()
        assert [t.split("=")[0] for t in totals] == ["anon_vmas", "chains", "orphaned",
                                                     "processes"], screen
        assert int(totals[0].split("=")[1]) > 0 and int(totals[3].split("=")[1]) > 0
        top_pid = _top_pid(tm.pane_pid)
        ours = held_prog_ids(top_pid)
        assert ours, "top holds no BPF program"
        # The deepest generation first, with its exact depth.
        first = _table(screen, "PID")[0]
        assert (int(first[0]), first[1], int(first[4])) == \
            (chain.gens[GENERATIONS], "forkchain", DEPTH), f"{screen}\n{chain.alive()}"

        # The rmap census measured it: its VMA's anon_vma is in its own
        # interval tree (width at least 1).
        assert int(first[5]) >= 1 and int(first[6]) >= int(first[5]), screen
        # s: the next sort key, named in the header.
        tm.keys("s")
        tm.wait_for(_redrawn("sort=rmap (descending)", "PID", _rmap_descending),
                    "sort=rmap after s, its rows by rmap width, widest first")
        # <: back; r: reversed.
        tm.keys("<")
        tm.wait_for(lambda s: "sort=depth (descending)" in s, "sort=depth after <")
        tm.keys("r")
        tm.wait_for(_redrawn("sort=depth (ascending)", "PID",
                             lambda rows: int(rows[0][4]) < DEPTH),
                    "ascending after r, a shallower process first")
        tm.keys("r")
        # f: families; the chain's family (named after generation 0) first.
        tm.keys("f")
        screen = tm.wait_for(lambda s: "view=families sort=depth (descending)" in s
                             and _has_rows("FAMILY")(s), "the family table")
        fam = _table(screen, "FAMILY")[0]
        assert (int(fam[0]), fam[1], int(fam[4])) == (chain.gens[0], "forkchain", DEPTH), \
            f"{screen}\n{chain.alive()}"

        tm.keys("q")
        assert tm.wait_gone() == 0, tm.read_stderr()
        assert "Traceback" not in tm.read_stderr(), tm.read_stderr()
        assert_released(ours, "after top exited")
    finally:
        tm.kill()


def test_interactive_screen_ends_cleanly_on_ctrl_c(backend: str, tmp_path: Path) -> None:
    tm = Tmux(tmp_path, ["top", "--backend", backend, "--families", "-s", "depth",
                         "--no-rmap"])
    try:
        screen = tm.wait_for(_has_rows("FAMILY"), "the family table", STARTUP_S)
        assert "view=families sort=depth" in screen
        ours = held_prog_ids(_top_pid(tm.pane_pid))
        tm.keys("C-c")
        assert tm.wait_gone() == 0, tm.read_stderr()
        err = tm.read_stderr()
        assert "Traceback" not in err and "Detaching..." in err, err
        assert_released(ours, "after top exited")
    finally:
        tm.kill()


def test_plain_tables_into_a_pipe(forkchain_bin: Path, backend: str) -> None:
    """`top 1 2` into a pipe: two plain tables. The chain forks once top is
    tracing, so it is seen through the traced events, not the census."""
    chain = Chain(forkchain_bin)
    try:
        proc = subprocess.Popen(ANONTRACE + ["top", "-s", "depth", "-r", "3", "--no-rmap",
                                             "--backend", backend, "1", "2"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        banner = ""
        deadline = time.monotonic() + STARTUP_S
        while "Hit Ctrl-C to end." not in banner:
            assert time.monotonic() < deadline and proc.poll() is None, banner
            if select.select([proc.stderr], [], [], 1.0)[0]:
                banner += proc.stderr.readline()
        chain.release()
        out, err = proc.communicate(timeout=30)
        status = chain.alive()
    finally:
        chain.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "Output every 1 secs. Hit Ctrl-C to end." in banner
    assert "\x1b" not in out, "escape sequences in a pipe"
    tables = [t for t in out.strip().split("\n\n") if t.lstrip().startswith("PID")]
    assert len(tables) == 2, out
    assert out.count("sort=depth (descending)") == 2
    rows = [ln.split() for ln in tables[-1].splitlines()[1:]]
    assert len(rows) == 3, out
    # By the second table the chain is complete: its last generation leads.
    assert (int(rows[0][0]), int(rows[0][4])) == (chain.gens[GENERATIONS], DEPTH), \
        f"{out}\n{status}"
    assert rows[0][5:7] == ["-", "-"], "--no-rmap shows no widths"
