#!/usr/bin/env python3
"""Run a shell command inside a real Debian kernel booted under QEMU TCG.

The development machine's own kernel has no kprobes and refuses fentry
(docs/kernels.md), so kernel tests boot Debian's 6.1 or
6.12 kernel, or sid's 7.2, with virtme-ng, sharing the host root filesystem read-only.

Inside the guest:

* the command runs as root, with bash, in the repository directory;
* the repository is shared read-write with the host, so result files written
  there are visible to the host afterwards; ``/tmp`` is the guest's own
  tmpfs (a shared /tmp breaks unlinked temp files, which pytest's capture
  uses); everything else is read-only or a throw-away overlay;
* ``/var/cache/anontrace`` (debug vmlinux files) is shared read-only; the
  rest of ``/var/cache`` is an empty tmpfs;
* tracefs and debugfs are mounted, BPF (kprobes, fentry) works, and
  ``/lib/modules/$(uname -r)/build`` resolves to the installed headers;
* ``PATH`` is not the host's (no pyenv shims, no venv): use absolute
  interpreter paths, e.g. ``/usr/bin/python3`` (has BCC) or
  the checkout's ``.venv/bin/python`` (has drgn; the guest starts in the
  checkout).

Each boot costs about 20-40 s under TCG.  KVM is never used: ``/dev/kvm``
exists on the CI machines but KVM guests hang at boot.

CLI::

    python3 tests/guest/boot.py --kernel 6.12 [--timeout 900] [--cpus N] [--single-thread] -- 'cmd'

The exit status is the command's (124 on timeout).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]

#: How each supported kernel series gets onto the host (scripts/install.sh
#: --test does all three): Debian 12's own packages, or Linux 7.2 unpacked
#: from sid.
KERNEL_SOURCES: dict[str, str] = {
    "6.1": "apt-get install linux-image-amd64",
    "6.12": "apt-get install linux-image-6.12-amd64",
    "7.2": "scripts/fetch-sid-kernel.sh",
}

#: Host cache of debug vmlinux files (scripts/fetch-dbg-vmlinux.sh).
CACHE_DIR = "/var/cache/anontrace"

DEFAULT_TIMEOUT = 900.0
TIMEOUT_STATUS = 124

# virtme-ng-init mounts both already; keep this so a vng upgrade that stops
# doing so cannot silently break tracing tests.
_PRELUDE = (
    "mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug; "
    "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; "
)


class GuestError(RuntimeError):
    """The guest cannot be started (missing kernel or virtme-ng)."""


def _version_key(path: str) -> list[int]:
    """Sort key so that 6.12.117 > 6.12.99 (plain string sort gets this wrong)."""
    return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]


def find_kernel(series: str) -> str:
    """Return the newest installed ``/boot/vmlinuz-<series>.*`` image.

    ``series`` is "6.1", "6.12" or "7.2".  The trailing dot in the pattern
    keeps "6.1" from matching 6.12 images.
    """
    if series not in KERNEL_SOURCES:
        raise GuestError(
            f"unsupported kernel series {series!r}; choose one of {sorted(KERNEL_SOURCES)}"
        )
    images = glob.glob(f"/boot/vmlinuz-{series}.*")
    if not images:
        raise GuestError(
            f"no /boot/vmlinuz-{series}.* installed; "
            f"run: {KERNEL_SOURCES[series]}"
        )
    return max(images, key=_version_key)


def find_vng() -> str:
    """Locate the ``vng`` executable (venv next to this interpreter, PATH, repo venv)."""
    # Not resolving symlinks: a venv's python links to /usr/bin/python3.
    candidates = [
        os.path.join(os.path.dirname(sys.executable), "vng"),
        shutil.which("vng"),
        str(REPO / ".venv" / "bin" / "vng"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise GuestError(
        "vng not found; create the venv: /usr/bin/python3 -m venv "
        "--system-site-packages .venv && .venv/bin/pip install virtme-ng drgn"
    )


MAX_SCRIPT = 900


def vng_command(kernel: str, command: str, memory: str = "6G", cpus: int = 2,
                single_thread: bool = False) -> list[str]:
    """Build the vng argv that boots ``kernel`` and runs ``command`` in the repo.

    TCG runs each vCPU on a host thread unless ``single_thread``, which
    runs them all on one. scripts/test.sh asks for two vCPUs on one thread
    and boots one guest per test shard: with two threads, multi-threaded
    TCG lets one vCPU run a stale translation of kernel text that another
    has just patched, and the guest kernel oopses on an int3 of its own text
    patching (docs/kernels.md "One host thread per guest"). 6 GB: drgn with
    Debian's debug info and a BCC compile may be resident together (a 6.12
    guest with 4 GB died in the drgn report test when two shards shared
    it), and /tmp is the guest's tmpfs. QEMU takes the memory as the guest
    touches it."""
    # virtme-ng-init mounts an empty tmpfs over /var/cache, hiding the cache.
    cache = ["--rodir", CACHE_DIR] if os.path.isdir(CACHE_DIR) else []
    script = f"{_PRELUDE}cd {shlex.quote(str(REPO))} && exec /bin/bash -c {shlex.quote(command)}"
    if len(script) > MAX_SCRIPT:
        # vng hands the command to the guest on the kernel command line (2048
        # bytes on x86 with vng's own options): a longer one stalls QEMU
        # before the kernel runs, with no message (seen with 1000 bytes here).
        raise ValueError(f"guest command of {len(script)} bytes (limit {MAX_SCRIPT}): "
                         "put it in a script file and run that")
    return [
        find_vng(),
        "--disable-kvm",
        # The guest kernel's console on our stderr, quiet (loglevel 1) until
        # an oops or a panic turns it verbose: without it a guest that
        # crashes only makes vng exit 255 (its "unexpected exit"), with no
        # word of why (the 6.12 guest did, twice, in the fentry pass).
        "--verbose", "--append", "loglevel=1",
        "--run", kernel,
        "--memory", memory,
        "--cpus", str(cpus),
        *(["--qemu-opts=-accel tcg,thread=single"] if single_thread else []),
        "--cwd", str(REPO),
        # Only these are writable back to the host; --rw would expose all of /.
        "--rwdir", str(REPO),
        *cache,
        "--", script,
    ]


def _pump(proc: subprocess.Popen[bytes], out: IO[bytes], err: IO[bytes], deadline: float) -> bool:
    """Copy the child's stdout/stderr to ours until EOF; False if the deadline passed."""
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for key, _ in sel.select(timeout=min(remaining, 1.0)):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            dest: IO[bytes] = key.data
            dest.write(data)
            dest.flush()
    return True


