"""One truth, two paths: the figures the BPF programs keep in maps equal
the figures the Python model (the reference, what `replay` runs) rebuilds
from a recording of the same run, process by process, while the family is
alive and after it exited.

The family is traced with both the state maps and the event stream on; the
raw stream is recorded as `anontrace record` would and replayed afterwards
(decode, the tracepoint backend's derivation, the model).
"""
from __future__ import annotations

from typing import Any

from tests.kernel.family import FamilyRun, run_family
from tracer.format.events import decode_many
from tracer.kernel.kstate import KernelState
from tracer.model.hierarchy import Model
from tracer.model.types import ProcessFigures
from tracer.pipeline.derive import Deriver

REGIONS = 3
GENERATIONS = 3


def _replay(blob: bytes, backend: str) -> Model:
    model = Model()
    events = decode_many(blob)
    if backend == "tracepoint":
        d = Deriver()
        events = d.feed(events) + d.flush()
    model.apply_all(events)
    return model


def _figures(f: ProcessFigures) -> dict[str, Any]:
    return {"anon_vmas": f.anon_vmas, "anon_vma_chains": f.anon_vma_chains,
            "max_depth": f.max_depth, "max_degree": f.max_degree,
            "max_chain": f.max_chain, "events": f.events}


def test_maps_equal_the_replayed_recording(forkchain_bin, backend) -> None:
    blobs: list[bytes] = []
    seen: dict[str, Any] = {}

    def snapshot(run: FamilyRun, session) -> None:
        seen["alive"] = (KernelState.decode(session.read_state()), b"".join(blobs))

    def at_end(run: FamilyRun, session) -> None:
        seen["end"] = (KernelState.decode(session.read_state()), b"".join(blobs))

    run = run_family(forkchain_bin, backend, REGIONS, GENERATIONS, while_alive=snapshot,
                     object_events=False, state=True, recorder=blobs.append, at_end=at_end)
    assert run.lost.get("output_full", 0) == 0, run.lost
    backend_used = run.probes["anon_vma_fork"][1]

    state, blob = seen["alive"]
    model = _replay(blob, backend_used)
    for g in range(GENERATIONS + 1):
        pid = run.gens[g].pid
        row = state.processes[pid]
        assert row.alive
        proc = model.processes[pid]
        assert _figures(row.figures) == _figures(model.figures(proc)), f"generation {g}"
    assert state.totals() == model.totals()
    assert state.globals.map_full_total == 0 and state.globals.anomalies == 0

    state, blob = seen["end"]
    model = _replay(blob, backend_used)
    retired = {p.pid: p for p in model.retired}
    for g in range(GENERATIONS + 1):
        pid = run.gens[g].pid
        row = state.processes[pid]
        assert not row.alive
        assert _figures(row.figures) == _figures(model.figures(retired[pid])), f"gen {g} at exit"
    assert state.totals() == model.totals() == {"anon_vmas": 0, "anon_vma_chains": 0,
                                                "orphaned_anon_vmas": 0}
