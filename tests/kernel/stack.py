"""A real `anontrace serve` and a real Prometheus (Debian's) on loopback,
for the end-to-end tests."""
from __future__ import annotations

import base64
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tracer.kernel.compat import programs_preemptible, tracepoint_programs_preemptible
from tracer.kernel.kernel_env import Kallsyms, KernelEnv, preempt_model

ROOT = Path(__file__).resolve().parents[2]
ANONTRACE = [sys.executable, "-m", "tracer"]
PROMETHEUS = "/usr/bin/prometheus"


@functools.cache
def kernel_preempts(tracepoints: bool = False) -> bool:
    """Whether the running kernel can preempt a task inside our fentry (and
    iterator) programs, or with ``tracepoints`` inside the tracepoint ones
    (docs/state.md "Preemption"): the product's own feature test, read once
    per test session (the whole of kallsyms)."""
    env = KernelEnv()
    test = tracepoint_programs_preemptible if tracepoints else programs_preemptible
    return test(Kallsyms.read(env), preempt_model(env))


def auto_method() -> str:
    """The rmap-function method auto takes on this kernel: fentry, or
    kprobes where the kernel can preempt fentry programs
    (tracer.kernel.bpf_session.auto_order)."""
    return "kprobe" if kernel_preempts() else "fentry"


def preempted_loss(backend: str, lost: int, detail: object = "") -> str | None:
    """Why a run may report losses, or None, where the kernel can preempt a
    task inside our programs and the kernel skips a program for the other
    tasks on that CPU meanwhile (docs/state.md "Preemption", "Recursion
    misses"): with fentry forced there each skipped run is an rmap operation
    lost (recursion_misses; auto takes kprobes on such kernels); where
    tracepoint programs can be preempted too, a task's scratch or marks the
    kernel would not create while another task was preempted in a
    task-storage call (scratch_failed, pending_full). Reported as lost, so a
    test that needs nothing lost shows it as xfail with this reason, which
    ends with ``detail`` (what the report said was lost)."""
    if not lost:
        return None
    said = f"; {detail}" if detail else ""
    if backend == "fentry" and kernel_preempts():
        return (f"{lost} events reported lost with fentry forced on a kernel that preempts "
                "fentry programs (skipped runs, or task storage refused; auto uses kprobes there: "
                f"docs/state.md 'Preemption'){said}")
    if kernel_preempts(tracepoints=True):
        return (f"{lost} events reported lost on a kernel that preempts tracepoint programs "
                f"(docs/state.md 'Preemption', 'Recursion misses'){said}")
    return None


def xfail_preempted(backend: str, lost: int, detail: object = "") -> None:
    """A test that needs nothing lost shows a preempted_loss as xfail,
    never as a pass."""
    reason = preempted_loss(backend, lost, detail)
    if reason:
        pytest.xfail(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10, context: ssl.SSLContext | None = None,
             auth: tuple[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization",
                       "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return resp.read()


def bpf_prog_ids() -> set[int]:
    """Ids of the BPF programs loaded now (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def named_copy(binary: Path, name: str, directory: Path) -> Path:
    """A copy of ``binary`` called ``name`` (its processes' comm): a test
    that selects its own workload by comm then gets only that one, whatever
    else runs beside it (a concurrent test shard runs the same workloads)."""
    out = directory / name
    out.write_bytes(binary.read_bytes())
    out.chmod(0o755)
    return out


def _held_ids(pid: int, field: str) -> set[int]:
    """The ``field`` ("prog_id:", "map_id:") of every descriptor process
    ``pid`` holds, from its fdinfo."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue    # closed meanwhile
        ids.update(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith(field))
    return ids


def held_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds a descriptor of, from
    its fdinfo: the kernel's word on which programs are that process's, also
    while other tests load their own (bpftool lists no owners on every host)."""
    return _held_ids(pid, "prog_id:")


def held_maps(pid: int) -> dict[str, dict[str, Any]]:
    """The BPF maps process ``pid`` holds a descriptor of, by name, as
    ``bpftool map show`` describes them (id, flags, max_entries,
    bytes_memlock...): the kernel's word, also while another anontrace on
    this host has maps of the same names."""
    out = {}
    for map_id in _held_ids(pid, "map_id:"):
        show = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                              capture_output=True, text=True, timeout=60)
        if show.returncode == 0:
            m = json.loads(show.stdout)
            out[m.get("name", "")] = m
    return out


def assert_released(ids: set[int], what: str, timeout: float = 20) -> None:
    """The programs ``ids`` are gone: the kernel frees a program after its
    last descriptor closes, asynchronously, so this waits up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while ids & bpf_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ids & bpf_prog_ids()
    assert not left, f"BPF programs left loaded {what}: {sorted(left)}"


class Serve:
    """`anontrace serve` as a subprocess."""

    def __init__(self, workdir: Path, config_text: str, args: tuple[str, ...] = (),
                 context: ssl.SSLContext | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        """``args`` are more serve options; with ``context`` (TLS) and
        ``auth`` (basic auth) the readiness check and :meth:`metrics` use
        https and credentials."""
        self.port = free_port()
        self.config = workdir / "anontrace.yaml"
        self.config.write_text(config_text)
        self.log = open(workdir / "serve.log", "w+b")
        self.context, self.auth = context, auth
        self.proc = subprocess.Popen(
            ANONTRACE + ["serve", "--config", str(self.config), "--listen",
                         f"127.0.0.1:{self.port}", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"anontrace serve exited {self.proc.returncode}: "
                                   f"{self.output()}")
            try:
                self.metrics(timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def prog_ids(self) -> set[int]:
        """The BPF programs this serve holds."""
        return held_prog_ids(self.proc.pid)

    def metrics(self, timeout: float = 10) -> str:
        return http_get(self.url + "/metrics", timeout, self.context, self.auth).decode()

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


class Prometheus:
    """Debian's prometheus, scraping one target every second."""

    def __init__(self, workdir: Path, target: str, rules: Path | None,
                 scrape_extra: str = "") -> None:
        """``scrape_extra``: more lines of the scrape job (scheme, tls_config,
        basic_auth), indented four spaces."""
        if not os.path.exists(PROMETHEUS):
            raise RuntimeError(f"{PROMETHEUS} missing: run scripts/install.sh --test")
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n  - {rules}\n" if rules else "")
            + "scrape_configs:\n  - job_name: anontrace\n" + scrape_extra
            + f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "w+b")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                http_get(self.url + "/-/ready", timeout=2)
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start: {self.output()}") from exc
                time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the "data" of a success, else an AssertionError."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

