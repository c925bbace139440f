"""Reading and resetting the state maps of a loaded program (batch lookups
through tracer.kernel.bcc_glue); tracer.kernel.kstate decodes what is read."""
from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from typing import Any

from tracer.kernel.bcc_glue import delete_keys, dump_hash, iter_hash, lookup_raw
from tracer.kernel.kstate import (
    G_NR,
    PSTATE_HEAD,
    DecodeCache,
    Globals,
    KernelState,
    MmRow,
    StateDump,
    decode_entries,
    decode_proc,
    torn_reads,
    torn_rows,
)

Table = Callable[[str], Any]   # map name -> the loaded program's table

STATE_MAPS = ("st_vma", "st_av", "st_mm", "st_proc", "st_fam")


def dump_state(table: Table, families: bool = True) -> StateDump:
    """Every state map's entries, and the per-CPU sums."""
    ptab, mtab = table("st_proc"), table("st_mm")
    # mms before processes (tracer.kernel.kstate.torn_reads says why).
    mms = dump_hash(mtab, 8)
    procs = dump_hash(ptab, 4)
    for _ in range(3):
        torn = torn_reads(procs, mms)
        if not torn:
            break
        for pid in torn:
            mm = PSTATE_HEAD.unpack_from(procs[pid])[0]
            mraw = lookup_raw(mtab, ctypes.c_uint64(mm))
            if mraw is not None:
                mms[mm] = mraw
            raw = lookup_raw(ptab, ctypes.c_uint32(pid))
            if raw is None:
                del procs[pid]
            else:
                procs[pid] = raw
    fams = dump_hash(table("st_fam"), 4) if families else {}
    sums, depths = _sums(table)
    return StateDump(mms=mms, procs=procs, families=fams, global_sums=sums, depths=depths)


def read_state(table: Table, cache: DecodeCache) -> KernelState:
    """The state decoded as it is read, entry by entry through ``cache``
    (the last read's rows): what :func:`dump_state` and
    :meth:`KernelState.decode` give, without holding every entry's bytes at
    once (at 10,000 processes those were 20 MB more of `serve`'s memory at
    each refresh) or decoding the entries that did not change. The mms
    before the processes and the same torn-read repair as
    :func:`dump_state` (the families, which neither depends on, are read
    before the repair)."""
    ptab, mtab = table("st_proc"), table("st_mm")
    mms, procs, fams = decode_entries(iter_hash(mtab, 8), iter_hash(ptab, 4),
                                      iter_hash(table("st_fam"), 4), cache)
    for _ in range(3):
        torn = torn_rows(procs, mms)
        if not torn:
            break
        for pid in torn:
            mm = procs[pid].mm
            mraw = lookup_raw(mtab, ctypes.c_uint64(mm))
            if mraw is not None:
                mms[mm] = MmRow.decode(mm, mraw)
            raw = lookup_raw(ptab, ctypes.c_uint32(pid))
            if raw is None:
                del procs[pid]
            else:
                procs[pid] = decode_proc(pid, raw, mms)
    sums, depths = _sums(table)
    return KernelState(mms, procs, fams, Globals.from_sums(sums, depths))


def _sums(table: Table) -> tuple[list[int], list[int]]:
    """st_global and st_depths, summed over CPUs."""
    g = table("st_global")
    sums = [int(sum(g[ctypes.c_int(i)])) for i in range(G_NR)]
    d = table("st_depths")
    return sums, [int(sum(d[ctypes.c_int(i)])) for i in range(len(d))]


def forget_processes(proc_table: Any, pids: list[int]) -> None:
    """Delete exited processes (st_proc entries) once they are reported:
    batch deletes, thousands a second under a fork storm."""
    delete_keys(proc_table, pids)


def clear_hash(t: Any) -> None:
    """Delete every entry of a hash map the programs keep writing: BCC's
    clear() raises KeyError when a program deletes an entry between its
    key walk and its delete (an exit during a resync)."""
    for key in list(t.keys()):
        with contextlib.suppress(KeyError):
            del t[key]


def clear_state(table: Table) -> None:
    """Empty every state map but the counters (before a resync census)."""
    for name in STATE_MAPS:
        clear_hash(table(name))
    g = table("st_global")
    for i in range(3):   # the live totals; event counters and map_full carry on
        g[ctypes.c_int(i)] = g.Leaf(*([0] * len(g[ctypes.c_int(i)])))
