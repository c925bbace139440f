"""What if forks chose anon_vmas by another rule? One simulated hierarchy.

When ``fork()`` copies a VMA that has an anon_vma, ``anon_vma_fork()`` links
the child VMA to every anon_vma of the parent VMA's chain, then gives it an
anon_vma of its own: a new one (a new hierarchy level), or, by the *reuse
rule*, one already in the chain. A :class:`World` replays the VMA operations
of a recording (tracer.model.reuse_stream turns events into them) under one
rule, keeping the chains as ordered lists of simulated anon_vmas:

``kernel``
    The kernel's rule since commit 7a3ef208e662 ("mm: prevent endless
    growth of anon_vma hierarchy"; compat key ``anon_vma_degree``), with the
    counters of commit 2555283eb40d (``anon_vma_num_children``): walking
    the chain from the oldest entry (the root) to the newest, the first
    anon_vma with no VMA pointing at it (``num_active_vmas == 0``) and fewer
    than two children (``num_children < 2``, the root's link to itself
    included) is reused. Before the second commit one counter, ``degree``,
    stood for both; that variant is not simulated.
``none``
    No reuse, as before the first commit: every forked VMA gets a new
    anon_vma. A process that forks and exits, generation after generation
    (the 2012 report "Repeated fork() causes SLAB to grow without bound"),
    adds a level per generation that is never freed.
``single-child``
    Looser than the kernel: the first anon_vma of the chain (never the root)
    with fewer than two children is reused even while VMAs still point at
    it. Fewer anon_vmas and shallower hierarchies, but more VMAs share each
    anon_vma: an rmap walk of a page visits every VMA linked to the page's
    anon_vma (its interval tree), so pages are falsely aliased more widely.

Only the anon_vma a forked VMA gets depends on the rule. Which VMAs exist,
and which of them share a root, is the recording's: splits and ``mremap``
copies (``anon_vma_clone``) copy the source's chain and anon_vma, a first
fault (``__anon_vma_prepare``) makes a root with one chain entry, or links
the VMA to a neighbour's root, and ``unlink_anon_vmas`` drops the VMA's
entries, freeing each anon_vma whose interval tree empties (the kernel's
``put_anon_vma``: nothing else holds a non-root anon_vma, and a root outlives
its tree only while a descendant lives, whose VMAs are in the root's tree).

The ``kernel`` world is checked against the recording at every fork: each
recorded anon_vma is bound to the simulated one it must be, and a fork where
the kernel chose otherwise is counted in ``divergences`` and followed as
recorded, so that the figures stay those of the recording. A VMA whose chain
the events do not reveal (a census of processes already running gives chains
as lengths only; lost events) is *adopted*: its own anon_vma as recorded,
the rest of its chain as entries of unknown anon_vmas, counted in the chain
totals but in no rmap width. Any adoption makes the figures partial.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RULES = ("kernel", "none", "single-child")

#: a VMA is named by (mm pointer, VMA pointer), as the recording names it
VmaKey = tuple[int, int]


class SimAnonVma:
    """One simulated anon_vma."""

    __slots__ = ("serial", "parent", "root", "depth", "children", "active", "width", "rec",
                 "known")

    def __init__(self, serial: int, parent: SimAnonVma | None, depth: int, rec: int,
                 known: bool = True) -> None:
        self.serial = serial
        self.parent = parent      # None: a root, or (known=False) not known
        self.root = parent is None and known
        self.depth = depth        # root = 1
        self.children = 0         # live child anon_vmas (the root's self-link excluded)
        self.active = 0           # VMAs whose anon_vma this is (num_active_vmas)
        self.width = 0            # VMAs whose chain links to it: its interval tree
        self.rec = rec            # the recorded anon_vma pointer bound to it (0: none)
        self.known = known        # False: adopted, its history not in the events


class SimVma:
    """A VMA's chain (oldest first) and anon_vma in one world."""

    __slots__ = ("chain", "anon", "extra", "fork_parent")

    def __init__(self, chain: list[SimAnonVma], anon: SimAnonVma | None, extra: int = 0
                 ) -> None:
        self.chain = chain
        self.anon = anon
        self.extra = extra        # chain entries of anon_vmas not known (adopted)
        # during a fork, before its own anon_vma: the source VMA's anon_vma
        self.fork_parent: SimAnonVma | None = None


