"""Kernel tests load real BPF programs: they need root and a BPF-capable kernel."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import test_backend


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # In the QEMU guests "auto" resolves to fentry, whose pass runs every
    # test already: the auto pass runs only what is about the automatic
    # choice (CI time budget: each guest pass costs about ten minutes).
    # In the guests' kprobe pass, tests of what does not depend on the attach
    # method (user-space logic, map handling shared by every backend) are left
    # to the fentry pass; kprobe runs what its own programs decide.
    guest = bool(os.environ.get("ANONTRACE_GUEST"))
    guest_auto = guest and test_backend() == "auto"
    guest_kprobe = guest and test_backend() == "kprobe"
    skip_auto = pytest.mark.skip(reason="in the guests auto resolves to fentry: the fentry pass "
                                 "runs this test (CI time budget)")
    skip_kprobe = pytest.mark.skip(reason="does not depend on the attach method: the guests' "
                                   "fentry pass runs it (CI time budget)")
    here = Path(__file__).parent
    for item in items:
        # The hook sees every collected test of the session, not only ours.
        if here not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.kernel)
        if guest_auto and item.get_closest_marker("auto_pass") is None:
            item.add_marker(skip_auto)
        elif guest_kprobe and item.get_closest_marker("method_agnostic") is not None:
            item.add_marker(skip_kprobe)


@pytest.fixture(autouse=True, scope="session")
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests load BPF programs and must run as root")
