"""Measuring the kernel's rmap walks of anonymous folios (false aliasing).

``bpf_programs/rmapwalk.bpf.c`` follows every ``rmap_walk_anon()`` call and
counts the VMAs its interval-tree iteration returns against the VMAs that
map the folio (docs/rmap-walks.md). This module decides where it attaches
(fentry where the kernel allows it, else kprobes: from kallsyms and BTF,
then confirmed by attaching), holds the one function that parameterises
its source (:func:`walk_cflags`), and reads its map into
:class:`tracer.format.rmapwalk.WalkStats`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

from tracer.errors import AnontraceError
from tracer.format.rmapwalk import NBINS, WalkStats, decode_stats, layout_mismatch
from tracer.kernel.bcc_glue import (
    captured_stderr,
    dump_hash,
    import_bcc,
    last_line,
    load_error,
    new_bpf,
    verifier_hint,
)
from tracer.kernel.bpf_source import BPF_DIR
from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.facts import KernelFacts, read_kernel_facts, require_root
from tracer.kernel.kernel_env import Kallsyms, KernelEnv
from tracer.kernel.layout import WalkLayout, read_walk_layout

WALK_PROGRAM = BPF_DIR / "rmapwalk.bpf.c"
WALK_FUNCTION = "rmap_walk_anon"
ITERATORS = ("anon_vma_interval_tree_iter_first", "anon_vma_interval_tree_iter_next")
METHODS = ("fentry", "kprobe")
METHOD_CHOICES = ("auto",) + METHODS
_METHOD_CODES = {"fentry": 1, "kprobe": 2}
LOSS_COUNTERS = ("roots_full", "walkers_full")   # C_* of rmapwalk.bpf.c, in order
KRETPROBE_MAXACTIVE = 512   # walks sleep (locks, cond_resched): many run at once
DEFAULT_MAX_ROOTS = 16384


@dataclass(frozen=True)
class WalkPlan:
    """Where the program attaches with one method, or why it cannot."""

    method: str
    reason: str | None = None       # None: usable
    folio_idx: int = 0              # WALK_FUNCTION's folio (or page) parameter
    nargs: int = 3                  # WALK_FUNCTION's parameter count
    iter_nargs: tuple[int, int] = (3, 3)

    @property
    def usable(self) -> bool:
        return self.reason is None


def _folio_param(btf: Btf) -> tuple[int, int]:
    params = btf.func_params(WALK_FUNCTION)
    for i, p in enumerate(params):
        if p.type_name in ("struct folio *", "struct page *"):
            if i > 2:
                raise BtfError(f"{WALK_FUNCTION}: the folio is parameter {i + 1}; "
                               "only the first three are supported")
            return i, len(params)
    raise BtfError(f"{WALK_FUNCTION} has no folio or page parameter in BTF")


def plan_walks(method: str, kallsyms: Kallsyms, btf: Btf | None,
               kprobes_available: bool) -> WalkPlan:
    """Resolve the attach points for ``method`` from features only (the
    loader's attach attempt has the last word)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    missing = [f for f in (WALK_FUNCTION, *ITERATORS) if f not in kallsyms]
    if missing:
        return WalkPlan(method, f"{', '.join(missing)} not in kallsyms (inlined or absent)")
    if method == "kprobe" and not kprobes_available:
        return WalkPlan(method, "kprobes unavailable (no kprobe_events: CONFIG_KPROBES off?)")
    if btf is None:
        return WalkPlan(method, "no BTF (struct offsets and prototypes come from it)")
    try:
        folio_idx, nargs = _folio_param(btf)
        iter_nargs = tuple(len(btf.func_params(f)) for f in ITERATORS)
    except BtfError as exc:
        if method == "fentry":
            return WalkPlan(method, f"{exc} (fentry needs the prototype)")
        # kprobes read registers: the usual position of the folio will do.
        folio_idx, nargs, iter_nargs = 0, 3, (3, 3)
    return WalkPlan(method, None, folio_idx, nargs, (iter_nargs[0], iter_nargs[1]))


def _args(n: int) -> str:
    return ", ".join(f"u64 a{i}" for i in range(n))


def walk_cflags(plan: WalkPlan, layout: WalkLayout,
                max_roots: int = DEFAULT_MAX_ROOTS) -> list[str]:
    """Every substitution into rmapwalk.bpf.c, as -D flags."""
    if not plan.usable:
        raise ValueError(f"plan for {plan.method} is not usable: {plan.reason}")
    d: dict[str, int | str | None] = dict(layout.defines())
    d["WALK_METHOD"] = _METHOD_CODES[plan.method]
    d["WALK_FUNC"] = WALK_FUNCTION
    d["WALK_ARGS"] = _args(plan.nargs)
    d["WALK_FOLIO"] = f"a{plan.folio_idx}"
    d["WALK_FOLIO_IDX"] = plan.folio_idx
    d["ITER_FIRST_ARGS"] = _args(plan.iter_nargs[0])
    d["ITER_NEXT_ARGS"] = _args(plan.iter_nargs[1])
    d["NBINS"] = NBINS
    d["MAX_ROOTS"] = max_roots
    return [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted(d.items())]


@dataclass
class WalkReading:
    """The map read once: per root, and the losses so far."""

    roots: list[WalkStats]
    lost: dict[str, int] = field(default_factory=dict)


class RmapWalkSession:
    """The attached rmap-walk program; probes are released on exit.

    >>> with RmapWalkSession() as s:   # doctest: +SKIP
    ...     time.sleep(10); print(s.read().roots)
    """

    def __init__(self, method: str = "auto", env: KernelEnv | None = None,
                 facts: KernelFacts | None = None, max_roots: int = DEFAULT_MAX_ROOTS) -> None:
        if method not in METHOD_CHOICES:
            raise AnontraceError(f"unknown method {method!r}; choose one of "
                                 f"{', '.join(METHOD_CHOICES)}")
        self.method_wanted = method
        self.env = env or KernelEnv()
        self.facts = facts
        self.max_roots = max_roots
        self.method: str | None = None
        self.attempts: dict[str, str | None] = {}   # method -> None (ok) or why not
        self._bpf: Any = None

    def __enter__(self) -> RmapWalkSession:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Compile, load and attach with the first method that works."""
        require_root()
        if self.facts is None:
            self.facts = read_kernel_facts(self.env)
        facts = self.facts
        if facts.btf is None:
            raise AnontraceError(f"cannot read struct offsets from BTF: {facts.btf_error}")
        try:
            layout = read_walk_layout(facts.btf)
        except BtfError as exc:
            raise AnontraceError(f"cannot measure rmap walks: {exc}") from exc
        if facts.headers is None:
            raise AnontraceError(str(facts.headers_error))
        facts.headers.apply()
        bcc = import_bcc()
        order = list(METHODS) if self.method_wanted == "auto" else [self.method_wanted]
        for method in order:
            plan = plan_walks(method, facts.kallsyms, facts.btf, facts.kprobes_available)
            if not plan.usable:
                self.attempts[method] = plan.reason
                continue
            try:
                self._load(bcc, plan, layout)
            except _Refused as exc:
                self.attempts[method] = str(exc)
                self._release()
                continue
            self.attempts[method] = None
            self.method = method
            return
        raise AnontraceError(refusal_message(self.attempts))

    def _load(self, bcc: Any, plan: WalkPlan, layout: WalkLayout) -> None:
        flags = walk_cflags(plan, layout, self.max_roots) + ["-w"]
        captured: list[str] = []
        try:
            # fentry/fexit programs attach as they load.
            with captured_stderr(captured):
                self._bpf = new_bpf(bcc, src_file=str(WALK_PROGRAM).encode(), cflags=flags)
        except Exception as exc:  # BCC raises bare Exception on load errors
            raise _Refused(load_error(exc, captured)) from exc
        if plan.method == "kprobe":
            self._attach_kprobes()
        leaf = self._bpf[b"walk_stats"].Leaf
        bad = layout_mismatch([f[0] for f in leaf._fields_], ctypes.sizeof(leaf))
        if bad:
            raise AnontraceError(f"{WALK_PROGRAM.name} and tracer/format/rmapwalk.py "
                                 f"disagree: {bad}")

    def _attach_kprobes(self) -> None:
        captured: list[str] = []
        try:
            with captured_stderr(captured):
                self._bpf.attach_kprobe(event=WALK_FUNCTION.encode(), fn_name=b"kp_walk_entry")
                self._bpf.attach_kretprobe(event=WALK_FUNCTION.encode(), fn_name=b"kr_walk_exit",
                                           maxactive=KRETPROBE_MAXACTIVE)
                for it in ITERATORS:
                    self._bpf.attach_kretprobe(event=it.encode(), fn_name=b"kr_iter_exit",
                                               maxactive=KRETPROBE_MAXACTIVE)
        except Exception as exc:  # BCC raises bare Exception on attach errors
            hint = verifier_hint(captured[0] if captured else "")
            raise _Refused(last_line(str(exc)) + (f" ({hint})" if hint else "")) from exc

    def read(self) -> WalkReading:
        """Every root's figures since the program was attached."""
        if self._bpf is None:
            raise AnontraceError("rmap-walk session is not open")
        raw = dump_hash(self._bpf[b"walk_stats"], 8)
        counters = self._bpf[b"walk_counters"]
        lost = {name: int(sum(counters[ctypes.c_int(i)]))
                for i, name in enumerate(LOSS_COUNTERS)}
        return WalkReading([decode_stats(root, value) for root, value in raw.items()], lost)

    def close(self) -> None:
        """Detach every probe and free the maps. Safe to call twice."""
        self._release()

    def _release(self) -> None:
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None


class _Refused(Exception):
    """This method cannot attach here (the message says why)."""


def refusal_message(attempts: dict[str, str | None]) -> str:
    """The one-line error when no method could attach."""
    if len(attempts) == 1:
        (method, why), = attempts.items()
        return f"cannot measure rmap walks: {method} cannot attach to {WALK_FUNCTION} ({why})"
    tried = "; ".join(f"{m}: {why}" for m, why in attempts.items())
    return (f"cannot measure rmap walks: neither fentry nor kprobes can attach to "
            f"{WALK_FUNCTION} on this kernel ({tried})")
