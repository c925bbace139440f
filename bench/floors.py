"""Floors for bench/fork_overhead.py: what the hooks, and the cheapest
design that keeps per-object state in maps, cost a fork here.

``empty`` and ``floor`` attach to the tracepoint backend's hooks
(bench/bpf/floor_kmem.bpf.c), ``empty-fentry`` and ``floor-fentry`` to the
fentry backend's (bench/bpf/floor_fentry.bpf.c), ``empty-kprobe`` and
``floor-kprobe`` to the kprobe backend's (bench/bpf/floor_kprobe.bpf.c);
bench/bpf/floor_common.h holds what they share. The empty ones return at
once: no tracer on those hooks can do better. The floor ones keep only an
owner per object and a count per process (see the C files): any tracer whose
programs keep per-object state in maps, as anontrace's state design does,
pays at least that on these hooks. They report nothing but the objects they
owned; they are yardsticks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parent / "bpf"


@dataclass(frozen=True)
class Floor:
    backend: str  # whose hooks it takes (tracer.kernel.probes.BACKENDS)
    empty: bool   # programs that return at once
    summary: str  # what its ratio means, for the summary

    @property
    def source(self) -> str:
        """Its file under bench/bpf/."""
        return f"floor_{'kmem' if self.backend == 'tracepoint' else self.backend}.bpf.c"


FLOORS = {
    "empty": Floor("tracepoint", True,
                   "the tracepoint backend's hooks with empty programs: no tracer built "
                   "on these hooks can do better here"),
    "floor": Floor("tracepoint", False,
                   "the same hooks keeping only an owner per rmap object and a count per "
                   "process: the least a design with per-object state in maps pays here"),
    "empty-fentry": Floor("fentry", True, "the fentry backend's hooks with empty programs"),
    "floor-fentry": Floor("fentry", False,
                          "the fentry backend's hooks keeping only an owner per anon_vma, "
                          "the VMAs that hold one and a count per process"),
    "empty-kprobe": Floor("kprobe", True, "the kprobe backend's hooks with empty programs"),
    "floor-kprobe": Floor("kprobe", False,
                          "the kprobe backend's hooks keeping only an owner per anon_vma, "
                          "the VMAs that hold one and a count per process"),
}


class FloorError(Exception):
    """A floor cannot be built on this kernel."""


def floor_plan(name: str, facts: Any) -> Any:
    """The tool's own probe plan for the floor's backend: the same call
    sites and functions the tool would use here."""
    from tracer.kernel.probes import plan_backend

    plan = plan_backend(FLOORS[name].backend, facts.kallsyms, facts.btf,
                        facts.kprobes_available)
    if plan.backend != "tracepoint":
        for probe, choice in plan.probes.items():
            if not choice.ok:
                raise FloorError(f"{name}: {probe}: {choice.reason}")
    return plan


def floor_cflags(name: str, plan: Any, facts: Any) -> list[str]:
    """Every substitution into the floor's C file, as -D flags."""
    from tracer.kernel.bpf_source import site_defines

    d = site_defines(plan)
    if FLOORS[name].empty:
        d["EMPTY"] = "1"
    if plan.backend != "tracepoint":
        d["RMAP_HOOKS"] = "1"   # floor_common.h: the VMAs are held
        d["RMAP_FUNC"] = plan.probes["page_set_anon_rmap"].function
        d["OFF_VMA_ANON_VMA"] = str(facts.layout.offsets["VMA_ANON_VMA"])
    # No warnings from BCC's headers, but a call to a function the text does
    # not define (an #ifdef gone wrong) fails here, not at load.
    return ([f"-D{k}={v}" for k, v in sorted(d.items())] +
            ["-Wno-everything", "-Werror=implicit-function-declaration"])


def objects_owned(b: Any) -> int:
    """Objects the floor's programs gave an owner (0 for an empty floor):
    proof that a floor did its work."""
    try:
        table = b["owned"]
    except KeyError:
        return 0
    return sum(sum(v) for v in table.values())


def floor_text(floor: Floor) -> str:
    """The program: floor_common.h, then the floor's own file. Joined, not
    #included: BCC turns ``map.lookup()`` into helper calls only in the text
    it is given."""
    return "".join((BPF_DIR / f).read_text() for f in ("floor_common.h", floor.source))


def load_floor(bcc: Any, name: str, facts: Any) -> Any:
    """Compile and attach the floor's programs; the caller cleans up the
    object returned (on an error nothing is left attached)."""
    from tracer.kernel.bcc_glue import captured_stderr, load_error
    from tracer.kernel.bpf_session import KPROBE_FUNCS, KRETPROBE_MAXACTIVE

    plan = floor_plan(name, facts)
    b = None
    captured: list[str] = []
    try:
        with captured_stderr(captured):
            b = bcc.BPF(text=floor_text(FLOORS[name]).encode(),
                        cflags=floor_cflags(name, plan, facts))
            if plan.backend == "kprobe":   # attached as the tool attaches them
                for probe, (entry, ret) in KPROBE_FUNCS.items():
                    event = plan.probes[probe].function.encode()
                    b.attach_kprobe(event=event, fn_name=entry.encode())
                    if ret:
                        b.attach_kretprobe(event=event, fn_name=ret.encode(),
                                           maxactive=KRETPROBE_MAXACTIVE)
        return b
    except Exception as exc:  # BCC raises bare Exception on load/attach errors
        if b is not None:
            b.cleanup()
        raise FloorError(f"{name}: {load_error(exc, captured)}") from exc
