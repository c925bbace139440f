"""One wire format: ``struct event`` as the compiled program has it (the BTF
BCC loads with it) is what tracer.format.events.WIRE_FIELDS says, member by member,
so that neither side can change alone."""
from __future__ import annotations

import json
import subprocess

import pytest

from tracer.format.events import WIRE, wire_layout
from tracer.kernel.bpf_session import TraceOptions, TraceSession
from tracer.kernel.btf import load_btf_id

pytestmark = pytest.mark.method_agnostic


def _btf_ids(prog_ids: list[int]) -> set[int]:
    out = set()
    for pid in prog_ids:
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)],
                                         capture_output=True, text=True, check=True).stdout)
        if info.get("btf_id"):
            out.add(int(info["btf_id"]))
    return out


def test_struct_event_matches_the_python_wire_format(backend) -> None:
    with TraceSession(TraceOptions(backend=backend)) as session:
        prog_ids = session.program_ids()
        assert prog_ids, "the session loaded no program"
        btf_ids = _btf_ids(prog_ids)
        assert btf_ids, f"programs {prog_ids} were loaded without BTF"
        # All the programs come from one object, so one BTF.
        assert len(btf_ids) == 1, btf_ids
        btf = load_btf_id(btf_ids.pop())
    c_side = [(m.name, m.offset, m.size) for m in btf.members("event")]
    assert c_side == wire_layout(), (
        "struct event (bpf_programs/anontrace_common.h) and "
        "tracer.format.events.WIRE_FIELDS differ:\n"
        f"  C:      {c_side}\n  Python: {wire_layout()}")
    assert btf.struct_size("event") == WIRE.size