@dataclass(frozen=True)
class WorldFigures:
    """What one rule gives at one point of the recording."""

    rule: str
    anon_vmas: int            # live anon_vmas
    anon_vma_chains: int      # chain entries of every VMA
    max_depth: int            # deepest live anon_vma (root = 1)
    rmap_max: int             # widest interval tree (VMAs linked to one anon_vma)
    rmap_total: int           # sum of the widths (= chain entries of known anon_vmas)
    # Mean width of the anon_vma each VMA points at: the VMAs an rmap walk
    # visits for a page the VMA faults in. The widest tree is always a
    # root's (every VMA of the family links to its root), the same under
    # every rule; this mean is where reuse shows as false aliasing.
    rmap_mean: float
    forked_vmas: int          # VMAs forked so far (each got an anon_vma)
    reused: int               # ... of which by reusing one of their chain
    divergences: int          # kernel rule only: forks where the kernel chose otherwise
    adopted: int              # VMAs whose chain was not revealed by the events

    def as_dict(self) -> dict[str, int | float | str]:
        """The figures as a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class World:
    """The anon_vma hierarchy as one reuse rule would have built it."""

    def __init__(self, rule: str) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown reuse rule {rule!r} (known: {', '.join(RULES)})")
        self.rule = rule
        self.vmas: dict[VmaKey, SimVma] = {}
        self.live: set[SimAnonVma] = set()
        self.by_rec: dict[int, SimAnonVma] = {}   # recorded pointer -> bound anon_vma
        self.chains = 0
        self.forked = 0
        self.reused = 0
        self.divergences = 0
        self.adopted = 0
        self._serials = 0

    # -- objects ------------------------------------------------------------
    def _new_av(self, parent: SimAnonVma | None, depth: int, rec: int,
                known: bool = True) -> SimAnonVma:
        self._serials += 1
        av = SimAnonVma(self._serials, parent, depth, rec, known)
        if parent is not None:
            parent.children += 1
        self.live.add(av)
        if rec:
            self._bind(av, rec)
        return av

    def _bind(self, av: SimAnonVma, rec: int) -> None:
        old = self.by_rec.get(rec)
        if old is not None and old is not av:
            old.rec = 0        # a stale binding: that pointer was freed and reused
        av.rec = rec
        self.by_rec[rec] = av

    def _free(self, av: SimAnonVma) -> None:
        self.live.discard(av)
        if av.parent is not None and av.parent in self.live:
            av.parent.children -= 1
        if av.rec and self.by_rec.get(av.rec) is av:
            del self.by_rec[av.rec]

    def _attach(self, key: VmaKey, vma: SimVma) -> None:
        for av in vma.chain:
            av.width += 1
        if vma.anon is not None:
            vma.anon.active += 1
        self.chains += len(vma.chain) + vma.extra
        self.vmas[key] = vma

    def _bound_root(self, rec: int) -> SimAnonVma | None:
        av = self.by_rec.get(rec) if rec else None
        return av if av is not None and av.root and av in self.live else None

    # -- operations (tracer.model.reuse_stream) ---------------------------
    def prepare(self, key: VmaKey, rec: int) -> None:
        """First fault (``__anon_vma_prepare``): a new root, or the root of a
        neighbour (``find_mergeable_anon_vma``), recorded as ``rec``."""
        self.unlink(key)
        root = self._bound_root(rec)
        if root is None:
            root = self._new_av(None, 1, rec)
        self._attach(key, SimVma([root], root))

    def clone(self, key: VmaKey, src: VmaKey) -> None:
        """A split, merge or ``mremap`` copy: the source's chain and anon_vma."""
        s = self.vmas[src]
        self.unlink(key)
        self._attach(key, SimVma(list(s.chain), s.anon, s.extra))

    def fork_clone(self, key: VmaKey, src: VmaKey) -> None:
        """``anon_vma_clone()`` inside ``anon_vma_fork()``: link the child VMA
        to the source's chain, reusing an anon_vma of it if the rule says so."""
        s = self.vmas[src]
        self.unlink(key)
        reuse = self._pick(s.chain) if s.anon is not None else None
        vma = SimVma(list(s.chain), reuse, s.extra)
        vma.fork_parent = s.anon
        self._attach(key, vma)

    def _pick(self, chain: list[SimAnonVma]) -> SimAnonVma | None:
        # The root is never reused: the kernel counts its link to itself
        # among its children, and it has a child or a VMA whenever it is in
        # a forked VMA's chain. Adopted anon_vmas' counters are not known.
        if self.rule == "kernel":
            for av in chain:
                if av.children < 2 and av.active == 0 and not av.root and av.known:
                    return av
        elif self.rule == "single-child":
            for av in chain:
                if av.children < 2 and not av.root and av.known:
                    return av
        return None

    def fork_done(self, key: VmaKey, rec: int, rec_depth: int, rec_chain: int) -> None:
        """The end of ``anon_vma_fork()``: a VMA that reused nothing gets a
        new anon_vma, child of the source VMA's. ``rec``, ``rec_depth`` and
        ``rec_chain`` are what the kernel gave it; the kernel world follows
        them where the kernel chose otherwise."""
        vma = self.vmas.get(key)
        if vma is None:
            return
        parent, vma.fork_parent = vma.fork_parent, None
        self.forked += 1
        bind = 0
        if self.rule == "kernel" and rec:
            vma = self._follow_kernel(key, vma, rec, rec_depth, rec_chain)
            bind = rec
        if vma.anon is not None:
            self.reused += 1
            return
        depth = parent.depth + 1 if parent is not None else rec_depth
        av = self._new_av(parent, depth, bind, known=parent is not None)
        vma.chain.append(av)
        vma.anon = av
        av.width += 1
        av.active += 1
        self.chains += 1

    def _follow_kernel(self, key: VmaKey, vma: SimVma, rec: int, rec_depth: int,
                       rec_chain: int) -> SimVma:
        """Where the recorded kernel chose otherwise (``rec`` bound to a live
        anon_vma: it reused that one; else it made a new one), count a
        divergence and take the kernel's choice. Returns the VMA's state."""
        recorded = self.by_rec.get(rec)
        if recorded is not None and recorded not in self.live:
            recorded = None
        if recorded is vma.anon:
            return vma
        self.divergences += 1
        if vma.anon is not None:
            vma.anon.active -= 1
            vma.anon = None
        if recorded is None:
            return vma
        if recorded in vma.chain:
            vma.anon = recorded
            recorded.active += 1
            return vma
        # The kernel reused an anon_vma the simulated chain lacks: that chain
        # is wrong; take the VMA as recorded.
        self.adopt(key, rec, rec_depth, rec_chain)
        return self.vmas[key]

    def adopt(self, key: VmaKey, rec: int, depth: int, chain_len: int) -> None:
        """A VMA whose history the events do not show: its anon_vma as
        recorded (``rec``, ``depth``), the rest of its chain unknown."""
        self.unlink(key)
        self.adopted += 1
        av = self.by_rec.get(rec) if rec else None
        if rec and (av is None or av not in self.live):
            av = self._new_av(None, depth, rec, known=depth == 1)
        if av is None:
            self._attach(key, SimVma([], None, chain_len))
        else:
            self._attach(key, SimVma([av], av, max(chain_len - 1, 0)))

    def unlink(self, key: VmaKey) -> None:
        """``unlink_anon_vmas()``: drop the VMA's chain; anon_vmas whose
        interval tree empties are freed, newest first."""
        vma = self.vmas.pop(key, None)
        if vma is None:
            return
        self.chains -= len(vma.chain) + vma.extra
        if vma.anon is not None:
            vma.anon.active -= 1
        for av in vma.chain:
            av.width -= 1
        self._collect(reversed(vma.chain))

    def _collect(self, avs: Iterable[SimAnonVma]) -> None:
        for av in avs:
            if av.width <= 0 and av in self.live:
                self._free(av)

    # -- figures ------------------------------------------------------------
    def figures(self) -> WorldFigures:
        """The figures now."""
        live = self.live
        vmas = sum(av.active for av in live)
        walked = sum(av.active * av.width for av in live)
        return WorldFigures(
            rule=self.rule,
            anon_vmas=len(live),
            anon_vma_chains=self.chains,
            max_depth=max((av.depth for av in live), default=0),
            rmap_max=max((av.width for av in live), default=0),
            rmap_total=sum(av.width for av in live),
            rmap_mean=round(walked / vmas, 2) if vmas else 0.0,
            forked_vmas=self.forked,
            reused=self.reused,
            divergences=self.divergences,
            adopted=self.adopted)
