"""Member offsets of the kernel structs anontrace reads, taken from BTF."""
from __future__ import annotations

from dataclasses import dataclass

from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.compat import anon_vma_counters

# struct -> members the BPF programs read (macro name suffix, member).
_MEMBERS: dict[str, list[tuple[str, str]]] = {
    "anon_vma": [("AV_ROOT", "root"), ("AV_PARENT", "parent")],
    "anon_vma_chain": [("AVC_VMA", "vma"), ("AVC_ANON_VMA", "anon_vma"),
                       ("AVC_SAME_VMA", "same_vma")],
    "vm_area_struct": [("VMA_START", "vm_start"), ("VMA_END", "vm_end"), ("VMA_MM", "vm_mm"),
                       ("VMA_AVC", "anon_vma_chain"), ("VMA_ANON_VMA", "anon_vma")],
    "task_struct": [("TASK_MM", "mm"), ("TASK_PID", "pid"), ("TASK_TGID", "tgid"),
                    ("TASK_COMM", "comm")],
}

# Members read together by fill_vma() / fill_anon_vma() / emit_avc(), one read
# per struct (see KernelLayout.spans). Absent keys (the other counter era) are
# skipped.
_SPAN_MEMBERS: dict[str, tuple[str, ...]] = {
    "VMA": ("VMA_START", "VMA_END", "VMA_MM", "VMA_AVC", "VMA_ANON_VMA"),
    "AV": ("AV_ROOT", "AV_PARENT", "AV_NUM_CHILDREN", "AV_NUM_ACTIVE_VMAS", "AV_DEGREE"),
    "AVC": ("AVC_VMA", "AVC_ANON_VMA"),
}


@dataclass(frozen=True)
class KernelLayout:
    """Offsets (bytes) for every member the BPF programs read.

    ``counters`` names the anon_vma fan-out era (compat.anon_vma_counters):
    ``"degree"`` or ``"num_children"`` with ``num_active_vmas``.
    """

    offsets: dict[str, int]
    sizes: dict[str, int]
    counters: str

    def spans(self) -> dict[str, tuple[int, int]]:
        """Per struct prefix (VMA, AV, AVC), the byte range [lo, hi) that
        covers every member the programs read from it: one
        bpf_probe_read_kernel() of that range replaces one call per member,
        and the calls, not the bytes, are what a fork pays for."""
        out: dict[str, tuple[int, int]] = {}
        for prefix, keys in _SPAN_MEMBERS.items():
            present = [k for k in keys if k in self.offsets]
            lo = min(self.offsets[k] for k in present)
            hi = max(self.offsets[k] + self.sizes.get(k, 8) for k in present)
            out[prefix] = (lo, hi)
        return out

    def defines(self) -> dict[str, int | None]:
        """The -D macros these offsets become."""
        out: dict[str, int | None] = {f"OFF_{k}": v for k, v in self.offsets.items()}
        out.update({f"SZ_{k}": v for k, v in self.sizes.items()})
        for prefix, (lo, hi) in self.spans().items():
            out[f"SPAN_{prefix}_LO"], out[f"SPAN_{prefix}_LEN"] = lo, hi - lo
        if self.counters == "degree":
            out["AV_HAS_DEGREE"] = None
        return out


def read_layout(btf: Btf) -> KernelLayout:
    """Resolve every offset anontrace needs; BtfError names the first missing one."""
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for struct, members in _MEMBERS.items():
        for key, member in members:
            offsets[key] = btf.member(struct, member).offset
    # The chain walk follows list_head.next as the first word of each node.
    if btf.member("list_head", "next").offset != 0:
        raise BtfError("list_head.next is not at offset 0")
    counters = anon_vma_counters(btf)
    if counters == "num_children":
        for key, member in (("AV_NUM_CHILDREN", "num_children"),
                            ("AV_NUM_ACTIVE_VMAS", "num_active_vmas")):
            m = btf.member("anon_vma", member)
            offsets[key], sizes[key] = m.offset, m.size
    else:
        m = btf.member("anon_vma", "degree")
        offsets["AV_DEGREE"], sizes["AV_DEGREE"] = m.offset, m.size
    if btf.has_member("kmem_cache", "size"):
        # For the raw kmem tracepoints: the cache's object size (what the
        # perf-style tracepoint reports as bytes_alloc).
        offsets["KMEM_CACHE_SIZE"] = btf.member("kmem_cache", "size").offset
    return KernelLayout(offsets, sizes, counters)


