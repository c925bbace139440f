"""The record of bpf_programs/rmapwalk.bpf.c: one ``struct walk_stats`` per
root anon_vma, what the rmap walks of that family's pages cost.

Each field is described once here (``FIELDS``), in the order and with the
sizes of the C struct; a unit test compares this list with the C source and
the loader compares it with the map's value type that BCC built from it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# log2 bins of visited/mapped: [1], [2, 3], [4, 7], ... the last one open.
NBINS = 16

# (name, struct format) of every member of struct walk_stats, in order.
FIELDS: tuple[tuple[str, str], ...] = (
    ("walks", "Q"),             # rmap_walk_anon() calls that found an anon_vma
    ("visited", "Q"),           # VMAs the interval-tree iterator returned, all walks
    ("measured_visited", "Q"),  # the same, over walks with mapped > 0
    ("mapped", "Q"),            # VMAs mapping the folio, summed over those walks
    ("unmapped", "Q"),          # walks of a folio no VMA mapped (mapped == 0)
    ("unmeasured", "Q"),        # walks of large folios with no single mapcount
    ("below_one", "Q"),         # walks with visited < mapped (stopped early)
    ("hist", f"{NBINS}Q"),      # walks with visited >= mapped > 0, by ratio bin
    ("owner_tgid", "I"),        # process whose VMA uses the root anon_vma itself
    ("pad", "I"),
    ("owner_comm", "16s"),
)
FORMAT = struct.Struct("<" + "".join(f for _, f in FIELDS))


def ratio_bin(visited: int, mapped: int) -> int | None:
    """The histogram bin of one walk (what the BPF program computes): the
    floor of log2(visited // mapped), capped at the last bin; None where the
    walk has no bin (mapped == 0, or visited < mapped)."""
    if mapped <= 0 or visited < mapped:
        return None
    return min((visited // mapped).bit_length() - 1, NBINS - 1)


def bin_label(i: int) -> str:
    """``1``, ``2-3``, ``4-7``, ... and ``32768+`` for the last bin."""
    if not 0 <= i < NBINS:
        raise ValueError(f"no histogram bin {i}")
    lo = 1 << i
    if i == NBINS - 1:
        return f"{lo}+"
    return str(lo) if i == 0 else f"{lo}-{2 * lo - 1}"


@dataclass(frozen=True)
class WalkStats:
    """What the rmap walks of one family (pages whose anon_vma has this
    root) visited. See docs/rmap-walks.md for each figure."""

    root: int
    walks: int
    visited: int
    measured_visited: int
    mapped: int
    unmapped_walks: int
    unmeasured_walks: int
    below_one_walks: int
    histogram: tuple[int, ...]
    owner_pid: int = 0
    owner_comm: str = ""

    @property
    def mean_ratio(self) -> float | None:
        """VMAs visited per VMA mapping the page, over the walks where the
        page was mapped: sum(visited) / sum(mapped); None without such walks."""
        return self.measured_visited / self.mapped if self.mapped else None

    def histogram_labels(self) -> dict[str, int]:
        """The non-empty bins, by label, in bin order."""
        return {bin_label(i): n for i, n in enumerate(self.histogram) if n}

    def to_dict(self) -> dict[str, object]:
        """The JSON form (`anontrace rmapwalk --json`)."""
        ratio = self.mean_ratio
        return {
            "root": f"{self.root:#x}", "owner_pid": self.owner_pid or None,
            "owner_comm": self.owner_comm or None, "walks": self.walks,
            "visited": self.visited, "mapped": self.mapped,
            "mean_ratio": None if ratio is None else round(ratio, 3),
            "unmapped_walks": self.unmapped_walks, "unmeasured_walks": self.unmeasured_walks,
            "below_one_walks": self.below_one_walks,
            "histogram": self.histogram_labels(),
        }


def decode_stats(root: int, raw: bytes) -> WalkStats:
    """One map value (the raw bytes of a struct walk_stats) as WalkStats."""
    if len(raw) < FORMAT.size:
        raise ValueError(f"walk_stats value is {len(raw)} bytes, expected {FORMAT.size}")
    v = FORMAT.unpack_from(raw)
    walks, visited, measured, mapped, unmapped, unmeasured, below = v[:7]
    hist = tuple(v[7:7 + NBINS])
    tgid, _pad, comm = v[7 + NBINS:]
    return WalkStats(root, walks, visited, measured, mapped, unmapped, unmeasured, below, hist,
                     tgid, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))


def layout_mismatch(names: list[str], size: int) -> str | None:
    """Why a map value type (member names, byte size: what BCC made of the
    C struct) is not ``FIELDS``, or None when it is."""
    want = [n for n, _ in FIELDS]
    if names != want:
        return f"struct walk_stats has members {names}, expected {want}"
    if size != FORMAT.size:
        return f"struct walk_stats is {size} bytes, expected {FORMAT.size}"
    return None
