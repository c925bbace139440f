"""The model's vocabulary: what it reports (snapshots of anon_vmas and VMAs,
processes, per-process figures) and how it packs a VMA into one int."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tracer.format.events import LOGICAL_KINDS

MAX_RETIRED = 100_000  # exited processes kept for the final report
PROBE_INDEX = {kind: i for i, kind in enumerate(LOGICAL_KINDS)}
PROBE_NAMES = tuple(LOGICAL_KINDS.values())

AV_ID = 0xFFFF_FFFF            # low 32 bits of a packed value: the anon_vma id
NO_AV = AV_ID                  # the id of "no anon_vma" in a VMA's packed value
CHAIN_SHIFT = 32               # packed VMA value: id | chain << CHAIN_SHIFT
CENSUS_MISSING_REASON = "no census of pre-existing VMAs"


@dataclass(frozen=True, slots=True)
class AnonVmaInfo:
    """What the model knows of one live anon_vma (a snapshot)."""

    ptr: int
    parent: int | None    # parent's pointer; None: a root, or not known yet
    parent_live: bool     # the parent is the live anon_vma at ``parent``, which
                          # counts this one among its children (False for a
                          # parent allocated before tracing, or freed since)
    root: int | None      # root's pointer (itself for a root); None: not known yet
    depth: int            # 0: not known yet
    children: int         # live child anon_vmas (the root's self-link excluded)
    active: int           # VMAs whose vma->anon_vma is this one
    mm: int | None        # pointer of the mm it was created for; None: unknown
    serial: int           # creation number: same ptr and serial, same anon_vma


class VmaInfo(NamedTuple):
    """A VMA that has (or had) an anon_vma."""

    anon_vma: int | None  # pointer of vma->anon_vma; None: none (or detached)
    chain: int            # anon_vma_chain entries
    mm: int               # the mm pointer


class Mm:
    """An address space, its VMAs and the probe events attributed to it.

    ``vmas`` is internal (VMA pointer -> packed value): read it
    through :meth:`Model.mm_vmas`."""

    __slots__ = ("ptr", "tgid", "users", "vmas", "events")

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.tgid = 0
        # Live processes whose mm this is: more than one after a vfork or a
        # clone(CLONE_VM) without CLONE_THREAD, until the child's exec or exit.
        self.users = 0
        self.vmas: dict[int, int] = {}
        self.events = [0, 0, 0, 0]


@dataclass
class Process:
    """A traced process (tgid)."""

    pid: int
    ppid: int = 0
    comm: str = ""
    alive: bool = True
    mm: Mm | None = None
    mms: list[Mm] = field(default_factory=list)
    preexisting: bool = False   # running before tracing began: its state is partial
    exited_ts: int = 0
    at_exit: ProcessFigures | None = None  # figures when its exit was seen
    exiting: bool = False       # its mm teardown at exit began (at_exit taken then)


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    """The per-process figures (README "Definitions")."""

    anon_vmas: int
    anon_vma_chains: int
    max_depth: int
    max_degree: int
    max_chain: int
    events: dict[str, int]
