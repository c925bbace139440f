"""The container image as a user runs it: scripts/build-image.sh builds it
from Debian packages alone (an mmdebstrap base imported into podman, the
Containerfile, the wheel of this checkout), then `check` and `serve` run in
it with the flags of README "Container image": serve's /metrics is scraped
from the host and must name the host's processes by their host pids, and
`podman stop` (SIGTERM) must end it at once, exit 0, with every BPF program
released."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tracer
from exporters.metrics_spec import PROBES
from tests.kernel.stack import ROOT, assert_released, free_port, held_prog_ids, http_get
from tracer.kernel.probes import LOGICAL_PROBES

pytestmark = pytest.mark.method_agnostic

BUILD = ROOT / "scripts" / "build-image.sh"
# The podman settings build-image.sh uses (runc, ulimits): the test's own
# podman calls need them too.
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "container" / "containers.conf")}
# README "Container image": privileged (BPF, perf events, mounting tracefs
# and securityfs in the container), the host's PID namespace (the pids the
# BPF programs report are the host's, and /proc must agree), the host's
# network (serve's loopback port reachable from the host, no NAT set-up).
RUN = ["podman", "run", "--rm", "--privileged", "--pid=host", "--network=host"]
# A host process the serve in the container must find by its host pid.
SLEEPER = "atimg-sleeper"


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


@pytest.fixture(scope="module")
def image(backend: str) -> str:
    if os.environ.get("ANONTRACE_GUEST"):
        pytest.skip("the image is built and run on the host: the QEMU guests have no podman "
                    "and no package archive to build from")
    if backend != "auto":
        pytest.skip("the image makes its own automatic choice of backend: it runs in the "
                    f"auto pass, not {backend}")
    if shutil.which("podman") is None:
        pytest.fail("podman missing: run scripts/install.sh --test")
    start = time.monotonic()
    built = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=900, env=ENV)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    ref = built.stdout.strip().splitlines()[-1]
    assert ref == f"localhost/anontrace:{tracer.__version__}", built.stdout[-2000:]
    print(f"build-image.sh: {time.monotonic() - start:.0f} s")
    latest = _podman("image", "inspect", "--format", "{{.Id}}", ref, "localhost/anontrace:latest")
    assert latest.returncode == 0 and len(set(latest.stdout.split())) == 1, latest
    return ref


def test_check_in_the_image(image: str) -> None:
    out = subprocess.run([*RUN, image, "check", "--json"], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["kernel"] == os.uname().release
    assert report["backend"] in ("fentry", "kprobe", "tracepoint"), report["backends"]
    assert [p["probe"] for p in report["probes"]] == list(LOGICAL_PROBES)
    assert all(p["method"] for p in report["probes"][:3]), report["probes"]
    # The image's own headers (Debian 12's, merged when the image was built)
    # unless the kernel is the very one they were built for.
    assert report["headers"]["path"].startswith(("/var/cache/anontrace/headers/",
                                                  "/lib/modules/")), report["headers"]


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = tmp_path / SLEEPER
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "600"])
    yield proc
    proc.kill()
    proc.wait()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


def test_serve_in_the_image(image: str, tmp_path: Path,
                            sleeper: subprocess.Popen[bytes]) -> None:
    config = tmp_path / "anontrace.yaml"
    config.write_text(f'top_k: 5\nselection:\n  comm: "^{SLEEPER}$"\n')
    port = free_port()
    name = f"anontrace-test-{os.getpid()}"
    log = open(tmp_path / "serve.log", "w+b")
    proc = subprocess.Popen(
        [*RUN, "--name", name, "-v", f"{config}:/etc/anontrace/anontrace.yaml:ro", image,
         "serve", "--config", "/etc/anontrace/anontrace.yaml", "--listen", f"127.0.0.1:{port}",
         "--user", "nobody"],   # as the DaemonSet runs it
        stdout=log, stderr=subprocess.STDOUT, env=ENV)

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read().decode(errors="replace")[-4000:]

    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 120
        mine: list[tuple[dict[str, str], float]] = []
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {output()}"
            assert time.monotonic() < deadline, f"no host process series in time: {output()}"
            try:
                text = http_get(url).decode()
            except OSError:
                time.sleep(0.5)
                continue
            # The selected host process, by its host pid: the census and
            # /proc in the container see the host's processes.
            mine = [(lab, v) for lab, v in _samples(text, "anontrace_process_anon_vmas")
                    if lab["pid"] == str(sleeper.pid)]
            if mine:
                break
            time.sleep(0.5)
        assert mine[0][0]["comm"] == SLEEPER and mine[0][1] > 0, mine
        build = _samples(text, "anontrace_build_info")
        assert build and build[0][0]["kernel"] == os.uname().release, build
        assert build[0][0]["version"] == tracer.__version__
        assert {lab["probe"] for lab, _ in _samples(text, "anontrace_probe_attached")} \
            == set(PROBES)
        assert _samples(text, "anontrace_tracked_processes")[0][1] > 0
        assert "privileges dropped" in output() and "user=nobody" in output(), output()
        assert _samples(text, "anontrace_anon_vmas")[0][1] > 10
        # The container's main process is serve, seen with its host pid.
        inspect = _podman("inspect", "--format", "{{.State.Pid}}", name)
        assert inspect.returncode == 0, inspect.stderr
        ours = held_prog_ids(int(inspect.stdout.strip()))
        assert ours, "serve in the container loaded no BPF program"

        # SIGTERM through podman stop: serve is not PID 1 (host PID
        # namespace), so it gets the signal as on the host.
        start = time.monotonic()
        stopped = _podman("stop", "--time", "30", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        rc = proc.wait(timeout=60)
        took = time.monotonic() - start
        assert rc == 0, output()
        assert took < 10, f"podman stop took {took:.1f} s: {output()}"
        assert_released(ours, "after podman stop")
    finally:
        if proc.poll() is None:
            _podman("rm", "-f", name)
            proc.wait(timeout=60)
        log.close()
