"""What the running kernel offers, read once before anything is compiled:
kallsyms, BTF and the struct layout, tracefs formats, slab sizes, headers,
and the features each build option depends on (the feature tests and the
kernel commits behind them are in tracer.kernel.compat)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from tracer.errors import AnontraceError
from tracer.kernel.btf import Btf, BtfError, load_btf
from tracer.kernel.compat import (
    kmem_free_has_name,
    kmem_raw_cache_args,
    no_prealloc_allowed,
    programs_preemptible,
    ringbuf_available,
    task_storage_available,
    tracepoint_programs_preemptible,
)
from tracer.kernel.headers import Headers, HeadersError, find_headers
from tracer.kernel.kernel_env import (
    Kallsyms,
    KernelEnv,
    KernelEnvError,
    ensure_tracefs,
    preempt_model,
    slab_object_size,
    tracepoint_fields,
    tracepoint_format,
)
from tracer.kernel.layout import KernelLayout, read_layout


def require_root() -> None:
    if os.geteuid() != 0:
        raise AnontraceError("anontrace needs root (CAP_BPF, CAP_PERFMON and "
                             "CAP_SYS_ADMIN) to load BPF programs: run it with sudo")


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
    # Skipped runs of tracepoint programs may be other tasks' operations
    # (tracer.kernel.compat.tracepoint_programs_preemptible).
    tracepoint_preemptible: bool = False
    # A task can be preempted inside an fentry, fexit or iterator program
    # (tracer.kernel.compat.programs_preemptible).
    programs_preemptible: bool = False


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
    model = preempt_model(env)
    try:
        headers, headers_error = find_headers(env), None
    except (HeadersError, OSError) as exc:
        headers, headers_error = None, str(exc)
    return KernelFacts(
        env=env, kallsyms=kallsyms, btf=btf, btf_error=btf_error, layout=layout,
        kprobes_available=(env.tracefs / "kprobe_events").exists(),
        ringbuf_available=ringbuf_available(kallsyms),
        task_storage=task_storage_available(kallsyms),
        kmem_free_has_name=kmem_free_has_name(tracepoint_fields(free_fmt)),
        exit_mmap_tracepoint=tracepoint_format(env, "mmap", "exit_mmap") is not None,
        kmem_raw=kmem_raw_cache_args(btf),
        no_prealloc=no_prealloc_allowed(kallsyms),
        av_slab_size=slab_object_size(env, "anon_vma"),
        avc_slab_size=slab_object_size(env, "anon_vma_chain"),
        headers=headers, headers_error=headers_error,
        tracepoint_preemptible=tracepoint_programs_preemptible(kallsyms, model),
        programs_preemptible=programs_preemptible(kallsyms, model))

