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

from dataclasses import dataclass, field, replace
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
    def _summary(self) -> RmapSummary:
        acc = SummaryBuilder()
        for a in self.anon_vmas.values():
            acc.add(a.anon_vma, a.root, a.width, a.owner)
        return acc.build()

    def summary(self) -> RmapSummary:
        """The per-process and per-family figures and the host's widest
        anon_vma, without the anon_vmas themselves (what `serve` keeps)."""
        return replace(self._summary, seconds=self.seconds,
                       truncated_chains=self.truncated_chains, refused=self.refused)

    @property
    def processes(self) -> dict[int, RmapFigures]:
        """Per process: the anon_vmas its VMAs point at, their largest and
        their summed width."""
        return self._summary.processes

    @property
    def families(self) -> dict[int, RmapFigures]:
        """Per family, named by the process whose VMA points at its root:
        every anon_vma under that root."""
        return self._summary.families

    @property
    def max_width(self) -> int:
        """The widest anon_vma on the host."""
        return self._summary.max_width

    def links_of(self, tgid: int) -> list[ChainLink]:
        """The chain entries of ``tgid``'s VMAs, by address then chain position."""
        return sorted((lk for lk in self.links if lk.tgid == tgid),
                      key=lambda lk: (lk.vm_start, lk.index))


@dataclass(frozen=True)
class RmapSummary:
    """What the exporter keeps of one census: the figures it exports. A
    host's hundreds of thousands of anon_vmas are not kept between censuses
    (they were most of `serve`'s memory)."""

    processes: dict[int, RmapFigures]
    families: dict[int, RmapFigures]
    max_width: int = 0
    seconds: float = 0.0
    truncated_chains: int = 0
    refused: int = 0

    @property
    def complete(self) -> bool:
        """Whether every chain entry was counted."""
        return not (self.truncated_chains or self.refused)


class SummaryBuilder:
    """Accumulates :class:`RmapSummary` figures one anon_vma at a time, so a
    census can be summed as it is read, without an object per anon_vma.

    A process's figures cover the anon_vmas it owns; a family's, every
    anon_vma under the roots its process owns (0, no owner, is left out)."""

    def __init__(self) -> None:
        self._owners: dict[int, list[int]] = {}   # owner -> [n, max, total]
        self._roots: dict[int, list[int]] = {}    # root -> [n, max, total]
        self._root_owner: dict[int, int] = {}
        self.max_width = 0

    def add(self, anon_vma: int, root: int, width: int, owner: int) -> None:
        """One anon_vma of the census."""
        if width > self.max_width:
            self.max_width = width
        if owner:
            _add(self._owners, owner, width)
            if root == anon_vma:
                self._root_owner[anon_vma] = owner
        _add(self._roots, root, width)

    def build(self, seconds: float = 0.0, truncated_chains: int = 0,
              refused: int = 0) -> RmapSummary:
        """The summary of what was added, with the census's own counts."""
        fams: dict[int, list[int]] = {}
        for root, (n, mx, tot) in self._roots.items():
            owner = self._root_owner.get(root, 0)
            if owner:
                _add(fams, owner, mx, n, tot)
        return RmapSummary(processes=_figures(self._owners), families=_figures(fams),
                           max_width=self.max_width, seconds=seconds,
                           truncated_chains=truncated_chains, refused=refused)


def _add(acc: dict[int, list[int]], key: int, width: int, n: int = 1,
         total: int | None = None) -> None:
    """Add ``n`` anon_vmas of largest width ``width`` and summed width
    ``total`` (one anon_vma by default) to ``key``'s [n, max, total]."""
    total = width if total is None else total
    f = acc.get(key)
    if f is None:
        acc[key] = [n, width, total]
    else:
        f[0] += n
        if width > f[1]:
            f[1] = width
        f[2] += total


def _figures(acc: dict[int, list[int]]) -> dict[int, RmapFigures]:
    return {k: RmapFigures(n, mx, tot) for k, (n, mx, tot) in acc.items()}
