"""Rmap width: how many VMAs an rmap walk of an anon_vma's pages may visit.

The rmap width of an anon_vma is the number of anon_vma_chain entries naming
it, i.e. the VMAs in its interval tree. Reusing anon_vmas (compat:
anon_vma_degree, the fix for runaway hierarchies) bounds their number but
widens these trees with VMAs that can never map a given page ("false
aliasing"); the hierarchy exists to keep this number small.

This module is pure: it turns one rmap census (tracer.kernel.rmap_census,
or a recorded one in the tests) into per-anon_vma, per-process and
per-family figures. A process's figures cover the anon_vmas its VMAs point
at (``vma->anon_vma``): their largest width and the sum of their widths.
A family (the anon_vmas under the roots one process created) is named here
by the process whose VMA points at the root, which is its creator while the
creator lives.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

# A corrupt or concurrently rewritten parent chain must not loop forever.
_MAX_DEPTH = 1 << 16


@dataclass(frozen=True)
class AnonVmaRmap:
    """One anon_vma as the census found it."""

    anon_vma: int
    parent: int
    root: int
    width: int        # anon_vma_chain entries naming it (VMAs in its interval tree)
    active: int       # VMAs pointing at it
    owner: int        # a process with a VMA pointing at it, 0 if none (orphaned)
    children: int     # the kernel's child count (fan-out)


@dataclass(frozen=True)
class ChainLink:
    """One chain entry of a target process's VMA."""

    tgid: int
    vm_start: int
    vm_end: int
    anon_vma: int     # the VMA's own anon_vma
    chain_av: int     # the anon_vma this entry links the VMA to
    index: int        # position in the VMA's chain, newest first


@dataclass(frozen=True)
class RmapFigures:
    """Rmap width figures of a process or a family."""

    anon_vmas: int
    max_width: int
    total_width: int


@dataclass
class RmapSnapshot:
    """One rmap census of the host."""

    anon_vmas: dict[int, AnonVmaRmap] = field(default_factory=dict)
    links: list[ChainLink] = field(default_factory=list)
    vmas: int = 0               # VMAs counted
    chain_entries: int = 0      # chain entries counted
    truncated_chains: int = 0   # chains longer than the walk's bound: widths undercount
    refused: int = 0            # anon_vmas the full map could not hold
    seconds: float = 0.0        # what the census took
    # The kernel's fan-out counter (tracer.kernel.compat.anon_vma_counters):
    # "num_children" counts a root's link to itself too; "degree" counts
    # child anon_vmas and VMAs together.
    counters: str = "num_children"

    @property
    def complete(self) -> bool:
        """Whether every chain entry was counted."""
        return not (self.truncated_chains or self.refused)

    def child_anon_vmas(self, a: AnonVmaRmap) -> int:
        """``a``'s child anon_vmas as README "Definitions" counts them (a
        root's self-link left out); the kernel's degree in the degree era."""
        if self.counters == "num_children" and a.root == a.anon_vma and a.children:
            return a.children - 1
        return a.children

    def depth(self, av: int) -> int:
        """Levels from ``av`` up to its root (a root is 1); 0 if unknown."""
        a = self.anon_vmas.get(av)
        depth = 0
        seen = 0
        while a is not None and seen < _MAX_DEPTH:
            depth += 1
            seen += 1
            if a.parent in (0, a.anon_vma):
                return depth
            a = self.anon_vmas.get(a.parent)
        return depth

    @cached_property
    def processes(self) -> dict[int, RmapFigures]:
        """Per process: the anon_vmas its VMAs point at, their largest and
        their summed width."""
        return _group(self.anon_vmas.values(), lambda a: a.owner)

    @cached_property
    def families(self) -> dict[int, RmapFigures]:
        """Per family, named by the process whose VMA points at its root:
        every anon_vma under that root."""
        owner_of_root = {a.anon_vma: a.owner for a in self.anon_vmas.values()
                         if a.root == a.anon_vma}
        return _group(self.anon_vmas.values(), lambda a: owner_of_root.get(a.root, 0))

    @property
    def max_width(self) -> int:
        """The widest anon_vma on the host."""
        return max((a.width for a in self.anon_vmas.values()), default=0)

    def links_of(self, tgid: int) -> list[ChainLink]:
        """The chain entries of ``tgid``'s VMAs, by address then chain position."""
        return sorted((lk for lk in self.links if lk.tgid == tgid),
                      key=lambda lk: (lk.vm_start, lk.index))


def _group(avs: Iterable[AnonVmaRmap], key: Callable[[AnonVmaRmap], int]
           ) -> dict[int, RmapFigures]:
    """Figures per ``key`` (0, no owner, is left out)."""
    acc: dict[int, list[int]] = {}
    for a in avs:
        k = key(a)
        if not k:
            continue
        f = acc.get(k)
        if f is None:
            acc[k] = [1, a.width, a.width]
        else:
            f[0] += 1
            f[1] = max(f[1], a.width)
            f[2] += a.width
    return {k: RmapFigures(n, mx, tot) for k, (n, mx, tot) in acc.items()}
