"""Which kernel function and method each logical probe uses.

Decided from the running kernel's features (kallsyms, BTF, tracefs) and then
confirmed by attach attempts in :mod:`tracer.kernel.bpf_session`; never by version.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.compat import RMAP_CANDIDATES, anon_vma_clone_nargs
from tracer.kernel.kernel_env import Kallsyms, Symbol

LOGICAL_PROBES = ("anon_vma_fork", "anon_vma_clone", "unlink_anon_vmas", "page_set_anon_rmap")
BACKENDS = ("fentry", "kprobe", "tracepoint")


# kmem call sites: allocations and frees of anon_vma / anon_vma_chain objects
# happen in these functions because anon_vma_alloc(), anon_vma_chain_alloc()
# and their frees are static inlines in mm/rmap.c.
KMEM_SITES = {
    "FORK": "anon_vma_fork",
    "CLONE": "anon_vma_clone",
    "PREPARE": "__anon_vma_prepare",
    "UNLINK": "unlink_anon_vmas",
    "PUT": "__put_anon_vma",
}
# Out-of-line copies of the inline helpers, where a compiler emitted one.
KMEM_OTHER_SITES = ("anon_vma_alloc", "anon_vma_chain_alloc", "anon_vma_free",
                    "anon_vma_chain_free")

METHOD_CODES = {"fentry": 1, "kprobe": 2, "tracepoint": 3}


@dataclass
class ProbeChoice:
    """The resolution of one logical probe."""

    probe: str
    function: str | None = None
    method: str | None = None  # fentry, fexit, kprobe, kretprobe, tracepoint
    reason: str | None = None  # why nothing works, or a caveat
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class RmapArgs:
    """Argument positions of the page_set_anon_rmap function, from BTF."""

    function: str
    nargs: int
    vma: int
    page: int
    addr: int  # -1: no address parameter


@dataclass
class Plan:
    """Everything the BPF program needs to know about probe placement."""

    backend: str
    probes: dict[str, ProbeChoice]
    sites: dict[str, Symbol]
    other_site: Symbol | None = None
    rmap: RmapArgs | None = None
    clone_nargs: int = 2
    errors: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """The core lifecycle probes all resolved."""
        return all(self.probes[p].ok for p in LOGICAL_PROBES[:3])


def kmem_sites(kallsyms: Kallsyms) -> tuple[dict[str, Symbol], list[str]]:
    """Call-site ranges for kmem filtering, and the functions missing."""
    sites, missing = {}, []
    for key, fn in KMEM_SITES.items():
        sym = kallsyms.get(fn)
        if sym is None:
            missing.append(fn)
        else:
            sites[key] = sym
    return sites, missing


def rmap_args(btf: Btf, function: str) -> RmapArgs:
    """Find the vma, page/folio and address parameters by type and name."""
    params = btf.func_params(function)
    vma = page = addr = -1
    for i, p in enumerate(params):
        if vma < 0 and p.type_name == "struct vm_area_struct *":
            vma = i
        elif page < 0 and p.type_name in ("struct page *", "struct folio *"):
            page = i
        elif addr < 0 and p.name in ("address", "addr"):
            addr = i
    if vma < 0 or page < 0:
        raise BtfError(f"{function} has no vma or page/folio parameter in BTF")
    if max(vma, page, addr) > 4:
        raise BtfError(f"{function}: arguments beyond the fifth are not supported")
    return RmapArgs(function, len(params), vma, page, addr)


def plan_backend(backend: str, kallsyms: Kallsyms, btf: Btf | None,
                 kprobes_available: bool) -> Plan:
    """Resolve the four logical probes for one backend, from features only.

    Attach attempts (done by the loader) may still mark probes unavailable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    sites, missing_sites = kmem_sites(kallsyms)
    other = next((kallsyms.get(f) for f in KMEM_OTHER_SITES if f in kallsyms), None)
    plan = Plan(backend, {}, sites, other_site=other, clone_nargs=anon_vma_clone_nargs(btf))
    if missing_sites:
        plan.errors.append("kmem call-site functions missing from kallsyms: "
                           + ", ".join(missing_sites))
    if kallsyms.hidden:
        plan.errors.append("kallsyms addresses are hidden (kptr_restrict); run as root")

    for probe in LOGICAL_PROBES[:3]:
        plan.probes[probe] = _core_choice(backend, probe, kallsyms, btf, kprobes_available,
                                          missing_sites)
    plan.probes["page_set_anon_rmap"] = _rmap_choice(plan, backend, kallsyms, btf,
                                                     kprobes_available)
    return plan


def _core_choice(backend: str, probe: str, kallsyms: Kallsyms, btf: Btf | None,
                 kprobes_available: bool, missing_sites: list[str]) -> ProbeChoice:
    choice = ProbeChoice(probe)
    at_exit = probe != "unlink_anon_vmas"
    if backend == "tracepoint":
        if missing_sites:
            choice.reason = "kmem call sites missing: " + ", ".join(missing_sites)
        else:
            choice.function = "kmem:kmem_cache_alloc/free"
            choice.method = "tracepoint"
            choice.note = (f"derived from anon_vma/anon_vma_chain allocations in {probe}"
                           if probe != "unlink_anon_vmas"
                           else "derived from anon_vma_chain frees in unlink_anon_vmas")
        return choice
    if probe not in kallsyms:
        choice.reason = f"{probe} is not in kallsyms"
        return choice
    if backend == "fentry":
        if btf is None or not btf.has_func(probe):
            choice.reason = f"{probe} has no BTF prototype (fentry needs one)"
            return choice
        choice.method = "fexit" if at_exit else "fentry"
    else:
        if not kprobes_available:
            choice.reason = "kprobes unavailable (no kprobe_events: CONFIG_KPROBES off?)"
            return choice
        choice.method = "kretprobe" if at_exit else "kprobe"
    choice.function = probe
    return choice


def _rmap_choice(plan: Plan, backend: str, kallsyms: Kallsyms, btf: Btf | None,
                 kprobes_available: bool) -> ProbeChoice:
    choice = ProbeChoice("page_set_anon_rmap")
    if backend == "tracepoint":
        choice.reason = ("no tracepoint marks a page joining an anon_vma; needs fentry or "
                         "kprobe on one of " + ", ".join(RMAP_CANDIDATES))
        return choice
    if backend == "kprobe" and not kprobes_available:
        choice.reason = "kprobes unavailable (no kprobe_events: CONFIG_KPROBES off?)"
        return choice
    tried = []
    for fn in RMAP_CANDIDATES:
        if fn not in kallsyms:
            tried.append(f"{fn}: not in kallsyms (inlined or absent)")
            continue
        if btf is None:
            tried.append(f"{fn}: no BTF to locate its arguments")
            continue
        try:
            args = rmap_args(btf, fn)
        except BtfError as exc:
            tried.append(f"{fn}: {exc}")
            continue
        plan.rmap = args
        choice.function = fn
        choice.method = "fentry" if backend == "fentry" else "kprobe"
        if fn.endswith("add_new_anon_rmap"):
            choice.note = "new private pages only (swap-in and migration not seen)"
        return choice
    choice.reason = "; ".join(tried)
    return choice
