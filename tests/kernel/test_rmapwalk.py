"""Real rmap walks of a page whose false aliasing is known by construction
(tests/workloads/falias.c), measured by bpf_programs/rmapwalk.bpf.c.

falias maps one anonymous page (root anon_vma A), forks CHILDREN children
and lets every process but the KEEPER copy-on-write the page away: A's
interval tree holds CHILDREN+1 VMAs covering the page, one of which maps it.
Soft-offlining the page (MADV_SOFT_OFFLINE) makes the kernel migrate it,
with two rmap walks of A: try_to_migrate(), which stops once the page is no
longer mapped, and remove_migration_ptes(), which visits every VMA. The
tree returns VMAs in the order they were linked (parent, then the children
in fork order), so the first walk visits CHILDREN+1 VMAs when the keeper is
the last child, and 1 when the keeper is the parent.

Soft offline takes a page out of use until reboot: the workload part runs in
the disposable QEMU guests only. The host (fentry and kprobes refused)
checks the one-line refusal instead.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import build_workload
from tracer.commands.cli import main
from tracer.commands.rmapwalk_report import WalkRun, format_table, measure, to_json
from tracer.errors import AnontraceError
from tracer.format.rmapwalk import NBINS, ratio_bin
from tracer.kernel.rmapwalk import RmapWalkSession

CHILDREN = 15                 # A's tree: 16 VMAs, the lower edge of bin "16-31"
GUEST = bool(os.environ.get("ANONTRACE_GUEST"))
REFUSED = "neither fentry nor kprobes"


def _method(backend: str) -> str:
    if backend == "tracepoint":
        pytest.skip("rmap walks are measured with fentry or kprobes: the tracepoint pass has "
                    "no method to force")
    return backend


@dataclass
class Falias:
    """One falias process family, started and waiting for its command."""

    keeper: int
    proc: subprocess.Popen[bytes]
    pids: dict[int, int] = field(default_factory=dict)      # idx -> pid
    pfns: dict[int, int] = field(default_factory=dict)      # idx -> pfn after the COWs
    offlined: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, binary: Path, keeper: int) -> Falias:
        f = cls(keeper, subprocess.Popen([str(binary), str(CHILDREN), str(keeper)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         bufsize=0))
        while True:
            msg = f._read()
            if msg["event"] == "proc":
                f.pids[msg["idx"]], f.pfns[msg["idx"]] = msg["pid"], msg["pfn"]
            elif msg["event"] == "ready":
                return f

    def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("falias said nothing")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"falias exited early (status {self.proc.wait()})")
        return json.loads(line)

    def offline(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"o")
        self.offlined = self._read()
        assert self.offlined["event"] == "offlined", self.offlined

    def finish(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@dataclass
class Measured:
    run: WalkRun
    last: Falias     # the keeper is the last child
    first: Falias    # the keeper is the parent


@dataclass
class Outcome:
    """One attach per module (BCC compiles slowly under TCG): the
    measurement (guests), or why the kernel refused."""

    refusal: str | None = None
    measured: Measured | None = None


@pytest.fixture(scope="module")
def outcome(backend: str) -> Outcome:
    method = _method(backend)
    if not GUEST:
        try:
            with RmapWalkSession(method):
                return Outcome()
        except AnontraceError as exc:
            return Outcome(refusal=str(exc))
    binary = build_workload("falias")
    families = [Falias.start(binary, CHILDREN), Falias.start(binary, 0)]
    try:
        run = measure(0.1, method, on_start=lambda m: [f.offline() for f in families])
    except AnontraceError as exc:
        return Outcome(refusal=str(exc))
    finally:
        for f in families:
            f.finish()
    return Outcome(measured=Measured(run, *families))


@pytest.fixture(scope="module")
def measured(outcome: Outcome) -> Measured:
    if outcome.refusal is not None and REFUSED in outcome.refusal:
        pytest.skip(f"fentry and kprobes refused: {outcome.refusal}")
    if outcome.refusal is not None:
        pytest.fail(outcome.refusal)
    if outcome.measured is None:
        pytest.skip("soft-offlines two pages (out of use until reboot): runs in the "
                    "disposable QEMU guests only (ANONTRACE_GUEST=1)")
    return outcome.measured


def _root_of(m: Measured, family: Falias) -> Any:
    parent = family.pids[0]
    mine = [s for s in m.run.reading.roots if s.owner_pid == parent]
    assert len(mine) == 1, (f"expected one root owned by falias {parent}",
                            [s.to_dict() for s in m.run.reading.roots if s.walks])
    return mine[0]


def _check_migrated(family: Falias) -> None:
    off = family.offlined
    if off["rc"] != 0:
        pytest.fail(f"MADV_SOFT_OFFLINE failed (errno {off['errno']}; EINVAL: no "
                    "CONFIG_MEMORY_FAILURE): no rmap walk was forced")
    keeper = family.keeper
    # The keeper still had the original page, every other process a copy.
    others = {family.pfns[i] for i in family.pfns if i != keeper}
    assert off["pfn_before"] == family.pfns[keeper] and off["pfn_before"] not in others
    assert off["pfn_after"] != off["pfn_before"] and off["intact"] == 1, off


def _hist(walks_by_visited: dict[int, int]) -> list[int]:
    """The histogram of walks with one mapping VMA, by VMAs visited."""
    out = [0] * NBINS
    for visited, n in walks_by_visited.items():
        b = ratio_bin(visited, 1)
        assert b is not None
        out[b] += n
    return out


def test_every_vma_visited_when_the_keeper_is_last(measured: Measured) -> None:
    _check_migrated(measured.last)
    s = _root_of(measured, measured.last)
    vmas = CHILDREN + 1
    # Both walks visit the whole tree: the only mapping VMA comes last.
    assert (s.walks, s.visited, s.mapped) == (2, 2 * vmas, 2), s
    assert list(s.histogram) == _hist({vmas: 2}), s
    assert (s.unmapped_walks, s.unmeasured_walks, s.below_one_walks) == (0, 0, 0), s
    assert s.mean_ratio == vmas


def test_unmapping_walk_stops_at_the_keeper_when_it_is_first(measured: Measured) -> None:
    _check_migrated(measured.first)
    s = _root_of(measured, measured.first)
    vmas = CHILDREN + 1
    # try_to_migrate() stops after the parent's VMA, the first in the tree
    # and the only one mapping the page; remove_migration_ptes() visits all.
    assert (s.walks, s.visited, s.mapped) == (2, 1 + vmas, 2), s
    assert list(s.histogram) == _hist({1: 1, vmas: 1}), s
    assert (s.unmapped_walks, s.unmeasured_walks, s.below_one_walks) == (0, 0, 0), s


def test_report_names_the_owner(measured: Measured) -> None:
    for family in (measured.last, measured.first):
        s = _root_of(measured, family)
        assert s.owner_comm == "falias"
        row = next(r for r in to_json(measured.run, 0)["roots"] if r["root"] == f"{s.root:#x}")
        assert row["owner_pid"] == family.pids[0] and row["visited"] == s.visited
        assert f"{s.root:x} {family.pids[0]} falias" in " ".join(
            format_table(measured.run, 0).split())
    assert measured.run.reading.lost == {"roots_full": 0, "walkers_full": 0}


def test_refusal_is_one_clear_line(backend: str, outcome: Outcome) -> None:
    refusal = outcome.refusal
    if refusal is None:
        pytest.skip("fentry or kprobes attach on this kernel: no refusal to check")
    if backend != "auto":
        pytest.fail(f"the {backend} pass forces a method this kernel refuses: {refusal}")
    assert refusal.startswith(f"cannot measure rmap walks: {REFUSED} can attach"), refusal
    assert "fentry: " in refusal and "kprobe: " in refusal and "\n" not in refusal
    result = CliRunner().invoke(main, ["rmapwalk", "-d", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal}"
