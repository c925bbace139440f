"""Loading and attaching the BPF programs (through tracer.kernel.bcc_glue,
the only module that imports bcc), the event transport, the census and the
state maps.

:class:`TraceSession` is a context manager: probes are attached on entry and
always released on exit, including on SIGINT and SIGTERM (the CLI turns
SIGTERM into KeyboardInterrupt).
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
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
    lost_total,
    pack_record,
)
from tracer.kernel.bcc_glue import (
    COMPILER_LIB,
    MADV_DONTNEED,
    AttachFailed,
    attach_raw_tracepoint_copy,
    captured_stderr,
    clean_mappings,
    import_bcc,
    iterator_error,
    last_line,
    load_error,
    new_bpf,
    read_iterator,
    settle_heap,
    verifier_hint,
)
from tracer.kernel.bpf_source import (
    CENSUS_PROGRAM,
    COPIED_TRACEPOINTS,
    COPY_SLOTS,
    MAIN_PROGRAM,
    BuildOptions,
    MapSizes,
    cflags,
)
from tracer.kernel.compat import change
from tracer.kernel.facts import KernelFacts, read_kernel_facts, require_root
from tracer.kernel.kernel_env import (
    Kallsyms,
    KernelEnv,
)
from tracer.kernel.kstate import DecodeCache, KernelState, StateDump
from tracer.kernel.probes import BACKENDS, LOGICAL_PROBES, Plan, plan_backend
from tracer.kernel.state_maps import clear_state, dump_state, forget_processes, read_state
from tracer.pipeline.stream import EventStream

BACKEND_CHOICES = ("auto",) + BACKENDS
KRETPROBE_MAXACTIVE = 512

KPROBE_FUNCS = {  # per logical probe: the kprobe and kretprobe functions
    "anon_vma_fork": ("kp_fork_entry", "kr_fork_exit"),
    "anon_vma_clone": ("kp_clone_entry", "kr_clone_exit"),
    "unlink_anon_vmas": ("kp_unlink_entry", None),
    "page_set_anon_rmap": ("kp_rmap_entry", None),
}


MAX_POLL_BATCH = 8192    # records one poll() takes from the ring buffer at most


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
    seconds: float = 0.0   # compiling, loading and attaching (0: not tried)


def auto_order(facts: KernelFacts) -> list[str]:
    """The backends ``auto`` tries, best first. fentry is the cheapest, but
    where the kernel can preempt a task inside an fentry program
    (compat: preemptible_trampoline) the next task on that CPU skips it and
    its operation is lost; kprobe programs run with preemption disabled, so
    kprobes come first there (docs/state.md "Preemption")."""
    order = list(BACKENDS)
    if facts.programs_preemptible:
        order.remove("kprobe")
        order.insert(0, "kprobe")
    return order


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
        self._perf_lost = 0
        self._stream = EventStream(derive=False)
        self._state_iter: Any = None
        self.facts_seconds = 0.0   # reading kallsyms, BTF and tracefs
        # Tracepoints whose program has a second copy attached (TP_AGAIN).
        self.tp_copies: tuple[str, ...] = ()

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
            started = time.monotonic()
            self.facts = read_kernel_facts(self.options.env)
            self.facts_seconds = time.monotonic() - started
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
        order = (auto_order(facts) if self.options.backend == "auto"
                 else [self.options.backend])
        # Every backend is planned before anything is compiled, so that the
        # whole BTF and symbol table (about 150 MB of Python objects) are
        # gone before BCC runs: what the compile and the load leave behind
        # would otherwise sit among their freed blocks and keep those
        # allocator arenas resident (serve idled at 227 MB RSS; 17 MB of it
        # remains when they are freed first).
        plans = [plan_backend(b, facts.kallsyms, facts.btf, facts.kprobes_available)
                 for b in order]
        self._drop_bulk_facts()
        for backend, plan in zip(order, plans, strict=True):
            if not plan.usable:
                failed = {p: c.reason for p, c in plan.probes.items()
                          if not c.ok and p != "page_set_anon_rmap"}
                reasons = set(failed.values())
                why = (reasons.pop() if len(reasons) == 1 else
                       "; ".join(f"{p}: {r}" for p, r in failed.items()))
                self.attempts.append(Attempt(backend, False, why))
                continue
            started = time.monotonic()
            try:
                self._load(bcc, plan)
            except AttachFailed as exc:
                self.attempts.append(Attempt(backend, False, str(exc),
                                             time.monotonic() - started))
                self._release()
                continue
            self.attempts.append(Attempt(backend, True, None, time.monotonic() - started))
            self.plan = plan
            self._stream = EventStream(derive=backend == "tracepoint" and self.streams_events,
                                       keep_objects=self.options.object_events)
            settle_heap()
            return
        summary = "; ".join(f"{a.backend}: {a.error}" for a in self.attempts)
        raise AnontraceError(f"no backend can trace anon_vmas on this kernel ({summary})")

    def _drop_bulk_facts(self) -> None:
        """Forget the kernel's whole BTF and symbol table once every backend
        is planned: from then on a session needs only the struct layout and
        the plan. Facts a caller passed in stay whole in the caller's hands
        (tests plan several sessions from one read)."""
        if self.facts is not None:
            self.facts = dataclasses.replace(self.facts, btf=None, kallsyms=Kallsyms(""))
            gc.collect()

    def release_compiler_pages(self) -> int:
        """Drop this process's resident pages of the compiler libraries
        (libLLVM, libclang: about 80 MB) once every program a session will
        use is loaded. Only clean file pages are dropped (read-only, no
        anonymous or dirty pages: not the relocated RELRO data), so a later
        compile faults them back in from the page cache unchanged. Returns
        the bytes advised away."""
        libc = ctypes.CDLL(None, use_errno=True)
        done = 0
        for lo, hi in clean_mappings(COMPILER_LIB):
            if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
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
        # What settle_heap froze may now be garbage in cycles (this
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
            raise AnontraceError("this kernel has no BPF ring buffer (since "
                                 f"{change('ringbuf').release}): use --transport perf")
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
            # tracepoint_preemptible implies programs_preemptible.
            scratch_per_task=facts.task_storage and facts.programs_preemptible,
            tp_again=facts.tracepoint_preemptible,
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
            with captured_stderr(captured):
                self._bpf = new_bpf(bcc, src_file=str(MAIN_PROGRAM).encode(), cflags=flags)
        except Exception as exc:  # BCC raises bare Exception on load errors
            raise AttachFailed(load_error(exc, captured)) from exc
        if plan.backend == "kprobe":
            self._attach_kprobes(plan)
        copies = []
        for tp in COPIED_TRACEPOINTS:
            try:
                if attach_raw_tracepoint_copy(self._bpf, tp, f"tp_again__{tp}"):
                    copies.append(tp)
            except Exception as exc:  # BCC raises bare Exception
                raise AttachFailed(f"{tp} (second copy): {last_line(str(exc))}") from exc
        self.tp_copies = tuple(copies)
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
            entry, exit_ = KPROBE_FUNCS[probe]
            assert choice.function is not None   # a working choice names its function
            captured: list[str] = []
            try:
                with captured_stderr(captured):
                    self._bpf.attach_kprobe(event=choice.function.encode(),
                                            fn_name=entry.encode())
                    if exit_:
                        self._bpf.attach_kretprobe(event=choice.function.encode(),
                                                   fn_name=exit_.encode(),
                                                   maxactive=KRETPROBE_MAXACTIVE)
            except Exception as exc:
                msg = last_line(str(exc))
                hint = verifier_hint(captured[0] if captured else "")
                msg += f" ({hint})" if hint else ""
                if probe == "page_set_anon_rmap":
                    choice.method, choice.reason = None, f"attach failed: {msg}"
                    continue
                raise AttachFailed(f"{choice.function}: {msg}") from exc

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
                with captured_stderr(captured):
                    prog = new_bpf(bcc, src_file=str(CENSUS_PROGRAM).encode(), cflags=flags)
                    fn = prog.load_func(b"bpf_iter__task_vma", bcc.BPF.TRACING)
                cached = (prog, fn)
            else:
                prog, fn = cached
            table = prog[b"census_tgids"]
            table.clear()
            for pid in pids or ():
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            raw = read_iterator(bcc, fn.fd)
        except Exception as exc:  # BCC raises bare Exception on load errors
            keep = False
            return b"", iterator_error(exc, captured)
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
        return dump_state(self._table, families)

    def read_state_through(self, cache: DecodeCache) -> KernelState:
        """The state maps decoded as they are read, reusing ``cache``'s rows
        for unchanged entries (`serve`'s once-a-second read)."""
        return read_state(self._table, cache)

    def forget_processes(self, pids: list[int]) -> None:
        """Delete exited processes from the state once they are reported."""
        forget_processes(self._table("st_proc"), pids)

    def clear_state(self) -> None:
        """Empty every state map but the counters (before a resync census)."""
        clear_state(self._table)

    def state_census(self) -> str | None:
        """Seed the state with the VMAs of the processes running now (the
        traced ones, or all), with the main program's task_vma iterator.
        Returns None, or why the kernel would not run it."""
        bcc = import_bcc()
        captured: list[str] = []
        try:
            if self._state_iter is None:
                with captured_stderr(captured):
                    self._state_iter = self._bpf.load_func(b"bpf_iter__task_vma",
                                                           bcc.BPF.TRACING)
            read_iterator(bcc, self._state_iter.fd)
        except Exception as exc:  # BCC raises bare Exception on load errors
            return iterator_error(exc, captured)
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
        return self._stream.feed_records(raw, self.recorder)

    def drain(self) -> list[Event]:
        """Everything still buffered, including derived events held back."""
        out = self.poll(0)
        while True:   # one poll takes at most MAX_POLL_BATCH records
            more = self.poll(0)
            if not more:
                break
            out.extend(more)
        out.extend(self._stream.flush())
        return out

    @property
    def records(self) -> int:
        """Records the BPF side delivered (before derivation)."""
        return self._stream.records

    def lost(self) -> dict[str, int]:
        """Events lost, by reason, counted in the kernel (and perf's lost callback)."""
        out = dict.fromkeys(LOSS_COUNTERS, 0)
        if self._bpf is not None:
            table = self._bpf[b"counters"]
            for i, name in enumerate(LOSS_COUNTERS):
                out[name] = int(sum(table[ctypes.c_int(i)]))
        out["perf_lost"] = self._perf_lost
        out["undecodable"] = self._stream.decode_errors
        out.update(self._recursion_misses())
        return out

    def _fdinfo(self, field: str) -> Iterator[tuple[bytes, int]]:
        """(program name, value) of ``field`` in each loaded program fd's
        fdinfo (/proc/self/fdinfo), for the programs that show it."""
        for name, fn in list(getattr(self._bpf, "funcs", {}).items()):
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    values = [int(line.split()[1]) for line in f
                              if line.startswith(field + ":")]
            except (OSError, ValueError, AttributeError):
                continue
            yield from ((name, v) for v in values)

    def program_ids(self) -> list[int]:
        """Kernel ids of the loaded programs."""
        return sorted(v for _, v in self._fdinfo("prog_id"))

    def _recursion_misses(self) -> dict[str, int]:
        """Program runs the kernel skipped because the program was already
        running on that CPU (bpf_prog_info.recursion_misses; compat:
        recursion_misses), by what a skipped run can have been
        (:func:`program_role`; docs/state.md "Recursion misses"):

        * ``recursion_misses``: programs on rmap functions; each an operation lost;
        * ``lifecycle_recursion_misses``: the fork, exec, exit, free and
          exit_mmap programs without a second copy; each a process event lost;
        * ``tracepoint_recursion_misses``: the kmem and syscall-exit programs,
          and every program whose second copy (TP_AGAIN, where the kernel
          can preempt a task inside a tracepoint program) runs the calls it
          skipped; shown, not lost (tracer.format.events.NOT_LOST). Without
          copies, only interrupts nest in the kmem programs, and their slab
          calls are never rmap ones;
        * ``tracepoint_takeovers``: the calls the second copies ran (shown);
        * ``tracepoint_runs_lost``: where the kernel can preempt tracepoint
          programs but the kmem programs have no copies, their skipped runs,
          lost."""
        out = {"recursion_misses": 0, "lifecycle_recursion_misses": 0,
               "tracepoint_recursion_misses": 0}
        preemptible = self.facts is not None and self.facts.tracepoint_preemptible
        for name, misses in self._fdinfo("recursion_misses"):
            role = program_role(name)
            copied = tracepoint_of(name) in self.tp_copies
            if role == "rmap":
                key = "recursion_misses"
            elif role == "lifecycle" and not copied:
                key = "lifecycle_recursion_misses"
            elif role == "kmem" and preemptible and not copied:
                key = "tracepoint_runs_lost"
            else:
                key = "tracepoint_recursion_misses"
            out[key] = out.get(key, 0) + misses
        if self.tp_copies and self._bpf is not None:
            table = self._bpf[b"tp_taken"]
            out["tracepoint_takeovers"] = sum(int(sum(table[ctypes.c_int(i)]))
                                              for i in range(COPY_SLOTS))
        return out

    def lost_total(self) -> int:
        return lost_total(self.lost())

    def iter_events(self, should_stop: Callable[[], bool], timeout_ms: int = 100
                    ) -> Iterator[Event]:
        while not should_stop():
            yield from self.poll(timeout_ms)
        yield from self.drain()


_LIFECYCLE_TRACEPOINTS = ("sched_process_fork", "sched_process_exec", "sched_process_exit",
                          "sched_process_free", "exit_mmap")


def tracepoint_of(name: bytes | str) -> str | None:
    """The tracepoint a loaded program (by its function name, as BCC names
    it) is attached to, or None for programs on rmap functions."""
    text = name.decode() if isinstance(name, bytes) else name
    if not text.startswith(("raw_tracepoint__", "tracepoint__", "tp_again__")):
        return None
    return text.rsplit("__", 1)[-1]


def program_role(name: bytes | str) -> str:
    """What a loaded program (by its function name in
    bpf_programs/anontrace.bpf.c, as BCC names it) watches: ``rmap`` (an
    rmap function: fentry/fexit, kprobes), ``lifecycle`` (a process's fork,
    exec, exit or free, an mm's teardown), ``kmem`` (a kmem program),
    ``copy`` (a second copy, TP_AGAIN) or ``sys_exit``."""
    text = name.decode() if isinstance(name, bytes) else name
    event = tracepoint_of(text)
    if event is None:
        return "rmap"
    if text.startswith("tp_again__"):
        return "copy"
    if event in _LIFECYCLE_TRACEPOINTS:
        return "lifecycle"
    return "kmem" if event.startswith("kmem_cache_") else "sys_exit"


def _census_marker(ts: int) -> bytes:
    """The record that says a census is complete (vma == 0)."""
    return pack_record(ts=ts, kind=int(Kind.CENSUS_VMA), site=int(Site.NONE), comm=b"census")


