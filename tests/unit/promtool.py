"""Run Debian's promtool for the rules, dashboards and deploy tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run promtool (from the repository root by default); fail, not skip,
    when it is missing: the test install provides it."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run scripts/install.sh --test, which installs "
                    "Debian's prometheus package (it provides promtool)")
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
