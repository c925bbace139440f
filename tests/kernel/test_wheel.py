"""The wheel works as users install it: built from the checkout, installed
(not editable) into a fresh venv that sees Debian's python3-bpfcc, and run
from outside the checkout, the BPF sources and the man page come with it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.stack import ROOT
from tracer.kernel.probes import LOGICAL_PROBES

pytestmark = pytest.mark.method_agnostic

SYSTEM_PYTHON = "/usr/bin/python3"   # Debian's, which sees python3-bpfcc


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, backend) -> Path:
    if os.environ.get("ANONTRACE_GUEST"):
        pytest.skip("the wheel is built and installed on the host (the guests share its "
                    "user space; installing needs the package index)")
    if backend != "auto":
        pytest.skip("packaging does not depend on the backend: runs in the auto pass, "
                    f"not {backend}")
    tmp = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp / "dist"), str(ROOT)], cwd=tmp)
    assert built.returncode == 0, built.stderr
    wheels = list((tmp / "dist").glob("anontrace-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    made = _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    pip = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])], cwd=tmp)
    assert pip.returncode == 0, pip.stderr
    return venv


def test_installed_package_is_not_the_checkout(installed: Path) -> None:
    out = _run([str(installed / "bin" / "python"), "-c",
                "import tracer.kernel.bpf_source as s; print(s.MAIN_PROGRAM)"],
               cwd=installed.parent)
    assert out.returncode == 0, out.stderr
    program = Path(out.stdout.strip())
    assert program.is_file() and installed in program.parents, program
    assert ROOT not in program.parents
    assert (installed / "share" / "man" / "man8" / "anontrace.8").is_file()


def test_check_json_from_the_wheel(installed: Path) -> None:
    out = _run([str(installed / "bin" / "anontrace"), "check", "--json"], cwd=installed.parent)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [p["probe"] for p in report["probes"]] == list(LOGICAL_PROBES)
    assert all(p["method"] for p in report["probes"][:3]), report["probes"]


def test_command_run_from_the_wheel(installed: Path) -> None:
    out = _run([str(installed / "bin" / "anontrace"), "--json", "--", "/bin/true"],
               cwd=installed.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    final = reports[-1]
    assert final["final"] and final["lost_events"] == 0 and not final["partial"], final
    # /bin/true was run, traced, and has exited.
    assert any(p["comm"] == "true" and not p["alive"] for p in final["processes"]), final
