"""The rmap census: every anon_vma's rmap width, read with a BPF iterator
(bpf_programs/rmap.bpf.c) over every VMA of every process.

It traces nothing: it reads what the kernel holds now, so it works on any
running process (``anontrace tree``) and needs no trace session, and a
session's reports and `serve` run it every so often for the rmap figures
(tracer.model.rmap). One run costs a walk of every VMA's chain on the host:
measured in :attr:`RmapSnapshot.seconds`.

The counts are a walk, not a snapshot: VMAs that forks, splits and exits
add or remove while the iterator runs may be counted in either state.
"""
from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tracer.errors import AnontraceError
from tracer.kernel.bcc_glue import (
    captured_stderr,
    delete_keys,
    dump_hash,
    hash_chunks,
    import_bcc,
    iterator_error,
    new_bpf,
    read_iterator,
)
from tracer.kernel.bpf_source import RMAP_PROGRAM, RmapOptions, rmap_cflags
from tracer.kernel.facts import KernelFacts, read_kernel_facts, require_root
from tracer.kernel.kernel_env import KernelEnv
from tracer.model.rmap import AnonVmaRmap, ChainLink, RmapSnapshot, RmapSummary, SummaryBuilder

# struct rmap_av and struct rmap_link of rmap.bpf.c (tests/unit/test_rmap.py
# compares these with the C text).
AV_VALUE = struct.Struct("<QQIIIIII")
AV_FIELDS = ("parent", "root", "width", "active", "owner", "children", "gen", "pad")
KEY = struct.Struct("<Q")
LINK = struct.Struct("<QQQQII")
LINK_FIELDS = ("vm_start", "vm_end", "anon_vma", "chain_av", "tgid", "index")
Buffer = bytes | memoryview
STATS = ("vmas", "chain_entries", "truncated_chains", "refused", "shared_mm")


def decode_anon_vmas(raw: dict[int, bytes], gen: int) -> tuple[dict[int, AnonVmaRmap],
                                                                 list[int]]:
    """The anon_vmas of run ``gen``, and the keys left by older runs."""
    out: dict[int, AnonVmaRmap] = {}
    stale: list[int] = []
    for av, value in raw.items():
        parent, root, width, active, owner, children, g, _ = AV_VALUE.unpack_from(value)
        if g != gen:
            stale.append(av)
            continue
        out[av] = AnonVmaRmap(av, parent, root, width, active, owner, children)
    return out, stale


def decode_links(raw: bytes) -> list[ChainLink]:
    """The chain records the iterator wrote for the target processes."""
    usable = len(raw) - len(raw) % LINK.size
    return [ChainLink(tgid, start, end, own, av, index)
            for start, end, own, av, tgid, index in LINK.iter_unpack(raw[:usable])]


def summarize_chunks(chunks: Iterable[tuple[Buffer, Buffer, int]], gen: int
                     ) -> tuple[SummaryBuilder, list[int]]:
    """Sum the rmap_av entries of run ``gen`` (chunks of packed keys and
    values, tracer.kernel.bcc_glue.hash_chunks) into a :class:`SummaryBuilder`;
    also the keys older runs left."""
    acc = SummaryBuilder()
    stale: list[int] = []
    for keys, values, vsize in chunks:
        if vsize != AV_VALUE.size:
            raise AnontraceError(f"rmap_av values are {vsize} bytes, expected {AV_VALUE.size}")
        for (av,), (_, root, width, _, owner, _, g, _) in zip(
                KEY.iter_unpack(keys), AV_VALUE.iter_unpack(values), strict=True):
            if g != gen:
                stale.append(av)
            else:
                acc.add(av, root, width, owner)
    return acc, stale


@dataclass
class RawCensus:
    """What one run of the iterator leaves: its output and its maps."""

    gen: int
    links: bytes                  # struct rmap_link records
    anon_vmas: dict[int, bytes]   # rmap_av: anon_vma -> struct rmap_av
    stats: dict[str, int]         # rmap_stats, by STATS name
    counters: str                 # the kernel's fan-out era (KernelLayout.counters)
    stale: list[int] = field(default_factory=list)   # keys of older runs


def decode_census(raw: RawCensus) -> RmapSnapshot:
    """An :class:`RmapSnapshot` from one run's raw results; the keys of
    older runs are left in ``raw.stale``."""
    avs, raw.stale = decode_anon_vmas(raw.anon_vmas, raw.gen)
    st = raw.stats
    return RmapSnapshot(anon_vmas=avs, links=decode_links(raw.links), vmas=st["vmas"],
                        chain_entries=st["chain_entries"],
                        truncated_chains=st["truncated_chains"], refused=st["refused"],
                        counters=raw.counters)


