#!/usr/bin/env python3
"""Dump the anon_vma hierarchy of live processes with drgn (ground truth).

Runs inside the 6.12 guest as root with the venv's interpreter (drgn lives
there; guest PATH has no venv)::

    .venv/bin/python tests/guest/drgn_walk.py \
        --vmlinux /var/cache/anontrace/vmlinux-$(uname -r) --pid 123 [--pid 456] [--json]

drgn needs the DWARF vmlinux from scripts/fetch-dbg-vmlinux.sh; BTF alone is
not enough.  Loading it takes a while under TCG (timing is printed on stderr).

For every VMA with an anon_vma it reports the range, the anon_vma, its
depth (root = 1, following ->parent until parent == self), the number of
anon_vma_chain entries on the VMA, num_children / num_active_vmas, root and
parent, and the chain itself: each entry's anon_vma, depth and rmap width
(the entries in that anon_vma's interval tree).  Addresses are hex strings in the JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import drgn
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import for_each_vma
from drgn.helpers.linux.pid import find_task
from drgn.helpers.linux.rbtree import rbtree_inorder_for_each_entry

# A corrupt or concurrently freed parent chain must not loop forever.
MAX_DEPTH = 100_000


def load_program(vmlinux: str) -> drgn.Program:
    """Attach drgn to the running kernel using the given DWARF vmlinux."""
    # drgn only warns about a missing file and then fails obscurely later.
    if not os.path.isfile(vmlinux):
        raise SystemExit(f"drgn_walk: {vmlinux} not found (run scripts/fetch-dbg-vmlinux.sh "
                         "on the host; boot.py shares /var/cache/anontrace read-only)")
    prog = drgn.Program()
    prog.set_kernel()
    prog.load_debug_info([vmlinux])
    return prog


def anon_vma_depth(av: drgn.Object) -> int:
    """Number of levels from ``av`` up to its root (the root itself is 1)."""
    depth = 1
    while av.parent.value_() != av.value_():
        av = av.parent
        depth += 1
        if depth > MAX_DEPTH:
            raise RuntimeError(f"anon_vma parent chain from {av.value_():#x} does not end")
    return depth


def chain_length(vma: drgn.Object) -> int:
    """Number of anon_vma_chain entries linked on ``vma`` (one per hierarchy level kept)."""
    return sum(
        1
        for _ in list_for_each_entry(
            "struct anon_vma_chain", vma.anon_vma_chain.address_of_(), "same_vma"
        )
    )


def rmap_width(av: drgn.Object) -> int:
    """anon_vma_chain entries in ``av``'s interval tree: the VMAs an rmap
    walk of its pages may visit."""
    return sum(1 for _ in rbtree_inorder_for_each_entry(
        "struct anon_vma_chain", av.rb_root.rb_root.address_of_(), "rb"))


def chain(vma: drgn.Object) -> list[dict[str, Any]]:
    """The VMA's chain entries in list order (newest first), each with its
    anon_vma, depth and rmap width."""
    return [{"anon_vma": hex(avc.anon_vma.value_()), "depth": anon_vma_depth(avc.anon_vma),
             "rmap_width": rmap_width(avc.anon_vma)}
            for avc in list_for_each_entry("struct anon_vma_chain",
                                           vma.anon_vma_chain.address_of_(), "same_vma")]


def walk_pid(prog: drgn.Program, pid: int) -> dict[str, Any]:
    """Describe every anon_vma-backed VMA of ``pid``; an ``error`` key if it cannot."""
    task = find_task(prog, pid)
    if not task:
        return {"pid": pid, "error": "no such task"}
    mm = task.mm
    if not mm:
        return {"pid": pid, "error": "no mm (kernel thread or exiting)"}
    vmas = []
    for vma in for_each_vma(mm):
        av = vma.anon_vma
        if not av:
            continue
        vmas.append({
            "vm_start": hex(vma.vm_start.value_()),
            "vm_end": hex(vma.vm_end.value_()),
            "anon_vma": hex(av.value_()),
            "depth": anon_vma_depth(av),
            "chain_len": chain_length(vma),
            "num_children": av.num_children.value_(),
            "num_active_vmas": av.num_active_vmas.value_(),
            "root": hex(av.root.value_()),
            "parent": hex(av.parent.value_()),
            "chain": chain(vma),
        })
    return {
        "pid": pid,
        "tgid": task.tgid.value_(),
        "comm": task.comm.string_().decode(errors="replace"),
        "mm": hex(mm.value_()),
        "vmas": vmas,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """Human-readable form of :func:`walk_pid` results."""
    cols = ("vm_start", "vm_end", "anon_vma", "depth", "chain_len",
            "num_children", "num_active_vmas", "root", "parent")
    for res in results:
        if "error" in res:
            print(f"pid {res['pid']}: {res['error']}")
            continue
        print(f"pid {res['pid']} ({res['comm']}) mm {res['mm']}")
        print("  " + " ".join(cols))
        for vma in res["vmas"]:
            print("  " + " ".join(str(vma[c]) for c in cols))


def main() -> int:
    """CLI entry point; exit status 1 if any pid could not be walked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmlinux", required=True, help="DWARF vmlinux of the running kernel")
    parser.add_argument("--pid", type=int, action="append", required=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    start = time.monotonic()
    prog = load_program(args.vmlinux)
    loaded = time.monotonic()
    results = [walk_pid(prog, pid) for pid in args.pid]
    print(f"drgn_walk: debug info {loaded - start:.1f} s, walk {time.monotonic() - loaded:.1f} s",
          file=sys.stderr)

    if args.json:
        json.dump({"pids": results}, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
