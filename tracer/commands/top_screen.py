"""`anontrace top` on a terminal: the text of a frame, the plain mode
(one table per interval, like bcc's *top tools with -C or into a pipe) and
the interactive curses screen.

Process names are untrusted: they reach the terminal only through
:func:`tracer.format.events.safe_comm` (done by :mod:`tracer.commands.top`)
and are fitted to their column by display width here.
"""
from __future__ import annotations

import curses
import time
import unicodedata
from collections.abc import Callable
from typing import IO, Any

from tracer.commands.top import FAMILIES, FamilyLine, Frame, ProcLine, View
from tracer.errors import AnontraceError

Refresh = Callable[[], Frame]

KEYS_HELP = "keys: q quit  s/S or >/< sort  f processes/families  r reverse"
COMM_W = 16


def _width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def fit(text: str, width: int) -> str:
    """``text`` cut or padded to ``width`` terminal columns (wide characters
    count two), so a name cannot shift the columns after it."""
    out, used = [], 0
    for c in text:
        w = _width(c)
        if used + w > width:
            break
        out.append(c)
        used += w
    return "".join(out) + " " * (width - used)


def _num(v: int | None, width: int) -> str:
    return f"{'-' if v is None else v:>{width}}"


def _rate(v: float | None, width: int) -> str:
    return f"{'-' if v is None else format(v, '+.1f'):>{width}}"


PROC_HEAD = (f"{'PID':>7} {'COMM':<{COMM_W}} {'AVS':>7} {'CHAINS':>8} {'DEPTH':>5} "
             f"{'RMAP':>5} {'RMAPSUM':>7} {'AVS/s':>8}")
FAMILY_HEAD = (f"{'FAMILY':>7} {'COMM':<{COMM_W}} {'AVS':>7} {'ORPHANED':>8} {'DEPTH':>5} "
               f"{'RMAP':>5} {'RMAPSUM':>7} {'AVS/s':>8}")


def proc_row(p: ProcLine) -> str:
    """One process line of the table."""
    return (f"{p.pid:>7} {fit(p.comm, COMM_W)} {p.anon_vmas:>7} {p.chains:>8} {p.depth:>5} "
            f"{_num(p.rmap_max, 5)} {_num(p.rmap_total, 7)} {_rate(p.growth, 8)}")


def family_row(f: FamilyLine) -> str:
    """One family line of the table."""
    return (f"{f.pid:>7} {fit(f.comm, COMM_W)} {f.anon_vmas:>7} {f.orphaned:>8} {f.depth:>5} "
            f"{_num(f.rmap_max, 5)} {_num(f.rmap_total, 7)} {_rate(f.growth, 8)}")


def header_lines(frame: Frame, view: View) -> list[str]:
    """The lines above the table: time, backend, losses, the view and its
    sort; the totals; why figures may be incomplete."""
    h = frame.header
    order = "ascending" if view.reverse else "descending"
    lines = [f"{time.strftime('%H:%M:%S', time.localtime(h.time))} backend={h.backend} "
             f"lost={h.lost} view={view.mode} sort={view.key} ({order})",
             f"anon_vmas={h.anon_vmas} chains={h.chains} orphaned={h.orphaned} "
             f"processes={h.processes}"]
    if h.refused:
        full = ", ".join(f"{k} {v}" for k, v in h.map_full.items())
        lines.append(f"inserts refused by full maps: {h.refused} ({full})")
    if h.census_missing:
        lines.append(f"no census (processes that predate tracing are partly counted): "
                     f"{h.census_missing}")
    if h.rmap_note:
        lines.append(h.rmap_note)
    return lines


def table_lines(frame: Frame, view: View) -> list[str]:
    """The column header and the ranked rows of the current view."""
    if view.mode == FAMILIES:
        return [FAMILY_HEAD] + [family_row(f) for f in view.rows(frame)
                                if isinstance(f, FamilyLine)]
    return [PROC_HEAD] + [proc_row(p) for p in view.rows(frame) if isinstance(p, ProcLine)]


def frame_text(frame: Frame, view: View) -> str:
    """A whole frame as plain text (the non-interactive mode)."""
    return "\n".join(header_lines(frame, view) + [""] + table_lines(frame, view))


def run_plain(refresh: Refresh, view: View, interval: float, count: int | None,
              out: IO[str], sleep: Callable[[float], None] = time.sleep) -> int:
    """Print a table every ``interval`` seconds, ``count`` times (None:
    until Ctrl-C), never clearing the screen (bcc's -C). Returns the number
    of tables printed."""
    shown = 0
    while count is None or shown < count:
        sleep(interval)
        frame = refresh()
        out.write(frame_text(frame, view) + "\n\n")
        out.flush()
        shown += 1
    return shown


class Screen:
    """The curses screen: draws frames, reads keys between refreshes."""

    def __init__(self, stdscr: Any) -> None:
        self.scr = stdscr
        self.encoding = getattr(stdscr, "encoding", "utf-8") or "utf-8"
        try:
            curses.curs_set(0)
        except curses.error:
            pass    # a terminal without an invisible cursor

    def _put(self, y: int, text: str, attr: int = 0) -> None:
        height, width = self.scr.getmaxyx()
        if y >= height:
            return
        # What the terminal's encoding cannot show becomes "?", never an error.
        safe = text.encode(self.encoding, "replace").decode(self.encoding, "replace")
        try:
            self.scr.addnstr(y, 0, safe, max(0, width - 1), attr)
        except curses.error:
            pass    # the bottom-right cell: curses reports writing it as an error

    def draw(self, frame: Frame, view: View) -> None:
        """Header, key help and as many rows as fit."""
        self.scr.erase()
        lines = header_lines(frame, view)
        for y, line in enumerate(lines):
            self._put(y, line, curses.A_BOLD if y == 0 else 0)
        y = len(lines)
        self._put(y, KEYS_HELP)
        table = table_lines(frame, view)
        self._put(y + 2, table[0], curses.A_REVERSE)
        for i, line in enumerate(table[1:]):
            self._put(y + 3 + i, line)
        self.scr.refresh()

    def wait_keys(self, view: View, frame: Frame, seconds: float) -> bool:
        """Handle keys for ``seconds`` (redrawing after each that changes
        the view); True when the user quits."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.scr.timeout(max(1, int(left * 1000)))
            ch = self.scr.getch()
            if ch == -1:
                continue
            if ch == curses.KEY_RESIZE:
                self.draw(frame, view)
                continue
            if 0 <= ch < 256 and view.press(chr(ch)):
                return True
            self.draw(frame, view)


def run_curses(refresh: Refresh, view: View, interval: float, count: int | None,
               first: Frame | None = None) -> int:
    """The interactive screen until `q`, ``count`` refreshes or Ctrl-C
    (raised as KeyboardInterrupt once the terminal is restored). ``first``
    is shown at once (else a refresh is). Returns the number of refreshes
    after the first frame."""
    def loop(stdscr: Any) -> int:
        screen = Screen(stdscr)
        frame = first if first is not None else refresh()
        screen.draw(frame, view)
        shown = 0
        while count is None or shown < count:
            if screen.wait_keys(view, frame, interval):
                break
            frame = refresh()
            screen.draw(frame, view)
            shown += 1
        return shown

    try:
        return int(curses.wrapper(loop))
    except curses.error as exc:
        raise AnontraceError(f"cannot drive this terminal with curses ({exc}): "
                             "use -C for plain tables") from exc
