#!/usr/bin/python3
"""Attach and detach one fentry or fexit program in a loop while other
processes fork and fault: does the kernel survive its own text patching?

Run by hand inside a guest (docs/kernels.md "One host thread per guest"), e.g.::

    python3 tests/guest/boot.py --kernel 7.2 --cpus 2 -- \\
        'timeout 120 /usr/bin/python3 tests/guest/patch_race.py fentry anon_vma_fork'

Under multi-threaded TCG with two vCPUs the 6.12 and 7.2 guests oops
(``Oops: int3`` at the call site) within seconds; with ``--cpus 1`` they
do not, nor with --single-thread. Prints the cycles done every 100 cycles.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import time

PR_SET_PDEATHSIG = 1


def churn() -> None:
    """Fault a MiB of anonymous memory and fork, forever: each fork runs
    anon_vma_fork for the mapping; dies with its parent."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9)
    while True:
        m = mmap.mmap(-1, 1 << 20)
        for off in range(0, 1 << 20, 4096):
            m[off] = 1
        if os.fork() == 0:
            m[0] = 2
            os._exit(0)
        os.wait()
        m.close()


def main() -> None:
    """Parse the arguments, start the churners, cycle the attachment."""
    from bcc import BPF  # type: ignore[import-untyped]  # a guest-only tool, run by hand

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("fentry", "fexit"))
    parser.add_argument("function", help="kernel function, e.g. anon_vma_fork")
    parser.add_argument("--cycles", type=int, default=1_000_000)
    parser.add_argument("--churners", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.churners):
        if os.fork() == 0:
            churn()
    macro = "KFUNC_PROBE" if args.kind == "fentry" else "KRETFUNC_PROBE"
    bpf = BPF(text=f"{macro}({args.function}) {{ return 0; }}")
    detach = bpf.detach_kfunc if args.kind == "fentry" else bpf.detach_kretfunc
    attach = bpf.attach_kfunc if args.kind == "fentry" else bpf.attach_kretfunc
    start = time.monotonic()
    for i in range(args.cycles):
        detach(args.function)
        attach(args.function)
        if i % 100 == 0:
            print(f"{args.kind} {args.function}: {i} cycles in "
                  f"{time.monotonic() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
