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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parent / "bpf"


@dataclass(frozen=True)
class Floor:
    source: str   # file under bench/bpf/
    empty: bool   # programs that return at once
    summary: str  # what its ratio means, for the summary

    @property
    def hooks(self) -> str:
        """The backend whose hooks it uses: kmem, fentry or kprobe."""
        return self.source.removeprefix("floor_").removesuffix(".bpf.c")


FLOORS = {
    "empty": Floor("floor_kmem.bpf.c", True,
                   "the tracepoint backend's hooks with empty programs: no tracer built "
                   "on these hooks can do better here"),
    "floor": Floor("floor_kmem.bpf.c", False,
                   "the same hooks keeping only an owner per rmap object and a count per "
                   "process: the least a design with per-object state in maps pays here"),
    "empty-fentry": Floor("floor_fentry.bpf.c", True,
                          "the fentry backend's hooks with empty programs"),
    "floor-fentry": Floor("floor_fentry.bpf.c", False,
                          "the fentry backend's hooks keeping only an owner per anon_vma, "
                          "the VMAs that hold one and a count per process"),
    "empty-kprobe": Floor("floor_kprobe.bpf.c", True,
                          "the kprobe backend's hooks with empty programs"),
    "floor-kprobe": Floor("floor_kprobe.bpf.c", False,
                          "the kprobe backend's hooks keeping only an owner per anon_vma, "
                          "the VMAs that hold one and a count per process"),
}

# kprobe floors: the functions the tool's kprobe backend attaches (entry,
# return) per rmap function; None: the rmap probe, resolved per kernel.
KPROBES = {"anon_vma_fork": ("kp_fork_entry", "kr_fork_exit"),
           "anon_vma_clone": ("kp_clone_entry", "kr_clone_exit"),
           "unlink_anon_vmas": ("kp_unlink_entry", None),
           None: ("kp_rmap_entry", None)}
KRETPROBE_MAXACTIVE = 512   # as the tool's


class FloorError(Exception):
    """A floor cannot be built on this kernel."""


def rmap_function(name: str, facts: Any) -> str:
    """The first of the tool's rmap candidates this kernel has."""
    from tracer.kernel.compat import RMAP_CANDIDATES

    rmap = next((f for f in RMAP_CANDIDATES if f in facts.kallsyms), None)
    if rmap is None:
        raise FloorError(f"{name}: none of {', '.join(RMAP_CANDIDATES)} in kallsyms")
    return rmap


def floor_cflags(name: str, facts: Any) -> list[str]:
    """Every substitution into the floor's C file, as -D flags."""
    from tracer.kernel.probes import KMEM_OTHER_SITES, KMEM_SITES

    floor = FLOORS[name]
    d: dict[str, str] = {}
    if floor.empty:
        d["EMPTY"] = "1"
    for key, fn in KMEM_SITES.items():
        sym = facts.kallsyms.get(fn)
        # A missing site gets an empty range: nothing matches it.
        d[f"SITE_{key}_START"] = f"{sym.start:#x}ULL" if sym else "1ULL"
        d[f"SITE_{key}_END"] = f"{sym.end:#x}ULL" if sym else "0ULL"
    other = next((s for s in map(facts.kallsyms.get, KMEM_OTHER_SITES) if s), None)
    d["SITE_OTHER_START"] = f"{other.start:#x}ULL" if other else "1ULL"
    d["SITE_OTHER_END"] = f"{other.end:#x}ULL" if other else "0ULL"
    if floor.hooks != "kmem":
        if facts.layout is None:
            raise FloorError(f"{name}: no BTF layout")
        d["RMAP_HOOKS"] = "1"   # floor_common.h: the VMAs are held
        d["RMAP_FUNC"] = rmap_function(name, facts)
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
    floor = FLOORS[name]
    b = None
    try:
        b = bcc.BPF(text=floor_text(floor).encode(), cflags=floor_cflags(name, facts))
        if floor.hooks == "kprobe":
            for fn, (entry, ret) in KPROBES.items():
                event = (fn or rmap_function(name, facts)).encode()
                b.attach_kprobe(event=event, fn_name=entry.encode())
                if ret:
                    b.attach_kretprobe(event=event, fn_name=ret.encode(),
                                       maxactive=KRETPROBE_MAXACTIVE)
        return b
    except FloorError:
        if b is not None:
            b.cleanup()
        raise
    except Exception as exc:  # BCC raises bare Exception on load/attach errors
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "super-user" in detail and os.geteuid() == 0:
            # BCC words EPERM as "Need super-user privileges" even for root.
            detail = ("the kernel refused to load it although we are root "
                      "(EPERM: lockdown or an LSM)")
        if b is not None:
            b.cleanup()
        raise FloorError(f"{name}: {detail}") from exc
