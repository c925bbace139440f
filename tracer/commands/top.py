"""`anontrace top`: what the screen shows, computed from successive reads of
the state maps (:class:`tracer.kernel.kstate.KernelState`).

Pure Python (no BPF, no terminal): :class:`TopTracker` turns each read into
a :class:`Frame` (header figures, one line per process and per family, with
the growth of anon_vmas per second since the previous read), and
:class:`View` holds what the user chose (processes or families, the sort
key, the order) and ranks a frame's lines for display.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tracer.errors import AnontraceError
from tracer.format.events import safe_comm
from tracer.kernel.kstate import KernelState

#: Process sort keys, in the order `s` cycles through them.
SORT_KEYS = ("anon_vmas", "chains", "depth", "rmap", "growth")
#: Family sort keys (families have no chains, but orphans).
FAMILY_SORT_KEYS = ("anon_vmas", "orphaned", "depth", "rmap", "growth")
PROCESSES, FAMILIES = "processes", "families"

#: pid -> (widest rmap walk of one of its anon_vmas, sum over them), from
#: the rmap census (tracer.model.rmap); None when it is not available.
Widths = dict[int, tuple[int, int]]
WidthsProvider = Callable[[], Widths | None]


@dataclass(frozen=True)
class ProcLine:
    """One live process. ``growth`` is anon_vmas per second since the
    previous read (None on the first); ``rmap_*`` are None without widths."""

    pid: int
    comm: str
    anon_vmas: int
    chains: int
    depth: int
    rmap_max: int | None
    rmap_total: int | None
    growth: float | None


@dataclass(frozen=True)
class FamilyLine:
    """One family: the anon_vmas whose roots process ``pid`` created."""

    pid: int
    comm: str
    anon_vmas: int
    orphaned: int
    depth: int
    growth: float | None
    # Widest and summed rmap width of the anon_vmas under its roots (None
    # without widths; a family whose root no live VMA points at has 0).
    rmap_max: int | None = None
    rmap_total: int | None = None


@dataclass(frozen=True)
class Header:
    """The figures above the table."""

    time: float                 # wall clock of the read (seconds since the epoch)
    backend: str
    anon_vmas: int
    chains: int
    orphaned: int
    processes: int              # tracked processes alive
    lost: int                   # events lost, inserts refused included
    map_full: dict[str, int] = field(default_factory=dict)   # refused inserts per map
    census_missing: str | None = None
    rmap_note: str | None = None      # why rmap widths are missing or undercount

    @property
    def refused(self) -> int:
        """Inserts refused by full maps, all maps together."""
        return sum(self.map_full.values())


@dataclass(frozen=True)
class Frame:
    """One read of the state: the header and every line, unranked."""

    header: Header
    processes: list[ProcLine]
    families: list[FamilyLine]


def _rate(now: int, before: int | None, dt: float | None) -> float | None:
    if dt is None or dt <= 0:
        return None
    # A pid the previous read did not have came to be since: from nothing.
    return (now - (before or 0)) / dt


class TopTracker:
    """Successive state reads -> frames, keeping what growth needs (the
    previous read's anon_vmas per process and per family) and the names of
    family creators that have exited since."""

    def __init__(self, backend: str, census_missing: str | None = None) -> None:
        self.backend = backend
        self.census_missing = census_missing
        self._prev_at: float | None = None
        self._prev_procs: dict[int, int] = {}
        self._prev_fams: dict[int, int] = {}
        self._comms: dict[int, str] = {}

    def update(self, state: KernelState, now: float, when: float, lost: int,
               widths: Widths | None = None, rmap_note: str | None = None,
               family_widths: Widths | None = None) -> Frame:
        """The frame of ``state`` read at ``now`` (monotonic seconds; growth
        is per second of it) and ``when`` (wall clock, shown). ``lost``:
        events lost by the session (the state's refused inserts are added).
        ``widths``: rmap widths by pid (a process the census attributed no
        anon_vma to has 0); None shows none. ``family_widths`` the same by
        family (the process that created the roots)."""
        dt = None if self._prev_at is None else now - self._prev_at
        live = [r for r in state.processes.values() if r.alive]
        for r in live:
            self._comms[r.pid] = r.comm
        procs = []
        for r in live:
            f = r.figures
            if not f.anon_vmas:
                continue    # nothing anonymous (yet): nothing to rank
            w = widths.get(r.pid, (0, 0)) if widths is not None else None
            procs.append(ProcLine(
                r.pid, safe_comm(r.comm), f.anon_vmas, f.anon_vma_chains, f.max_depth,
                None if w is None else w[0], None if w is None else w[1],
                _rate(f.anon_vmas, self._prev_procs.get(r.pid), dt)))
        fams = []
        for fam in state.families.values():
            if not (fam.pid and fam.anon_vmas):
                continue
            fw = family_widths.get(fam.pid, (0, 0)) if family_widths is not None else None
            fams.append(FamilyLine(fam.pid, safe_comm(self._comms.get(fam.pid, "")),
                                   fam.anon_vmas, fam.orphaned_anon_vmas, fam.max_depth,
                                   _rate(fam.anon_vmas, self._prev_fams.get(fam.pid), dt),
                                   None if fw is None else fw[0],
                                   None if fw is None else fw[1]))
        g = state.globals
        header = Header(time=when, backend=self.backend, anon_vmas=g.anon_vmas,
                        chains=g.anon_vma_chains, orphaned=g.orphaned_anon_vmas,
                        processes=len(live), lost=lost + g.map_full_total,
                        map_full={k: v for k, v in g.map_full.items() if v},
                        census_missing=self.census_missing, rmap_note=rmap_note)
        self._prev_at = now
        self._prev_procs = {p.pid: p.anon_vmas for p in procs}
        self._prev_fams = {f.pid: f.anon_vmas for f in fams}
        if len(self._comms) > len(live) + 4096:
            # Keep the names that can still be shown: live processes and
            # family creators (which may have exited long ago).
            keep = {r.pid for r in live} | {f.pid for f in fams}
            self._comms = {pid: c for pid, c in self._comms.items() if pid in keep}
        return Frame(header, procs, fams)


# Sort key -> the line attribute it ranks by ("rmap": max, then total).
_KEY_ATTRS = {"anon_vmas": "anon_vmas", "chains": "chains", "orphaned": "orphaned",
              "depth": "depth", "growth": "growth"}


def _sort_value(line: ProcLine | FamilyLine, key: str, keys: tuple[str, ...],
                what: str) -> tuple[float, ...] | None:
    """What ``line`` ranks by under ``key`` (one of ``keys``); None when it
    has no value (no widths, no growth yet)."""
    if key not in keys:
        raise AnontraceError(f"unknown {what}{key!r}; choose one of {', '.join(keys)}")
    if key == "rmap":
        return None if line.rmap_max is None else (line.rmap_max, line.rmap_total or 0)
    value = getattr(line, _KEY_ATTRS[key])
    return None if value is None else (value,)


def _proc_value(line: ProcLine, key: str) -> tuple[float, ...] | None:
    return _sort_value(line, key, SORT_KEYS, "sort key ")


def _family_value(line: FamilyLine, key: str) -> tuple[float, ...] | None:
    return _sort_value(line, key, FAMILY_SORT_KEYS, "family sort key ")


def rank_processes(lines: Sequence[ProcLine], key: str, reverse: bool = False,
                   limit: int | None = None) -> list[ProcLine]:
    """Largest ``key`` first (smallest with ``reverse``); lines without a
    value for the key (no width, no growth yet) last either way; ties by
    anon_vmas, depth, then pid."""
    def order(line: ProcLine) -> tuple[object, ...]:
        v = _proc_value(line, key)
        primary = () if v is None else tuple(x if reverse else -x for x in v)
        return (v is None, primary, -line.anon_vmas, -line.depth, line.pid)

    return sorted(lines, key=order)[:limit]


def rank_families(lines: Sequence[FamilyLine], key: str, reverse: bool = False,
                  limit: int | None = None) -> list[FamilyLine]:
    """As :func:`rank_processes`, for families."""
    def order(line: FamilyLine) -> tuple[object, ...]:
        v = _family_value(line, key)
        primary = () if v is None else tuple(x if reverse else -x for x in v)
        return (v is None, primary, -line.anon_vmas, -line.depth, line.pid)

    return sorted(lines, key=order)[:limit]


@dataclass
class View:
    """What the user chose to see: the mode, each mode's sort key, the
    order and how many rows."""

    mode: str = PROCESSES
    proc_key: str = "anon_vmas"
    family_key: str = "anon_vmas"
    reverse: bool = False
    maxrows: int = 20

    @staticmethod
    def start(sort: str = "anon_vmas", families: bool = False, maxrows: int = 20) -> View:
        """The view of the command line's -s, --families and -r: -s sets the
        family sort too where families have that key."""
        if sort not in SORT_KEYS:
            raise AnontraceError(f"unknown sort key {sort!r}; choose one of "
                                 f"{', '.join(SORT_KEYS)}")
        if maxrows < 1:
            raise AnontraceError(f"--maxrows must be at least 1, not {maxrows}")
        return View(mode=FAMILIES if families else PROCESSES, proc_key=sort,
                    family_key=sort if sort in FAMILY_SORT_KEYS else "anon_vmas",
                    maxrows=maxrows)

    @property
    def key(self) -> str:
        """The sort key of the current mode."""
        return self.family_key if self.mode == FAMILIES else self.proc_key

    def cycle(self, step: int) -> None:
        """Next (``step`` 1) or previous (-1) sort key of the current mode."""
        if self.mode == FAMILIES:
            fk = FAMILY_SORT_KEYS
            self.family_key = fk[(fk.index(self.family_key) + step) % len(fk)]
        else:
            pk = SORT_KEYS
            self.proc_key = pk[(pk.index(self.proc_key) + step) % len(pk)]

    def toggle_mode(self) -> None:
        """Processes <-> families."""
        self.mode = PROCESSES if self.mode == FAMILIES else FAMILIES

    def press(self, key: str) -> bool:
        """Apply one key of the interactive screen; True means quit.
        Keys: q quit, s/> next sort key, S/< previous, f processes or
        families, r reverse the order. Others are ignored."""
        if key in ("q", "Q"):
            return True
        if key in ("s", ">"):
            self.cycle(1)
        elif key in ("S", "<"):
            self.cycle(-1)
        elif key == "f":
            self.toggle_mode()
        elif key == "r":
            self.reverse = not self.reverse
        return False

    def rows(self, frame: Frame) -> list[ProcLine] | list[FamilyLine]:
        """The frame's lines of the current mode, ranked and cut to maxrows."""
        if self.mode == FAMILIES:
            return rank_families(frame.families, self.family_key, self.reverse, self.maxrows)
        return rank_processes(frame.processes, self.proc_key, self.reverse, self.maxrows)
