"""Reading the model: snapshots of anon_vmas and VMAs, per-process figures,
totals and families. A base of :class:`tracer.model.hierarchy.Model`, which
keeps the columns it reads."""
from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping

from tracer.model.types import (
    AV_ID,
    CHAIN_SHIFT,
    NO_AV,
    PROBE_NAMES,
    AnonVmaInfo,
    Mm,
    Process,
    ProcessFigures,
    VmaInfo,
)


class _AnonVmaView(Mapping):
    """Read-only mapping anon_vma pointer -> AnonVmaInfo (snapshots)."""

    __slots__ = ("_m",)

    def __init__(self, model: ModelQueries) -> None:
        self._m = model

    def __getitem__(self, ptr: int) -> AnonVmaInfo:
        info = self._m.anon_vma_info(ptr)
        if info is None:
            raise KeyError(ptr)
        return info

    def __contains__(self, ptr: object) -> bool:
        return ptr in self._m._avs

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._m._avs))

    def __len__(self) -> int:
        return len(self._m._avs)


class ModelQueries:
    """The read API of the model (the columns are the model's)."""

    _avs: dict[int, int]
    _ptr: array[int]
    _parent: array[int]
    _root: array[int]
    _avmm: array[int]
    _depth: array[int]
    _children: array[int]
    _active: array[int]
    _serial: array[int]
    _plink: array[int]
    _free: list[int]
    mms: dict[int, Mm]
    chains: int

    @property
    def anon_vmas(self) -> Mapping[int, AnonVmaInfo]:
        """The live anon_vmas: a read-only mapping pointer -> AnonVmaInfo."""
        return _AnonVmaView(self)

    def anon_vma_info(self, ptr: int) -> AnonVmaInfo | None:
        """A snapshot of the live anon_vma at ``ptr``; None if none is tracked."""
        v = self._avs.get(ptr)
        if v is None:
            return None
        return self._info(v & AV_ID)

    def _info(self, i: int) -> AnonVmaInfo:
        return AnonVmaInfo(ptr=self._ptr[i], parent=self._parent[i] or None,
                           parent_live=bool(self._plink[i]), root=self._root[i] or None,
                           depth=self._depth[i], children=self._children[i],
                           active=self._active[i], mm=self._avmm[i] or None,
                           serial=self._serial[i])

    def _vma_info(self, mm_ptr: int, v: int) -> VmaInfo:
        i = v & AV_ID
        return VmaInfo(None if i == NO_AV else self._ptr[i], v >> CHAIN_SHIFT, mm_ptr)

    def vma_info(self, mm_ptr: int, vma_ptr: int) -> VmaInfo | None:
        """The VMA ``vma_ptr`` of the mm ``mm_ptr``; None if not tracked."""
        mm = self.mms.get(mm_ptr)
        v = mm.vmas.get(vma_ptr) if mm is not None else None
        return None if v is None else self._vma_info(mm_ptr, v)

    def mm_vmas(self, mm: Mm | int) -> dict[int, VmaInfo]:
        """The tracked VMAs of an mm (object or pointer): VMA pointer -> VmaInfo."""
        if isinstance(mm, int):
            found = self.mms.get(mm)
            if found is None:
                return {}
            mm = found
        return {k: self._vma_info(mm.ptr, v) for k, v in mm.vmas.items()}

    @property
    def vmas(self) -> dict[int, VmaInfo]:
        """Every tracked VMA, VMA pointer -> VmaInfo (a new dict: for tests and
        debugging, O(VMAs))."""
        out: dict[int, VmaInfo] = {}
        for mm in self.mms.values():
            out.update(self.mm_vmas(mm))
        return out

    def vma_count(self) -> int:
        return sum(len(mm.vmas) for mm in self.mms.values())

    def figures(self, proc: Process) -> ProcessFigures:
        """The README's per-process figures, from the process's current mm
        (for an exited process, as they were when its exit was seen)."""
        if proc.at_exit is not None and (proc.exiting or not proc.alive):
            return proc.at_exit
        ids: set[int] = set()
        chains = max_chain = 0
        if proc.mm is not None:
            for v in proc.mm.vmas.values():
                c = v >> CHAIN_SHIFT
                chains += c
                if c > max_chain:
                    max_chain = c
                ids.add(v & AV_ID)
            ids.discard(NO_AV)
        events = [0, 0, 0, 0]
        for mm in proc.mms:
            for i, n in enumerate(mm.events):
                events[i] += n
        depth, children = self._depth, self._children
        return ProcessFigures(
            anon_vmas=len(ids),
            anon_vma_chains=chains,
            max_depth=max((depth[i] for i in ids), default=0),
            max_degree=max((children[i] for i in ids), default=0),
            max_chain=max_chain,
            events=dict(zip(PROBE_NAMES, events, strict=True)))

    def anon_vma_chain_count(self) -> int:
        """anon_vma_chain entries on all tracked VMAs (kept as they change)."""
        return self.chains

    def orphaned_count(self) -> int:
        """Live anon_vmas that no tracked VMA points at. Free slots of the
        columns have no active VMA either: count the zeros in C, less them."""
        return self._active.count(0) - len(self._free)

    def totals(self) -> dict[str, int]:
        """System (traced-scope) totals."""
        return {
            "anon_vmas": len(self._avs),
            "anon_vma_chains": self.chains,
            "orphaned_anon_vmas": self.orphaned_count(),
        }

    def families(self) -> dict[int, list[int]]:
        """Live anon_vmas grouped by root anon_vma (one fork hierarchy):
        root pointer -> [anon_vmas, orphaned anon_vmas, max depth, pid of
        the process that created the root (0: not known), the root's
        creation serial (-1: the root is not tracked)]. Pointer and serial
        together name one root even when the slab reuses the pointer."""
        out: dict[int, list[int]] = {}
        root, depth, active = self._root, self._depth, self._active
        for v in self._avs.values():
            i = v & AV_ID
            r = root[i]
            f = out.get(r)
            if f is None:
                f = out[r] = [0, 0, 0, 0, -1]
            f[0] += 1
            if not active[i]:
                f[1] += 1
            if depth[i] > f[2]:
                f[2] = depth[i]
        avs, avmm, mms = self._avs, self._avmm, self.mms
        for r, f in out.items():
            rv = avs.get(r)
            if rv is not None:
                f[4] = self._serial[rv & AV_ID]
                mm = mms.get(avmm[rv & AV_ID])
                if mm is not None:
                    f[3] = mm.tgid
        return out
