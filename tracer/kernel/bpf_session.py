"""Loading and attaching the BPF programs: the only module that imports bcc.

:class:`TraceSession` is a context manager: probes are attached on entry and
always released on exit, including on SIGINT and SIGTERM (the CLI turns
SIGTERM into KeyboardInterrupt).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import gc
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tracer.errors import AnontraceError
from tracer.format.events import (
    LOSS_COUNTERS,
    WIRE,
    Event,
    Kind,
    Site,
    decode_records,
    lost_total,
    pack_record,
)
from tracer.kernel.bpf_source import CENSUS_PROGRAM, MAIN_PROGRAM, BuildOptions, MapSizes, cflags
from tracer.kernel.btf import Btf, BtfError, load_btf
from tracer.kernel.headers import Headers, HeadersError, find_headers
from tracer.kernel.kernel_env import (
    Kallsyms,
    KernelEnv,
    KernelEnvError,
    ensure_tracefs,
    slab_object_size,
    tracepoint_fields,
    tracepoint_format,
)
from tracer.kernel.kstate import G_NR, PSTATE_HEAD, StateDump, torn_reads
from tracer.kernel.layout import KernelLayout, read_layout
from tracer.kernel.probes import BACKENDS, LOGICAL_PROBES, Plan, kmem_raw_cache_args, plan_backend
from tracer.pipeline.derive import Deriver

BACKEND_CHOICES = ("auto",) + BACKENDS
KRETPROBE_MAXACTIVE = 512

_KPROBE_FUNCS = {
    "anon_vma_fork": ("kp_fork_entry", "kr_fork_exit"),
    "anon_vma_clone": ("kp_clone_entry", "kr_clone_exit"),
    "unlink_anon_vmas": ("kp_unlink_entry", None),
    "page_set_anon_rmap": ("kp_rmap_entry", None),
}


def import_bcc() -> Any:
    """Import BCC with an actionable error where it is missing."""
    try:
        import bcc  # type: ignore[import-untyped]  # only this module may import bcc
    except ImportError as exc:
        raise AnontraceError(
            "BCC's Python module is not importable: apt-get install python3-bpfcc, and run "
            "anontrace with /usr/bin/python3 or a venv made with --system-site-packages"
        ) from exc
    return bcc


_COMPILER_LIB = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
_MADV_DONTNEED = 4
MAX_POLL_BATCH = 8192    # records one poll() takes from the ring buffer at most


def require_root() -> None:
    if os.geteuid() != 0:
        raise AnontraceError("anontrace needs root (CAP_BPF, CAP_PERFMON and "
                             "CAP_SYS_ADMIN) to load BPF programs: run it with sudo")


@dataclass
class TraceOptions:
    """What to trace and how."""

    backend: str = "auto"
    pids: tuple[int, ...] = ()
    follow_children: bool = True
    transport: str = "auto"  # auto, ringbuf, perf
    object_events: bool = False  # also report every anon_vma / chain entry alloc and free
    ringbuf_pages: int = 256     # ring buffer size in pages (a power of 2)
    events: bool = True          # stream events (events, record, the Python model)
    state: bool = False          # keep the figures in BPF maps (tracer.kernel.kstate)
    # Backends the state maps are used with (all: a test may narrow it).
    state_backends: tuple[str, ...] = BACKENDS
    map_sizes: MapSizes | None = None
    env: KernelEnv = field(default_factory=KernelEnv)


@dataclass
class Attempt:
    """The outcome of trying one backend."""

    backend: str
    ok: bool
    error: str | None = None


@dataclass
class KernelFacts:
    """Everything read from the kernel before compiling anything."""

    env: KernelEnv
    kallsyms: Kallsyms
    btf: Btf | None
    btf_error: str | None
    layout: KernelLayout | None
    kprobes_available: bool
    ringbuf_available: bool
    task_storage: bool
    kmem_free_has_name: bool
    exit_mmap_tracepoint: bool
    kmem_raw: tuple[int, int] | None
    no_prealloc: bool
    av_slab_size: int | None
    avc_slab_size: int | None
    headers: Headers | None
    headers_error: str | None


def task_storage_available(kallsyms: Kallsyms) -> bool:
    """Task-local storage from tracing programs, reached through
    bpf_get_current_task_btf(): both v5.11 (4cf1bc1f1045, a10787e6d58c,
    3ca1032ab7ab)."""
    return "bpf_task_storage_get" in kallsyms and "bpf_get_current_task_btf" in kallsyms


def no_prealloc_allowed(kallsyms: Kallsyms) -> bool:
    """Whether tracing programs may use hash maps that allocate as entries
    come (BPF_F_NO_PREALLOC): since commit 96da3f7d489d ("bpf: Remove tracing
    program restriction on map types", v6.1), which rests on the BPF memory
    allocator of the same release (7c8199e24fa0, "bpf: Introduce any context
    BPF specific memory allocator."), whose entry point kallsyms then shows."""
    return "bpf_mem_alloc" in kallsyms


def read_kernel_facts(env: KernelEnv) -> KernelFacts:
    """Feature-probe the kernel: kallsyms, BTF, tracefs, slab sizes, headers."""
    try:
        ensure_tracefs(env)
    except KernelEnvError as exc:
        raise AnontraceError(str(exc)) from exc
    try:
        kallsyms = Kallsyms.read(env)
    except KernelEnvError as exc:
        raise AnontraceError(str(exc)) from exc
    btf = layout = None
    btf_error = None
    try:
        btf = load_btf(env.btf)
        layout = read_layout(btf)
    except BtfError as exc:
        btf_error = str(exc)
    free_fmt = tracepoint_format(env, "kmem", "kmem_cache_free") or ""
    try:
        headers, headers_error = find_headers(env), None
    except (HeadersError, OSError) as exc:
        headers, headers_error = None, str(exc)
    return KernelFacts(
        env=env, kallsyms=kallsyms, btf=btf, btf_error=btf_error, layout=layout,
        kprobes_available=(env.tracefs / "kprobe_events").exists(),
        # BPF_MAP_TYPE_RINGBUF (v5.8) brings the bpf_ringbuf_output helper.
        ringbuf_available="bpf_ringbuf_output" in kallsyms,
        task_storage=task_storage_available(kallsyms),
        kmem_free_has_name="name" in tracepoint_fields(free_fmt),
        exit_mmap_tracepoint=tracepoint_format(env, "mmap", "exit_mmap") is not None,
        kmem_raw=kmem_raw_cache_args(btf),
        no_prealloc=no_prealloc_allowed(kallsyms),
        av_slab_size=slab_object_size(env, "anon_vma"),
        avc_slab_size=slab_object_size(env, "anon_vma_chain"),
        headers=headers, headers_error=headers_error)


class TraceSession:
    """Attached probes streaming decoded events.

    >>> with TraceSession(TraceOptions(pids=(1234,))) as s:   # doctest: +SKIP
    ...     for ev in s.poll(100): print(ev)
    """

    def __init__(self, options: TraceOptions, facts: KernelFacts | None = None) -> None:
        self.options = options
        self.facts = facts
        self.plan: Plan | None = None
        self.attempts: list[Attempt] = []
        self.transport = ""
        self._bpf: Any = None
        self._raw: list[bytes] = []
        self._census_progs: dict[bool, tuple[Any, Any]] = {}   # census_all -> (BPF, fn)
        self.recorder: Callable[[bytes], None] | None = None
        self._decode_errors = 0
        self._perf_lost = 0
        self.records = 0   # records the BPF side delivered (before derivation)
        self._deriver: Deriver | None = None
        self._state_iter: Any = None

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> TraceSession:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        require_root()
        if self.options.backend not in BACKEND_CHOICES:
            raise AnontraceError(f"unknown backend {self.options.backend!r}; "
                                 f"choose one of {', '.join(BACKEND_CHOICES)}")
        if self.facts is None:
            self.facts = read_kernel_facts(self.options.env)
        facts = self.facts
        if facts.layout is None:
            raise AnontraceError(f"cannot read struct offsets from BTF: {facts.btf_error}")
        if facts.headers is None:
            raise AnontraceError(str(facts.headers_error))
        if not facts.av_slab_size or not facts.avc_slab_size:
            raise AnontraceError("cannot find the anon_vma / anon_vma_chain slab caches in "
                                 f"{facts.env.slab_sysfs} or {facts.env.slabinfo}")
        facts.headers.apply()
        bcc = import_bcc()
        order = list(BACKENDS) if self.options.backend == "auto" else [self.options.backend]
        for backend in order:
            plan = plan_backend(backend, facts.kallsyms, facts.btf, facts.kprobes_available)
            if not plan.usable:
                failed = {p: c.reason for p, c in plan.probes.items()
                          if not c.ok and p != "page_set_anon_rmap"}
                reasons = set(failed.values())
                why = (reasons.pop() if len(reasons) == 1 else
                       "; ".join(f"{p}: {r}" for p, r in failed.items()))
                self.attempts.append(Attempt(backend, False, why))
                continue
            try:
                self._load(bcc, plan)
            except _AttachFailed as exc:
                self.attempts.append(Attempt(backend, False, str(exc)))
                self._release()
                continue
            self.attempts.append(Attempt(backend, True))
            self.plan = plan
            if backend == "tracepoint" and self.streams_events:
                self._deriver = Deriver(keep_objects=self.options.object_events)
            _settle_heap()
            return
        summary = "; ".join(f"{a.backend}: {a.error}" for a in self.attempts)
        raise AnontraceError(f"no backend can trace anon_vmas on this kernel ({summary})")

    def drop_bulk_facts(self) -> None:
        """Forget the kernel's whole BTF and symbol table (about 150 MB of
        Python objects) once the programs are loaded: a long-running session
        (serve) needs only the struct layout and the plan from then on."""
        if self.facts is not None:
            self.facts = dataclasses.replace(self.facts, btf=None, kallsyms=Kallsyms(""))
            # They were frozen by _settle_heap: let the collector reclaim
            # whatever of them sits in cycles, then freeze the rest again.
            gc.unfreeze()
            _settle_heap()

    def release_compiler_pages(self) -> int:
        """Drop this process's resident pages of the compiler libraries
        (libLLVM, libclang: about 80 MB) once every program a session will
        use is loaded. Only clean file pages are dropped (read-only, no
        anonymous or dirty pages: not the relocated RELRO data), so a later
        compile faults them back in from the page cache unchanged. Returns
        the bytes advised away."""
        libc = ctypes.CDLL(None, use_errno=True)
        done = 0
        for lo, hi in _clean_mappings(_COMPILER_LIB):
            if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
                done += hi - lo
        return done

    def has_map(self, name: str) -> bool:
        """Whether the loaded program declares the map `name` (tests use it
        to see which variant a feature probe compiled)."""
        if self._bpf is None:
            return False
        try:
            self._bpf.get_table(name.encode())
        except KeyError:
            return False
        return True

    def close(self) -> None:
        """Detach every probe and free the maps. Safe to call twice."""
        self._release()
        # What _settle_heap froze may now be garbage in cycles (this
        # session's BCC objects): let the collector see it again.
        gc.unfreeze()

    def _release(self) -> None:
        self._state_iter = None
        for prog, _ in self._census_progs.values():
            prog.cleanup()
        self._census_progs.clear()
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    # -- loading ---------------------------------------------------------
    def _build_options(self, plan: Plan) -> BuildOptions:
        facts = self.facts
        assert facts is not None
        transport = self.options.transport
        if transport == "auto":
            transport = "ringbuf" if facts.ringbuf_available else "perf"
        if transport == "ringbuf" and not facts.ringbuf_available:
            raise AnontraceError("this kernel has no BPF ring buffer (v5.8+): use --transport perf")
        self.transport = transport
        return BuildOptions(
            ringbuf=transport == "ringbuf",
            filter_pids=bool(self.options.pids),
            follow_children=self.options.follow_children,
            av_slab_size=facts.av_slab_size or 0,
            avc_slab_size=facts.avc_slab_size or 0,
            kmem_free_has_name=facts.kmem_free_has_name,
            exit_mmap_tracepoint=facts.exit_mmap_tracepoint,
            kmem_raw=facts.kmem_raw,
            task_storage=facts.task_storage,
            object_events=self.options.object_events,
            ringbuf_pages=self.options.ringbuf_pages,
            events=self.options.events or not self._state_for(plan),
            state=self._state_for(plan),
            map_sizes=self.options.map_sizes,
            prealloc=not facts.no_prealloc)

    def _state_for(self, plan: Plan) -> bool:
        return self.options.state and plan.backend in self.options.state_backends

    @property
    def uses_state(self) -> bool:
        """Whether the loaded program keeps the state maps."""
        return self.plan is not None and self._state_for(self.plan)

    @property
    def streams_events(self) -> bool:
        """Whether the loaded program streams events."""
        return self.plan is not None and (self.options.events or not self._state_for(self.plan))

    def _load(self, bcc: Any, plan: Plan) -> None:
        facts = self.facts
        assert facts is not None and facts.layout is not None
        opts = self._build_options(plan)
        flags = cflags(plan, facts.layout, opts) + ["-w"]
        captured: list[str] = []
        try:
            # fentry/fexit and tracepoint programs attach as they load.
            with _captured_stderr(captured):
                self._bpf = bcc.BPF(src_file=str(MAIN_PROGRAM).encode(), cflags=flags)
        except Exception as exc:  # BCC raises bare Exception on load errors
            detail = _last_line(str(exc)) or type(exc).__name__
            hint = _verifier_hint(captured[0] if captured else "")
            if "Operation not permitted" in detail + hint and os.geteuid() == 0:
                # BCC words EPERM as "Need super-user privileges" even for root.
                detail = ("the kernel refused to load the program (EPERM) although we are "
                          "root: lockdown or an LSM forbids this program type")
            raise _AttachFailed(detail + (f" ({hint})" if hint else "")) from exc
        if plan.backend == "kprobe":
            self._attach_kprobes(plan)
        if opts.filter_pids:
            table = self._bpf[b"filter"]
            for pid in self.options.pids:
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        if opts.events:
            self._open_buffer(opts.ringbuf)

    def _attach_kprobes(self, plan: Plan) -> None:
        for probe in LOGICAL_PROBES:
            choice = plan.probes[probe]
            if not choice.ok:
                continue
            entry, exit_ = _KPROBE_FUNCS[probe]
            assert choice.function is not None   # a working choice names its function
            captured: list[str] = []
            try:
                with _captured_stderr(captured):
                    self._bpf.attach_kprobe(event=choice.function.encode(),
                                            fn_name=entry.encode())
                    if exit_:
                        self._bpf.attach_kretprobe(event=choice.function.encode(),
                                                   fn_name=exit_.encode(),
                                                   maxactive=KRETPROBE_MAXACTIVE)
            except Exception as exc:
                msg = _last_line(str(exc))
                hint = _verifier_hint(captured[0] if captured else "")
                msg += f" ({hint})" if hint else ""
                if probe == "page_set_anon_rmap":
                    choice.method, choice.reason = None, f"attach failed: {msg}"
                    continue
                raise _AttachFailed(f"{choice.function}: {msg}") from exc

    def _open_buffer(self, ringbuf: bool) -> None:
        raw = self._raw

        def on_event(_ctx: Any, data: Any, size: int) -> int:
            # Perf buffer records arrive padded to 8 bytes: keep the struct.
            raw.append(ctypes.string_at(data, min(size, WIRE.size)))
            # libbpf keeps consuming while the producer keeps producing:
            # stop at a batch (this record is kept), so a fork storm cannot
            # grow the batch, and the consumer's memory, without bound.
            return -1 if len(raw) >= MAX_POLL_BATCH else 0

        def on_lost(count: int) -> None:
            self._perf_lost += count

        table = self._bpf[b"events"]
        if ringbuf:
            table.open_ring_buffer(on_event)
        else:
            table.open_perf_buffer(on_event, page_cnt=256, lost_cb=on_lost)

    # -- census ----------------------------------------------------------
    def census(self, pids: tuple[int, ...] | None, keep: bool = False
               ) -> tuple[bytes, str | None]:
        """The anon_vma facts of every VMA the given (already running)
        processes hold now (``None``: every process), read with a task_vma
        BPF iterator.

        Returns the raw census records (wire format, ending with a
        completion marker), or no records and the reason the kernel would
        not run the iterator. With ``keep`` the compiled iterator stays
        loaded until the session closes, for the next census: a daemon
        then never needs the compiler again.
        """
        assert self.facts is not None and self.facts.layout is not None and self.plan
        bcc = import_bcc()
        census_all = pids is None
        captured: list[str] = []
        cached = self._census_progs.get(census_all)
        prog: Any = None
        try:
            if cached is None:
                opts = dataclasses.replace(self._build_options(self.plan), census_all=census_all)
                flags = cflags(self.plan, self.facts.layout, opts) + ["-w"]
                with _captured_stderr(captured):
                    prog = bcc.BPF(src_file=str(CENSUS_PROGRAM).encode(), cflags=flags)
                    fn = prog.load_func(b"bpf_iter__task_vma", bcc.BPF.TRACING)
                cached = (prog, fn)
            else:
                prog, fn = cached
            table = prog[b"census_tgids"]
            table.clear()
            for pid in pids or ():
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            raw = _read_iterator(bcc, fn.fd)
        except Exception as exc:  # BCC raises bare Exception on load errors
            msg = _last_line(str(exc)) or type(exc).__name__
            if "Operation not permitted" in msg + (captured[0] if captured else ""):
                msg = "the kernel refused the task_vma iterator (EPERM: lockdown or LSM)"
            keep = False
            return b"", msg
        finally:
            if keep and cached is not None:
                self._census_progs[census_all] = cached
            elif prog is not None:
                self._census_progs.pop(census_all, None)
                prog.cleanup()
        usable = len(raw) - len(raw) % WIRE.size
        return raw[:usable] + _census_marker(time.monotonic_ns()), None

    # -- state maps -----------------------------------------------------
    def _table(self, name: str) -> Any:
        if self._bpf is None or not self.uses_state:
            raise AnontraceError("trace session has no state maps")
        return self._bpf[name.encode()]

    def read_state(self, families: bool = True) -> StateDump:
        """Dump the state maps (batch lookups): what every report and scrape
        reads. ``families`` False skips the family map (a scrape between two
        refreshes)."""
        ptab, mtab = self._table("st_proc"), self._table("st_mm")
        # mms before processes (tracer.kernel.kstate.torn_reads says why).
        mms = _dump_hash(mtab, 8)
        procs = _dump_hash(ptab, 4)
        for _ in range(3):
            torn = torn_reads(procs, mms)
            if not torn:
                break
            for pid in torn:
                mm = PSTATE_HEAD.unpack_from(procs[pid])[0]
                mraw = _lookup(mtab, ctypes.c_uint64(mm))
                if mraw is not None:
                    mms[mm] = mraw
                raw = _lookup(ptab, ctypes.c_uint32(pid))
                if raw is None:
                    del procs[pid]
                else:
                    procs[pid] = raw
        fams = _dump_hash(self._table("st_fam"), 4) if families else {}
        g = self._table("st_global")
        sums = [int(sum(g[ctypes.c_int(i)])) for i in range(G_NR)]
        d = self._table("st_depths")
        depths = [int(sum(d[ctypes.c_int(i)])) for i in range(len(d))]
        return StateDump(mms=mms, procs=procs, families=fams, global_sums=sums, depths=depths)

    def forget_processes(self, pids: list[int]) -> None:
        """Delete exited processes from the state once they are reported."""
        table = self._table("st_proc")
        for pid in pids:
            try:
                del table[ctypes.c_uint32(pid)]
            except KeyError:
                pass

    def clear_state(self) -> None:
        """Empty every state map but the counters (before a resync census)."""
        for name in ("st_vma", "st_av", "st_mmav", "st_mm", "st_proc", "st_fam"):
            self._table(name).clear()
        g = self._table("st_global")
        for i in range(3):   # the live totals; event counters and map_full carry on
            g[ctypes.c_int(i)] = g.Leaf(*([0] * len(g[ctypes.c_int(i)])))

    def state_census(self) -> str | None:
        """Seed the state with the VMAs of the processes running now (the
        traced ones, or all), with the main program's task_vma iterator.
        Returns None, or why the kernel would not run it."""
        bcc = import_bcc()
        captured: list[str] = []
        try:
            if self._state_iter is None:
                with _captured_stderr(captured):
                    self._state_iter = self._bpf.load_func(b"bpf_iter__task_vma",
                                                           bcc.BPF.TRACING)
            _read_iterator(bcc, self._state_iter.fd)
        except Exception as exc:  # BCC raises bare Exception on load errors
            msg = _last_line(str(exc)) or type(exc).__name__
            if "Operation not permitted" in msg + (captured[0] if captured else ""):
                msg = "the kernel refused the task_vma iterator (EPERM: lockdown or LSM)"
            return msg
        return None

    # -- running ---------------------------------------------------------
    def add_pid(self, pid: int) -> None:
        """Start tracing another process (and, if following, its descendants)."""
        self._bpf[b"filter"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Wait up to ``timeout_ms`` for events; return all decoded so far.

        On the tracepoint backend the logical events rebuilt from kmem
        events are interleaved with the raw ones. The raw records go to
        :attr:`recorder` first, if set.
        """
        if self._bpf is None:
            raise AnontraceError("trace session is not open")
        if not self.streams_events:
            if timeout_ms > 0:
                time.sleep(timeout_ms / 1000)
            return []
        if self.transport == "ringbuf":
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.perf_buffer_poll(timeout_ms)
        raw = self._raw[:]
        del self._raw[:]       # the same list object: on_event holds it
        if not raw:
            return []
        self.records += len(raw)
        blob = b"".join(raw)
        if self.recorder is not None:
            self.recorder(blob)
        out, errors = decode_records(raw, blob)
        self._decode_errors += errors
        if self._deriver is not None:
            out = self._deriver.feed(out)
        return out

    def drain(self) -> list[Event]:
        """Everything still buffered, including derived events held back."""
        out = self.poll(0)
        while True:   # one poll takes at most MAX_POLL_BATCH records
            more = self.poll(0)
            if not more:
                break
            out.extend(more)
        if self._deriver is not None:
            out.extend(self._deriver.flush())
        return out

    def lost(self) -> dict[str, int]:
        """Events lost, by reason, counted in the kernel (and perf's lost callback)."""
        out = dict.fromkeys(LOSS_COUNTERS, 0)
        if self._bpf is not None:
            table = self._bpf[b"counters"]
            for i, name in enumerate(LOSS_COUNTERS):
                out[name] = int(sum(table[ctypes.c_int(i)]))
        out["perf_lost"] = self._perf_lost
        out["undecodable"] = self._decode_errors
        out["recursion_misses"] = self._recursion_misses()
        return out

    def program_ids(self) -> list[int]:
        """Kernel ids of the loaded programs (from each program fd's fdinfo)."""
        out = []
        for fn in list(getattr(self._bpf, "funcs", {}).values()):
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    out += [int(line.split()[1]) for line in f if line.startswith("prog_id:")]
            except (OSError, ValueError, AttributeError):
                continue
        return sorted(out)

    def _recursion_misses(self) -> int:
        """Program runs the kernel skipped because the program was already
        running on that CPU (bpf_prog_info.recursion_misses, v5.12+), read
        from each program fd's fdinfo."""
        total = 0
        if self._bpf is None:
            return 0
        for fn in list(getattr(self._bpf, "funcs", {}).values()):
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            total += int(line.split()[1])
            except (OSError, ValueError, AttributeError):
                continue
        return total

    def lost_total(self) -> int:
        return lost_total(self.lost())

    def iter_events(self, should_stop: Callable[[], bool], timeout_ms: int = 100
                    ) -> Iterator[Event]:
        while not should_stop():
            yield from self.poll(timeout_ms)
        yield from self.drain()


def _clean_mappings(path_re: re.Pattern[str], smaps: str = "/proc/self/smaps"
                    ) -> list[tuple[int, int]]:
    """[lo, hi) of this process's read-only file mappings whose path matches
    and that hold no anonymous or dirty page."""
    out: list[tuple[int, int]] = []
    try:
        with open(smaps) as f:
            text = f.read()
    except OSError:
        return out
    cur: list[int] | None = None
    clean = True
    for line in text.splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            if cur is not None and clean:
                out.append((cur[0], cur[1]))
            parts = line.split()
            cur = None
            if len(parts) >= 6 and "w" not in parts[1] and path_re.search(parts[5]):
                cur = [int(x, 16) for x in parts[0].split("-")]
                clean = True
        elif cur is not None and head in ("Anonymous:", "Private_Dirty:", "Swap:"):
            if line.split()[1] != "0":
                clean = False
    if cur is not None and clean:
        out.append((cur[0], cur[1]))
    return out


def _settle_heap() -> None:
    """Move everything allocated so far (BCC, the parsed BTF and kallsyms:
    millions of objects) out of the cyclic collector's sight. Every poll
    allocates thousands of short-lived events, which triggers full
    collections; each one walked all of those objects and cost the consumer a
    third of its time in a fork storm (py-spy; bench/fork_overhead.py). Objects
    released later are still freed by reference counting."""
    gc.collect()
    gc.freeze()


class _AttachFailed(Exception):
    pass


def _read_iterator(bcc: Any, prog_fd: int) -> bytes:
    """Attach a BPF iterator program, read its output to the end."""
    lib = bcc.libbcc.lib
    lib.bcc_iter_attach.restype = ctypes.c_int
    lib.bcc_iter_attach.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    lib.bcc_iter_create.restype = ctypes.c_int
    lib.bcc_iter_create.argtypes = [ctypes.c_int]
    link = lib.bcc_iter_attach(prog_fd, None, 0)
    if link < 0:
        raise OSError(-link, f"cannot attach the iterator: {os.strerror(-link)}")
    try:
        fd = lib.bcc_iter_create(link)
        if fd < 0:
            raise OSError(-fd, f"cannot create the iterator: {os.strerror(-fd)}")
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)
    finally:
        os.close(link)


_DUMP_CHUNK = 4096
_ENOTSUPP = 524   # the kernel's own ENOTSUPP (not in errno): no batch ops for this map


def _dump_hash(table: Any, key_size: int) -> dict[int, bytes]:
    """Every entry of a hash map, key (an unsigned int of ``key_size``
    bytes) -> raw value, with BPF_MAP_LOOKUP_BATCH (v5.6) in chunks of a
    few thousand entries; entry by entry where the kernel has no batch ops."""
    from bcc import libbcc  # noqa: PLC0415  (bcc is imported by the session already)

    lib = libbcc.lib
    vsize = ctypes.sizeof(table.Leaf)
    count = _DUMP_CHUNK
    out: dict[int, bytes] = {}
    token = ctypes.c_uint32(0)
    first = True
    while True:
        keys = ctypes.create_string_buffer(count * key_size)
        values = ctypes.create_string_buffer(count * vsize)
        n = ctypes.c_uint32(count)
        out_token = ctypes.c_uint32(0)
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ctypes.byref(token),
                                   ctypes.byref(out_token), keys, values, ctypes.byref(n))
        err = ctypes.get_errno()
        if res != 0 and err == errno.ENOSPC and count < 1 << 20:
            count *= 4      # one bucket holds more entries than the chunk
            continue
        if res != 0 and err not in (errno.ENOENT, 0):
            if first and err in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                return _dump_slow(table, key_size)
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        kraw, vraw = keys.raw, values.raw
        for i in range(n.value):
            out[int.from_bytes(kraw[i * key_size:(i + 1) * key_size], "little")] = \
                vraw[i * vsize:(i + 1) * vsize]
        if res != 0:
            return out      # ENOENT: that was the last chunk
        token = out_token
        first = False


def _lookup(table: Any, key: Any) -> bytes | None:
    """One entry's raw value, or None if it is gone."""
    try:
        leaf = table[key]
    except KeyError:
        return None
    return ctypes.string_at(ctypes.addressof(leaf), ctypes.sizeof(leaf))


def _dump_slow(table: Any, key_size: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for k, v in table.items():
        out[int(k.value) if hasattr(k, "value") else int.from_bytes(bytes(k), "little")] = \
            ctypes.string_at(ctypes.addressof(v), ctypes.sizeof(v))
    return out


def _census_marker(ts: int) -> bytes:
    """The record that says a census is complete (vma == 0)."""
    return pack_record(ts=ts, kind=int(Kind.CENSUS_VMA), site=int(Site.NONE), comm=b"census")


@contextlib.contextmanager
def _captured_stderr(sink: list[str]) -> Iterator[None]:
    """Collect what libbcc and libbpf print on fd 2 (compiler warnings,
    verifier logs) so the user sees one clear line instead."""
    # A memfd, not a temp file: /tmp may be a 9p share (QEMU guests) where
    # unlinked files cannot be read back.
    saved = os.dup(2)
    fd = os.memfd_create("anontrace-stderr")
    with open(fd, "rb") as tmp:
        os.dup2(fd, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


def _verifier_hint(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("libbpf:", "bpf:")) or "error:" in line:
            return line
    return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
