"""Interval reports of an ad-hoc run (-p PID, -- COMMAND) read from the
state maps (:mod:`tracer.kernel.kstate`): the same JSON object as
:func:`tracer.commands.report.build_report` makes from the Python model.

Liveness is the kernel's word, not the event stream's: a process the state
still calls alive but that /proc no longer has (its exit was not seen: a
full map) counts as exited, so a run always ends when its family is gone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tracer.kernel.kstate import P_UNSEEN, PREEXISTING_REASON, KernelState, ProcRow, StateDump
from tracer.kernel.procs import proc_ppid
from tracer.model.types import CENSUS_MISSING_REASON, PROBE_NAMES, ProcessFigures

_NO_FIGURES = ProcessFigures(0, 0, 0, 0, 0, dict.fromkeys(PROBE_NAMES, 0))


def proc_gone(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` has exited as far as the kernel says: no /proc entry,
    or a zombie (its exit has run; only the reaping is left)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return True
    try:
        return stat[stat.rindex(")") + 2] in "ZX"
    except (ValueError, IndexError):
        return False


class StateReporter:
    """Turns successive state dumps into reports; keeps the exited processes
    (which the caller then deletes from the maps) for the final report."""

    def __init__(self, backend: str, processes: list[dict[str, Any]],
                 census_missing: str | None = None, proc: Path = Path("/proc")) -> None:
        self.backend = backend
        # Declared processes: the COMMAND (traced from its exec, so not
        # "unseen") or -p PIDs (covered by the census, or partial).
        self._declared = {p["pid"]: p for p in processes}
        self._census_missing = census_missing
        self._proc = proc
        self._retired: dict[int, ProcRow] = {}
        self._ppids: dict[int, int] = {}
        self._exit_unseen: set[int] = set()
        self._suspects: set[int] = set()
        self.alive: list[int] = []

    def _ppid(self, row: ProcRow) -> int:
        if row.ppid:
            return row.ppid
        declared = self._declared.get(row.pid)
        if declared is not None and declared.get("ppid"):
            return int(declared["ppid"])
        ppid = self._ppids.get(row.pid)
        if ppid is None:
            ppid = self._ppids[row.pid] = proc_ppid(row.pid, self._proc)
        return ppid

    def report(self, dump: StateDump, when: float, lost: int, final: bool
               ) -> tuple[dict[str, Any], list[int]]:
        """One report, and the pids of exited processes to delete from the
        maps now that they are reported."""
        state = KernelState.decode(dump)
        live: list[ProcRow] = []
        gone: list[ProcRow] = []
        rows_now = dict(state.processes)
        for pid, d in self._declared.items():
            # Declared but not in the state yet (no event, no census).
            if pid not in rows_now and pid not in self._retired:
                alive = not proc_gone(pid, self._proc)
                rows_now[pid] = ProcRow(pid, int(d.get("ppid", 0)), str(d.get("comm", "")),
                                        alive, P_UNSEEN if d.get("preexisting") else 0, 0,
                                        0 if alive else 1, _NO_FIGURES)
        for row in rows_now.values():
            if row.exited:
                gone.append(row)
            elif not row.alive:
                continue    # being filled in by a program right now
            elif not proc_gone(row.pid, self._proc):
                live.append(row)
                self._suspects.discard(row.pid)
            elif row.pid in self._suspects or final:
                # Alive in two dumps in a row but gone from /proc: its exit
                # was missed. Its figures as they are now.
                self._exit_unseen.add(row.pid)
                gone.append(row)
            else:
                # It may have exited between the dump and the look at /proc:
                # the next dump will say.
                self._suspects.add(row.pid)
        for row in gone:
            self._retired[row.pid] = row
        self.alive = [r.pid for r in live]
        shown = live + (list(self._retired.values()) if final else gone)
        rows = []
        for r in sorted(shown, key=lambda r: (r.pid, r.alive)):
            alive = r.alive and r.pid not in self._exit_unseen
            f = r.figures
            rows.append({
                "pid": r.pid, "ppid": self._ppid(r), "comm": r.comm, "alive": alive,
                "anon_vmas": f.anon_vmas, "anon_vma_chains": f.anon_vma_chains,
                "max_depth": f.max_depth, "max_degree": f.max_degree, "max_chain": f.max_chain,
                "events": f.events,
            })
        lost_total = lost + state.globals.map_full_total
        fresh = {pid for pid, p in self._declared.items() if not p.get("preexisting")}
        reasons = [r for r in state.partial_reasons(lost) if r != PREEXISTING_REASON]
        if any(p.unseen and p.pid not in fresh for p in rows_now.values()):
            reasons.append(PREEXISTING_REASON)
        if self._census_missing:
            reasons.append(f"{CENSUS_MISSING_REASON}: {self._census_missing}")
        if self._exit_unseen:
            reasons.append(f"{len(self._exit_unseen)} processes exited without their exit "
                           "being seen (figures as of when their exit was noticed)")
        report = {
            "time": round(when, 6),
            "backend": self.backend,
            "lost_events": lost_total,
            "partial": bool(reasons),
            "partial_reasons": sorted(set(reasons), key=reasons.index),
            "processes": rows,
            "totals": state.totals(),
            "final": final,
        }
        return report, [r.pid for r in gone]
