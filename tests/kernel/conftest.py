"""Kernel tests load real BPF programs: they need root and a BPF-capable kernel."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True, scope="session")
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests load BPF programs and must run as root")