class RmapCensus:
    """A loaded rmap census program; :meth:`run` as often as wanted.

    Use as a context manager: the program and its maps go on exit.
    ``facts`` reuses what a trace session already read from the kernel.
    """

    def __init__(self, facts: KernelFacts | None = None, env: KernelEnv | None = None,
                 options: RmapOptions | None = None) -> None:
        self._facts = facts
        self._env = env
        self.options = options or RmapOptions()
        self._bpf: Any = None
        self._fn: Any = None
        self._gen = 0
        self._counters = "num_children"

    def __enter__(self) -> RmapCensus:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Compile and load the iterator."""
        require_root()
        facts = self._facts or read_kernel_facts(self._env or KernelEnv())
        if facts.layout is None:
            raise AnontraceError(f"cannot read the kernel's struct layout from BTF: "
                                 f"{facts.btf_error}")
        self._counters = facts.layout.counters
        if facts.headers is None:
            raise AnontraceError(str(facts.headers_error))
        facts.headers.apply()
        opts = self.options
        if facts.no_prealloc and opts.prealloc:
            opts = RmapOptions(opts.anon_vmas, opts.mms, opts.targets, opts.max_chain, False)
        bcc = import_bcc()
        captured: list[str] = []
        try:
            with captured_stderr(captured):
                self._bpf = new_bpf(bcc, src_file=str(RMAP_PROGRAM).encode(),
                                    cflags=rmap_cflags(facts.layout, opts) + ["-w"])
                self._fn = self._bpf.load_func(b"bpf_iter__task_vma", bcc.BPF.TRACING)
        except Exception as exc:  # BCC raises bare Exception on load errors
            self.close()
            raise AnontraceError("the kernel would not load the rmap census: "
                                 + iterator_error(exc, captured)) from exc

    def close(self) -> None:
        """Unload the program and free its maps."""
        if self._bpf is not None:
            self._bpf.cleanup()
        self._bpf = self._fn = None

    def run(self, targets: Iterable[int] = ()) -> RmapSnapshot:
        """Count every anon_vma's rmap width now; the chain entries of the
        ``targets`` processes' VMAs come with it."""
        started = time.monotonic()
        raw = self.run_raw(targets)
        snap = decode_census(raw)
        # Freed since the last run: keep the map to the live ones.
        delete_keys(self._bpf[b"rmap_av"], raw.stale)
        snap.seconds = time.monotonic() - started
        return snap

    def run_raw(self, targets: Iterable[int] = ()) -> RawCensus:
        """One run's raw results (what :func:`decode_census` reads; the
        tests record them as fixtures)."""
        links, stats = self._walk(targets)
        assert self._bpf is not None
        table = dump_hash(self._bpf[b"rmap_av"], 8)
        return RawCensus(gen=self._gen, links=links, anon_vmas=table, stats=stats,
                         counters=self._counters)

    def run_summary(self) -> RmapSummary:
        """The figures `serve` exports (:meth:`RmapSnapshot.summary`), summed
        as the map is read: no object per anon_vma, so a host's hundreds of
        thousands of them cost neither the time nor the memory."""
        started = time.monotonic()
        _, stats = self._walk(())
        assert self._bpf is not None
        table = self._bpf[b"rmap_av"]
        acc, stale = summarize_chunks(hash_chunks(table, 8), self._gen)
        delete_keys(table, stale)
        return acc.build(seconds=time.monotonic() - started,
                         truncated_chains=stats["truncated_chains"], refused=stats["refused"])

    def _walk(self, targets: Iterable[int]) -> tuple[bytes, dict[str, int]]:
        """Run the iterator once: the chain records of ``targets`` and the
        run's counts (rmap_stats)."""
        if self._bpf is None:
            raise AnontraceError("rmap census not loaded")
        bcc = import_bcc()
        self._gen += 1
        self._bpf[b"rmap_gen"][ctypes.c_int(0)] = ctypes.c_uint32(self._gen)
        stats = self._bpf[b"rmap_stats"]
        for i in range(len(STATS)):
            stats[ctypes.c_int(i)] = ctypes.c_uint64(0)
        tgt = self._bpf[b"rmap_targets"]
        tgt.clear()
        for pid in targets:
            tgt[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        try:
            links = read_iterator(bcc, self._fn.fd)
        except OSError as exc:
            raise AnontraceError(f"the rmap census could not run: {exc}") from exc
        return links, {name: int(stats[ctypes.c_int(i)].value) for i, name in enumerate(STATS)}