def run_in_guest(series: str, command: str, timeout: float = DEFAULT_TIMEOUT,
                 cpus: int = 2, single_thread: bool = False) -> int:
    """Boot kernel ``series`` ("6.1", "6.12" or "7.2") with ``cpus`` vCPUs,
    run ``command``, return its exit status.

    Guest stdout/stderr are streamed to ours as they arrive.  Returns 124 if
    the whole boot plus command exceeds ``timeout`` seconds (QEMU is killed).
    """
    argv = vng_command(find_kernel(series), command, cpus=cpus, single_thread=single_thread)
    env = dict(os.environ)
    # vng starts virtme-run by name, so the venv's bin dir must be on PATH.
    env["PATH"] = os.path.dirname(argv[0]) + os.pathsep + env.get("PATH", "")
    # Pipes, not inherited fds: QEMU reopens /proc/self/fd/1 for several
    # serial ports, and on a regular file each reopen gets its own offset and
    # the guest's output overwrites itself.
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        if _pump(proc, sys.stdout.buffer, sys.stderr.buffer, deadline):
            try:
                return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        print(f"boot.py: guest timed out after {timeout:.0f} s", file=sys.stderr)
        return TIMEOUT_STATUS
    finally:
        if proc.poll() is None:
            # QEMU is a grandchild; kill the whole session we created.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", required=True, choices=sorted(KERNEL_SOURCES))
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--cpus", type=int, default=2,
                        help="vCPUs (default 2)")
    parser.add_argument("--single-thread", action="store_true",
                        help="run every vCPU on one host thread (scripts/test.sh does: "
                             "docs/kernels.md 'One host thread per guest')")
    parser.add_argument("command", nargs="+", help="shell command (after --)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        status = run_in_guest(args.kernel, " ".join(args.command), args.timeout, args.cpus,
                              args.single_thread)
    except GuestError as exc:
        print(f"boot.py: {exc}", file=sys.stderr)
        return 2
    print(f"boot.py: exit {status} after {time.monotonic() - start:.1f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
