"""A process's figures while its own mm is torn down at exit.

Before v6.16 ``do_exit()`` runs ``exit_mm()`` (which clears ``current->mm``
and, as the last user, tears the mm down VMA by VMA) before the
``sched_process_exit`` tracepoint; since v6.16 the tracepoint comes first.
On the older kernels a report made in between used to list the process
alive with a half-emptied mm, saying nothing was lost (issue 9's "fentry
undercount" in the 6.12 guest). The state must show it, alive or exited,
with its figures from just before the teardown.

The workload makes the window wide: one region split into 4096 VMAs that
share one anon_vma, so its teardown runs 4096 ``unlink_anon_vmas``; the
maps are read back to back while it exits.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tracer.kernel.bpf_session import TraceOptions, TraceSession
from tracer.kernel.kstate import P_EXITING, KernelState

pytestmark = pytest.mark.method_agnostic

PAGES = 4096
FIELDS = ("anon_vmas", "anon_vma_chains", "max_depth", "max_chain", "max_degree")


def _figures(row) -> tuple[int, ...]:
    return tuple(getattr(row.figures, f) for f in FIELDS)


def test_figures_hold_through_the_exit_teardown(splits_bin, backend) -> None:
    proc = subprocess.Popen([str(splits_bin), str(PAGES)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert b"mapped" in proc.stdout.readline()
        opts = TraceOptions(backend=backend, pids=(proc.pid,), events=False, state=True)
        with TraceSession(opts) as session:
            assert session.state_census() is None
            proc.stdin.write(b"s")
            proc.stdin.flush()
            assert b"split" in proc.stdout.readline()
            held_row = KernelState.decode(session.read_state(families=False)).processes[proc.pid]
            held = _figures(held_row)
            assert held_row.alive
            # One anon_vma for the split region; at least its PAGES chain entries.
            assert held[1] >= PAGES, held

            proc.stdin.close()
            reads = alive_reads = exiting_reads = 0
            exited = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                row = KernelState.decode(
                    session.read_state(families=False)).processes.get(proc.pid)
                reads += 1
                assert row is not None, "the process left the state before its exit was seen"
                if row.exited:
                    exited = row
                    break
                if row.alive:
                    alive_reads += 1
                    exiting_reads += bool(row.flags & P_EXITING)
                    # Never a half-emptied mm, whichever side of the teardown.
                    assert _figures(row) == held, (reads, _figures(row), held, hex(row.mm),
                                                   row.flags, row.exit_ns)
            assert exited is not None, "no exit seen in 120 s"
            assert _figures(exited) == held
            assert exited.figures.events["unlink_anon_vmas"] == \
                held_row.figures.events["unlink_anon_vmas"]
            print(f"\n{os.uname().release} {backend}: {reads} reads during the exit, "
                  f"{alive_reads} listed it alive, {exiting_reads} of them inside the "
                  "teardown window (flagged exiting)")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
