"""The anontrace command line: thin click commands over the library."""
from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click

from tracer import __version__
from tracer.errors import AnontraceError
from tracer.kernel_env import KernelEnv


def _sigterm_to_interrupt() -> None:
    # Probes are released by context managers; SIGTERM must unwind like Ctrl-C.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anontrace")
def main() -> None:
    """Trace the kernel's anon_vma lifecycle with eBPF.

    \b
    Examples:
      anontrace check              # what this kernel allows
      anontrace events -p 1234     # stream events of PID 1234 and its children
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(as_json: bool) -> None:
    """Report the kernel's features and how each probe would attach.

    Loads, attaches and detaches every backend for real. Exits non-zero only
    when no backend can trace.

    \b
    Example:
      sudo anontrace check --json
    """
    from tracer.check import format_check, run_check

    try:
        report = run_check(KernelEnv())
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))
    if report["backend"] is None:
        sys.exit(1)


@main.command()
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Trace this process (repeatable); default: all processes.")
@click.option("--no-children", is_flag=True, help="Do not follow processes forked by --pid.")
@click.option("--backend", type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
              default="auto", show_default=True, help="Force a probe method.")
@click.option("--transport", type=click.Choice(["auto", "ringbuf", "perf"]), default="auto",
              show_default=True, help="Kernel-to-user event transport.")
@click.option("-d", "--duration", type=float, default=0.0,
              help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--raw", is_flag=True,
              help="Also print anon_vma / anon_vma_chain allocations and frees.")
def events(pids: tuple[int, ...], no_children: bool, backend: str, transport: str,
           duration: float, as_json: bool, raw: bool) -> None:
    """Stream anon_vma lifecycle events as they happen.

    \b
    Example:
      sudo anontrace events -p 1234 --json -d 10
    """
    from tracer.bpf_session import TraceOptions, TraceSession
    from tracer.event_view import format_event, header
    from tracer.procs import require_pids

    _sigterm_to_interrupt()
    try:
        require_pids(pids)
        opts = TraceOptions(backend=backend, pids=pids, follow_children=not no_children,
                            transport=transport)
        with TraceSession(opts) as session:
            assert session.plan is not None
            click.echo(f"Tracing with {session.plan.backend} ({session.transport})... "
                       "Hit Ctrl-C to end.", err=True)
            if not as_json:
                click.echo(header())
            deadline = time.monotonic() + duration if duration else None
            try:
                for ev in session.iter_events(
                        lambda: deadline is not None and time.monotonic() >= deadline):
                    if not raw and ev.probe is None and ev.kind.name.startswith("AV"):
                        continue
                    click.echo(json.dumps(ev.to_dict()) if as_json else format_event(ev))
            except KeyboardInterrupt:
                pass
            lost = session.lost()
            if any(lost.values()):
                click.echo(f"lost events: {lost}", err=True)
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
