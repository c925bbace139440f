"""`anontrace serve --user nobody`: once attached, the daemon runs as nobody
with CAP_BPF alone, and everything it does afterwards still works: the
snapshot refresh, a resync from a census after a full map, SIGTERM with
every program detached. systemd's Type=notify hears READY=1 once /metrics
answers and STOPPING=1 at SIGTERM."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.stack import Serve, assert_released, held_maps

CAP_BPF = 39
# One process holding this many anon_vmas (each written page between two
# PROT_NONE guard pages is its own VMA, and no neighbour can share its
# anon_vma): more than the 1024-entry anon_vma map below.
REGIONS = 1500
HOLDER = f"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
page = mmap.PAGESIZE
n = {REGIONS}
base = libc.mmap(None, page * (2 * n + 1), 0, 0x22, -1, 0)   # PROT_NONE, private|anon
for i in range(n):
    addr = base + page * (2 * i + 1)
    assert libc.mprotect(addr, page, 3) == 0                 # read|write
    ctypes.memset(addr, 1, 1)
print("ready", flush=True)
sys.stdin.read()
"""


def _value(text: str, metric: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + " ") or line.startswith(metric + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


@pytest.mark.method_agnostic
def test_serve_runs_as_nobody_with_cap_bpf_alone(tmp_path: Path, backend: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("ANONTRACE_GUEST"):
        pytest.skip("the privilege drop is user-space logic, the same on every kernel: runs "
                    "on the host (the guests' serve tests run it as root, the default)")
    if backend != "auto":
        pytest.skip(f"runs once, in the host's auto pass, not {backend}")
    # An abstract socket: no file permissions stand between it and nobody
    # (systemd's /run/systemd/notify is world-writable for the same reason).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"anontrace-test-notify-{os.getpid()}"
    notify.bind("\0" + name)
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    # Small maps, preallocated (maps.preallocate): a real load of that
    # choice, and the full anon_vma map below is a preallocated one.
    srv = Serve(tmp_path, "maps:\n  vmas: 16384\n  anon_vmas: 1024\n  mms: 2048\n"
                "  processes: 4096\n  families: 2048\n  preallocate: true\n"
                "selection:\n  comm: '^nothing$'\nrmap_interval: 1s\n", ("--user", "nobody"))
    holder = None
    try:
        assert notify.recv(64) == b"READY=1"
        st = _status(srv.proc.pid)
        nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert st["Uid"].split()[0] == nobody, st["Uid"]
        assert int(st["CapEff"], 16) == 1 << CAP_BPF, st["CapEff"]
        assert int(st["CapPrm"], 16) == 1 << CAP_BPF and int(st["CapBnd"], 16) == 1 << CAP_BPF
        assert st["NoNewPrivs"] == "1"
        assert "privileges dropped" in srv.output() and "user=nobody" in srv.output()
        maps = held_maps(srv.proc.pid)
        for name, entries in (("st_vma", 16384), ("st_av", 1024), ("st_proc", 4096)):
            assert maps[name]["max_entries"] == entries, maps[name]
            assert maps[name]["flags"] & 1 == 0, maps[name]   # no BPF_F_NO_PREALLOC
        assert _value(srv.metrics(), "process_open_fds") > 0   # its own /proc still readable
        # The rmap census keeps running as nobody with CAP_BPF alone.
        first = _value(srv.metrics(), "anontrace_rmap_census_timestamp_seconds")
        time.sleep(2.5)
        assert _value(srv.metrics(), "anontrace_rmap_census_timestamp_seconds") > first
        assert "rmap census failed" not in srv.output(), srv.output()

        # Overflow the anon_vma map: the count and, once the losses stop, a
        # census rebuild, all as nobody.
        holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        text = srv.metrics()
        while time.monotonic() < deadline:
            text = srv.metrics()
            if _value(text, "anontrace_resyncs_total") >= 1:
                break
            time.sleep(1)
        assert _value(text, 'anontrace_map_full_total{map="anon_vmas"}') > 0, text[-2000:]
        assert _value(text, "anontrace_resyncs_total") >= 1, srv.output()
        assert re.search(r'level=warn msg="maps rebuilt from a census', srv.output())
        assert 0 < _value(text, "anontrace_anon_vmas") <= 1024
        ours = srv.prog_ids()
        assert ours
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        status = srv.stop()
    assert status == 0, srv.output()
    assert notify.recv(64) == b"STOPPING=1"
    assert_released(ours, "after SIGTERM as nobody")
    assert "Traceback" not in srv.output(), srv.output()