# ---------------------------------------------------------------- rmap walks
# Members bpf_programs/rmapwalk.bpf.c reads (macro suffix, struct, member).
# The folio's first members overlay struct page, so where a kernel has no
# struct folio the same names are read from struct page.
_WALK_MEMBERS: tuple[tuple[str, str, str], ...] = (
    ("AV_ROOT", "anon_vma", "root"),
    ("AVC_VMA", "anon_vma_chain", "vma"),
    ("VMA_ANON_VMA", "vm_area_struct", "anon_vma"),
    ("VMA_MM", "vm_area_struct", "vm_mm"),
    ("TASK_TGID", "task_struct", "tgid"),
    ("TASK_COMM", "task_struct", "comm"),
)


@dataclass(frozen=True)
class WalkLayout:
    """Offsets (bytes) and constants the rmap-walk program needs.

    ``large_mapcount`` says whether a large folio's mapcount can be read
    as one number; ``owner`` whether ``mm_struct.owner`` exists (it names
    the process behind a root anon_vma).
    """

    offsets: dict[str, int]
    pg_head: int
    large_mapcount: bool
    owner: bool

    def defines(self) -> dict[str, int | None]:
        """The -D macros these offsets become."""
        out: dict[str, int | None] = {f"OFF_{k}": v for k, v in self.offsets.items()}
        out["PG_HEAD"] = self.pg_head
        if self.large_mapcount:
            out["HAVE_LARGE_MAPCOUNT"] = None
        if self.owner:
            out["HAVE_MM_OWNER"] = None
        return out


def _four_bytes(btf: Btf, struct: str, member: str) -> int:
    m = btf.member(struct, member)
    if m.size != 4:
        raise BtfError(f"{struct}.{member} is {m.size} bytes, not an atomic_t")
    return m.offset


def read_walk_layout(btf: Btf) -> WalkLayout:
    """Resolve what the rmap-walk program reads; BtfError names the first
    missing member."""
    offsets = {key: btf.member(struct, member).offset for key, struct, member in _WALK_MEMBERS}
    if btf.member("task_struct", "tgid").size != 4:
        raise BtfError("task_struct.tgid is not 4 bytes")
    page = "folio" if btf.has_struct("folio") else "page"
    offsets["FOLIO_FLAGS"] = btf.member(page, "flags").offset
    offsets["FOLIO_MAPPING"] = btf.member(page, "mapping").offset
    offsets["FOLIO_MAPCOUNT"] = _four_bytes(btf, page, "_mapcount")
    # Commit 05c5323b2a34 ("mm: track mapcount of large folios in single
    # value") added folio->_large_mapcount: the mappings of every page of a
    # large folio in one counter. Before it no single member holds that
    # number, so large folios' walks are counted as not measured.
    large = page == "folio" and btf.has_member("folio", "_large_mapcount")
    if large:
        offsets["FOLIO_LARGE_MAPCOUNT"] = _four_bytes(btf, "folio", "_large_mapcount")
    # mm->owner exists with CONFIG_MEMCG only.
    owner = btf.has_member("mm_struct", "owner")
    if owner:
        offsets["MM_OWNER"] = btf.member("mm_struct", "owner").offset
    return WalkLayout(offsets, btf.enum_value("pageflags", "PG_head"), large, owner)
