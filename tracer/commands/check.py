"""`anontrace check`: what this kernel allows and what tracing would use."""
from __future__ import annotations

from typing import Any

from tracer.errors import AnontraceError
from tracer.kernel.bcc_glue import import_bcc
from tracer.kernel.bpf_session import TraceOptions, TraceSession, auto_order
from tracer.kernel.facts import KernelFacts, read_kernel_facts, require_root
from tracer.kernel.kernel_env import KernelEnv, read_lockdown
from tracer.kernel.probes import LOGICAL_PROBES, plan_backend


def run_check(env: KernelEnv) -> dict[str, Any]:
    """Probe every backend for real (load, attach, detach) and report.

    Raises AnontraceError only when nothing can be probed at all
    (not root, BCC missing).
    """
    require_root()
    facts = read_kernel_facts(env)
    if facts.headers is not None:
        facts.headers.apply()
    import_bcc()
    report: dict[str, Any] = {
        "kernel": env.release,
        "btf": {"path": str(env.btf), "present": env.btf.exists(), "error": facts.btf_error,
                "anon_vma_counters": facts.layout.counters if facts.layout else None},
        "lockdown": read_lockdown(env),
        "headers": {"path": str(facts.headers.path) if facts.headers else None,
                    "matching": facts.headers.matching if facts.headers else False,
                    "detail": facts.headers.source if facts.headers else facts.headers_error},
        "kprobes_available": facts.kprobes_available,
        "transport": "ringbuf" if facts.ringbuf_available else "perf",
        # Where the tracepoint backend keeps each task's pending allocations.
        "task_state": "task storage" if facts.task_storage else "hash map",
        # Whether a task can be preempted inside our fentry (and iterator)
        # programs, and inside the tracepoint ones (docs/state.md "Preemption").
        "preemptible": {"fentry": facts.programs_preemptible,
                        "tracepoint": facts.tracepoint_preemptible},
        "slab_sizes": {"anon_vma": facts.av_slab_size, "anon_vma_chain": facts.avc_slab_size},
        "backends": {},
        "backend": None,
        "probes": [],
    }
    chosen = None
    # In the order auto tries them: the first that works is auto's.
    for backend in auto_order(facts):
        entry = _try_backend(backend, facts)
        report["backends"][backend] = {k: v for k, v in entry.items() if k != "probes"}
        if entry["ok"] and chosen is None:
            chosen = entry
            report["backend"] = backend
    if chosen is None:
        # Nothing runs: explain each probe with the most specific reasons.
        chosen = _try_backend("tracepoint", facts, attempt=False)
    report["probes"] = chosen["probes"]
    return report


def _try_backend(backend: str, facts: KernelFacts, attempt: bool = True) -> dict[str, Any]:
    plan = plan_backend(backend, facts.kallsyms, facts.btf, facts.kprobes_available)
    entry: dict[str, Any] = {"ok": False, "error": None}
    if attempt and facts.layout is not None and facts.headers is not None:
        session = TraceSession(TraceOptions(backend=backend, env=facts.env), facts)
        try:
            session.open()
            plan = session.plan or plan
            entry["ok"] = True
        except AnontraceError:
            entry["error"] = session.attempts[-1].error if session.attempts else None
        finally:
            session.close()
    elif attempt:
        entry["error"] = facts.btf_error or facts.headers_error
    entry["probes"] = [
        {"probe": p, "function": plan.probes[p].function if plan.probes[p].ok else None,
         "method": plan.probes[p].method, "reason": plan.probes[p].reason,
         "note": plan.probes[p].note}
        for p in LOGICAL_PROBES]
    if not entry["ok"] and entry["error"]:
        for pr in entry["probes"]:
            if pr["method"] and pr["probe"] != "page_set_anon_rmap" or (
                    pr["method"] and backend != "kprobe"):
                pr["reason"] = pr["reason"] or f"{backend} failed: {entry['error']}"
                pr["method"] = pr["function"] = None
    return entry


def format_check(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`run_check`'s report."""
    lines = [
        f"kernel     {report['kernel']}",
        f"btf        {report['btf']['path']}"
        + (f" (anon_vma counters: {report['btf']['anon_vma_counters']})"
           if report["btf"]["anon_vma_counters"] else f" UNUSABLE: {report['btf']['error']}"),
        f"lockdown   {report['lockdown']}",
        f"headers    {report['headers']['detail']}",
        f"kprobes    {'available' if report['kprobes_available'] else 'unavailable'}",
        f"transport  {report['transport']}",
        f"task state {report['task_state']} (tracepoint backend)",
        "preempts   " + (", ".join(k for k, v in report["preemptible"].items() if v)
                         + " programs (auto prefers kprobes)"
                         if any(report["preemptible"].values()) else "none of our programs"),
        "",
        f"backend    {report['backend'] or 'NONE: nothing can trace on this kernel'}",
    ]
    for name, b in report["backends"].items():
        lines.append(f"  {name:<11} {'ok' if b['ok'] else 'no: ' + str(b['error'])}")
    lines += ["", f"{'PROBE':<19} {'FUNCTION':<27} {'METHOD':<10} NOTE"]
    for p in report["probes"]:
        note = p["note"] or ""
        if p["method"] is None:
            note = p["reason"] or ""
        lines.append(f"{p['probe']:<19} {p['function'] or '-':<27} {p['method'] or '-':<10} "
                     f"{note}")
    return "\n".join(lines)
