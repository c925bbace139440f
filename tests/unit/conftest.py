"""Unit tests: pure logic fed with recorded kernel fixtures; no BPF, no root."""
from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _keep_sigterm_handler() -> Iterator[None]:
    # `anontrace events` turns SIGTERM into KeyboardInterrupt for the whole
    # process; do not let that leak into the test runner.
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)
