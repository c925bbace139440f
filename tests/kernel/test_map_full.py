"""Bounded maps are honest when full: an insert a full state map refuses is
counted for that map, and the report says partial, naming it."""
from __future__ import annotations

import os
import subprocess

import pytest

from tracer.kernel.bpf_session import TraceOptions, TraceSession
from tracer.kernel.bpf_source import MapSizes
from tracer.kernel.kstate import KernelState


@pytest.mark.method_agnostic
def test_a_full_map_is_counted_and_named(backend) -> None:
    if os.environ.get("ANONTRACE_GUEST") and backend != "fentry":
        pytest.skip("the map code is the same on every backend: in the guests the fentry "
                    "pass runs it (CI time budget)")
    # Room for 64 anon_vmas: the census of every process overflows it.
    sizes = MapSizes(anon_vmas=64)
    with TraceSession(TraceOptions(backend=backend, events=False, state=True,
                                   map_sizes=sizes)) as session:
        assert session.uses_state
        missing = session.state_census()
        for _ in range(5):
            subprocess.run(["/bin/true"], check=True)
        state = KernelState.decode(session.read_state())
    full = state.globals.map_full
    assert full["anon_vmas"] > 0, (full, missing)
    assert state.globals.anon_vmas <= 64
    assert {k for k, v in full.items() if v} <= {"anon_vmas"}, full
    reasons = state.partial_reasons()
    assert any("state maps full (anon_vmas " in r for r in reasons), reasons
