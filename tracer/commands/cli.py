"""The anontrace command line: thin click commands over the library."""
from __future__ import annotations

import difflib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from exporters.config import DEFAULT_PORT
from tracer import __version__
from tracer.commands.top import SORT_KEYS
from tracer.errors import AnontraceError
from tracer.kernel.kernel_env import KernelEnv
from tracer.model.reuse import RULES as REUSE_RULES

COMMAND_KEY = "anontrace.command"


class _Group(click.Group):
    """A group that also takes `-- COMMAND [ARGS...]` (for itself or `record`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta[COMMAND_KEY] = tuple(args[i + 1:])
            args = args[:i]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return super().collect_usage_pieces(ctx) + ["[-- COMMAND [ARGS...]]"]

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            # `anontrace make -j8`: the program goes after `--`.
            program = " ".join([name, *args[1:]])
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            maybe = f"Did you mean {close[0]!r}? " if close else ""
            raise click.UsageError(
                f"no such subcommand {name!r}. {maybe}To trace a program, put it after --: "
                f"anontrace -- {program}", ctx)
        return super().resolve_command(ctx, args)


def _sigterm_to_interrupt() -> None:
    # Probes are released by context managers; SIGTERM must unwind like Ctrl-C.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _emitter(as_json: bool) -> Callable[[dict[str, Any]], None]:
    from tracer.commands.report import format_table

    def emit(report: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(report))
        else:
            click.echo(format_table(report) + "\n")
        sys.stdout.flush()

    return emit


def _trace_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("-p", "--pid", "pids", type=int, multiple=True,
                     help="Trace this process and its descendants (repeatable)."),
        click.option("--no-children", is_flag=True, help="Do not follow forked children."),
        click.option("-i", "--interval", type=float, default=1.0, show_default=True,
                     help="Seconds between reports."),
        click.option("-d", "--duration", type=float, default=0.0,
                     help="Stop after this many seconds (default: when all traced "
                          "processes have exited, or Ctrl-C)."),
        click.option("--json", "as_json", is_flag=True,
                     help="One JSON object per report; the last has \"final\": true."),
        click.option("--backend", type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
                     default="auto", show_default=True, help="Force a probe method."),
        click.option("--transport", type=click.Choice(["auto", "ringbuf", "perf"]),
                     default="auto", show_default=True, help="Kernel-to-user event transport."),
    ]):
        f = opt(f)
    return f


def _run(ctx: click.Context, pids: tuple[int, ...], no_children: bool, interval: float,
         duration: float, as_json: bool, backend: str, transport: str,
         record: Path | None = None, quiet: bool = False, rmap: bool = True) -> None:
    from tracer.commands.runner import RunSpec, run_live

    command = ctx.meta.get(COMMAND_KEY, ())
    if pids and command:
        raise click.UsageError("give either -p PID or -- COMMAND, not both")
    if not pids and not command:
        raise click.UsageError("nothing to trace: give -p PID or -- COMMAND")
    _sigterm_to_interrupt()
    verb = "Recording" if record else "Tracing"
    spec = RunSpec(pids=pids, command=command, follow_children=not no_children,
                   interval=interval, duration=duration, backend=backend, transport=transport,
                   record=record, rmap=rmap,
                   on_start=lambda b: click.echo(f"Backend: {b}.\n{verb}... Hit Ctrl-C to end.",
                                                 err=True))
    emit = (lambda report: None) if quiet else _emitter(as_json)
    try:
        status = run_live(spec, emit)
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    if record:
        click.echo(f"recorded to {record}", err=True)
    sys.exit(status)


@click.group(cls=_Group, invoke_without_command=True, subcommand_metavar="[SUBCOMMAND [ARGS]...]",
             context_settings={"help_option_names": ["-h", "--help"]})
@_trace_options
@click.option("--no-rmap", is_flag=True,
              help="Do not measure rmap widths (a walk of every VMA on the host per report).")
@click.version_option(__version__, prog_name="anontrace")
@click.pass_context
def main(ctx: click.Context, pids: tuple[int, ...], no_children: bool, interval: float,
         duration: float, as_json: bool, backend: str, transport: str, no_rmap: bool) -> None:
    """Trace the kernel's anon_vma lifecycle with eBPF.

    Without a subcommand, trace -p PIDs (and their descendants) or run
    COMMAND traced from its first instruction, printing a report of each
    process's anon_vmas every interval and a final one at the end.

    \b
    Examples:
      anontrace -p 1234 -i 5            # report PID 1234's family every 5 s
      anontrace --json -- make -j8      # trace a command; exit with its status
      anontrace check                   # what this kernel allows
      anontrace record -o run.atr -- ./app && anontrace replay run.atr
    """
    if ctx.invoked_subcommand is None:
        _run(ctx, pids, no_children, interval, duration, as_json, backend, transport,
             rmap=not no_rmap)
        return
    _refuse_report_options(ctx)


def _refuse_report_options(ctx: click.Context) -> None:
    """Refuse the trace report's options when a subcommand runs instead.

    The subcommand would drop them without a word (`anontrace --backend kprobe
    serve` would run serve with its config's backend).
    """
    given = [p for p in ctx.command.params
             if p.name and not getattr(p, "is_eager", False)
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if not given:
        return
    names = ", ".join(max(p.opts, key=len) for p in given)   # --pid, not -p
    sub = ctx.invoked_subcommand
    hint = f"{sub}'s own options go after its name (anontrace {sub} --help)"
    if sub == "serve" and any(p.name == "backend" for p in given):
        hint = "serve takes its backend from its config file ('backend:')"
    raise click.UsageError(
        f"{names}: an option of the trace report, which {sub!r} would ignore; {hint}", ctx)


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
    from tracer.commands.check import format_check, run_check
    from tracer.kernel.facts import require_root

    started = time.monotonic()
    try:
        require_root()
        click.echo("Probing every backend: compiling, loading and detaching the BPF "
                   "programs (BCC)...", err=True)
        report = run_check(KernelEnv())
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"done in {time.monotonic() - started:.1f} s", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))
    if report["backend"] is None:
        sys.exit(1)


@main.command()
@click.argument("pids", metavar="PID...", type=int, nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per PID, one per line.")
def tree(pids: tuple[int, ...], as_json: bool) -> None:
    """Show each PID's anon_vma hierarchy now: its anonymous VMAs, each
    VMA's chain up to the root, and for each anon_vma its owner, depth,
    children and rmap width (the VMAs an rmap walk of its pages may visit).

    Reads what the kernel holds (a BPF iterator over every VMA on the host);
    traces nothing, so it works on any running process.

    \b
    Examples:
      sudo anontrace tree 1234
      sudo anontrace tree --json $(pgrep -d' ' postgres)
    """
    from tracer.commands.tree import format_tree, run_tree

    try:
        trees = run_tree(pids)
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        for t in trees:
            click.echo(json.dumps(t, separators=(",", ":")))
    else:
        click.echo("\n\n".join(format_tree(t) for t in trees))


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
    from tracer.commands.event_view import format_event, header
    from tracer.format.events import Kind
    from tracer.kernel.bpf_session import TraceOptions, TraceSession
    from tracer.kernel.procs import require_pids

    _sigterm_to_interrupt()
    try:
        require_pids(pids)
        opts = TraceOptions(backend=backend, pids=pids, follow_children=not no_children,
                            transport=transport, object_events=raw)
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
                    if not raw and ev.probe is None and (ev.kind.name.startswith("AV")
                                                         or ev.kind is Kind.SYNC):
                        continue
                    click.echo(json.dumps(ev.to_dict()) if as_json else format_event(ev))
            except KeyboardInterrupt:
                pass
            lost = session.lost()
            if any(lost.values()):
                click.echo(f"lost events: {lost}", err=True)
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Recording file to write.")
@_trace_options
@click.option("-q", "--quiet", is_flag=True, help="Do not print reports while recording.")
@click.pass_context
def record(ctx: click.Context, output: Path, pids: tuple[int, ...], no_children: bool,
           interval: float, duration: float, as_json: bool, backend: str, transport: str,
           quiet: bool) -> None:
    """Trace like `anontrace` and save the raw events for `replay`.

    \b
    Examples:
      sudo anontrace record -o build.atr -- make -j8
      sudo anontrace record -o app.atr -p 1234 -d 60
    """
    _run(ctx.parent or ctx, pids, no_children, interval, duration, as_json, backend,
         transport, record=output, quiet=quiet)


@main.command()
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per report.")
@click.option("--reuse", "reuse", type=click.Choice(REUSE_RULES), multiple=True,
              help="Replay the forks under this anon_vma reuse rule instead "
                   "(repeatable: rules side by side).")
def replay(recording: Path, as_json: bool, reuse: tuple[str, ...]) -> None:
    """Print the reports of a recording, as the live run printed them.

    Needs neither root nor BCC.

    With --reuse, replay the recording's forks, clones and unlinks under
    anon_vma reuse rules instead and print, at each report point, what each
    rule gives (live anon_vmas, chain entries, depth, rmap widths) beside
    the recorded figures. RECORDING may then also be an event stream (JSON
    lines, as tests/fixtures/*/events-*.jsonl), reported after each process
    fork, exec and exit. The rules:

    \b
      kernel        the kernel's (commit 7a3ef208e662 on): a forked VMA
                    reuses the first anon_vma of its chain (oldest first,
                    never the root) that no VMA points at and that has fewer
                    than two children; checked against the recording
                    (DIVERGED: forks where the kernel chose otherwise,
                    followed as recorded)
      none          no reuse, as before that commit: a new anon_vma per
                    forked VMA
      single-child  reuse the first anon_vma of the chain (never the root)
                    with fewer than two children even while VMAs point at
                    it: fewer anon_vmas, wider rmap walks (RMAP_MEAN)

    \b
    Examples:
      anontrace replay build.atr --json
      anontrace replay --reuse kernel --reuse none repro.atr
    """
    if reuse:
        from tracer.commands.whatif import render, run_reuse_replay

        try:
            run_reuse_replay(recording, reuse, lambda r: click.echo(render(r, as_json)))
        except AnontraceError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    from tracer.commands.runner import run_replay

    try:
        run_replay(recording, _emitter(as_json))
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config (default: built-in defaults; see deploy/anontrace.yaml).")
@click.option("--listen", metavar="ADDR:PORT",
              help="Address to serve /metrics on, overriding the config "
                   f"(default 127.0.0.1:{DEFAULT_PORT}; ':PORT' for every interface).")
@click.option("--web.config.file", "web_config_path",
              type=click.Path(dir_okay=False, path_type=Path),
              help="TLS, basic auth and headers for /metrics, in the Prometheus "
                   "exporter-toolkit format (see deploy/web-config.yaml).")
@click.option("--web.telemetry-path", "telemetry_path", default="/metrics", show_default=True,
              help="Path under which the metrics are served.")
@click.option("--log.level", "log_level", type=click.Choice(["debug", "info", "warn", "error"]),
              default="info", show_default=True, help="Least severe log lines written.")
@click.option("--log.format", "log_format", type=click.Choice(["logfmt", "json"]),
              default="logfmt", show_default=True,
              help="Log line format on stderr (timestamped; journald keeps it as is).")
@click.option("--user", metavar="NAME",
              help="Once the probes are attached, run as this user (keeping only CAP_BPF).")
@click.option("--keep-privileges", is_flag=True,
              help="Do not drop capabilities after start-up (debugging only).")
@click.option("--check-config", is_flag=True,
              help="Validate the config (and the web config), print it and exit.")
def serve(config_path: Path | None, listen: str | None, web_config_path: Path | None,
          telemetry_path: str, log_level: str, log_format: str, user: str | None,
          keep_privileges: bool, check_config: bool) -> None:
    """Export anon_vma metrics to Prometheus (system-wide daemon).

    Attaches the probes, keeps the model of every process and serves
    /metrics and a status page. SIGTERM or SIGINT detaches every probe and
    exits 0; SIGHUP reloads the config (selection, top_k, exited_expiry) and
    the web config (TLS, basic auth, headers).

    \b
    Examples:
      sudo anontrace serve
      sudo anontrace serve --config /etc/anontrace/anontrace.yaml --listen :29100
      sudo anontrace serve --web.config.file /etc/anontrace/web-config.yaml
      anontrace serve --config deploy/anontrace.yaml --check-config
    """
    from exporters.config import load_config, parse_listen
    from exporters.web_config import load_web_config

    try:
        cfg = load_config(config_path)
        web = load_web_config(web_config_path)
        if listen is not None:
            try:
                parse_listen(listen)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--listen") from exc
        if not telemetry_path.startswith("/") or telemetry_path == "/":
            raise click.BadParameter("expected a path such as /metrics (not /, the "
                                     "landing page)", param_hint="--web.telemetry-path")
        if check_config:
            click.echo(f"{cfg.source}: ok")
            if web_config_path is not None:
                click.echo(f"{web.source}: ok ({'TLS' if web.tls else 'plain HTTP'}, "
                           f"{len(web.basic_auth_users)} basic-auth users)")
            click.echo(json.dumps(_config_dict(cfg), indent=2))
            return
        from exporters.daemon import PrivilegeOptions, WebOptions, run_serve
        from exporters.logs import setup_logging

        if user is not None and keep_privileges:
            raise click.UsageError("--user and --keep-privileges exclude each other")
        if user is not None:
            import pwd

            try:
                pwd.getpwnam(user)
            except KeyError:
                raise click.BadParameter(f"no such user: {user}", param_hint="--user") from None
        setup_logging(log_level, log_format)
        run_serve(cfg, listen, web=WebOptions(web, telemetry_path),
                  privileges=PrivilegeOptions(not keep_privileges, user))
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc


def _config_dict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    out = dataclasses.asdict(cfg)
    out["selection"]["pids"] = list(out["selection"]["pids"])
    return out


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config whose growth: section sets the thresholds.")
@click.option("--format", "fmt", type=click.Choice(["rules", "prometheusrule"]),
              default="rules", show_default=True,
              help="A Prometheus rule file, or a Prometheus Operator PrometheusRule resource.")
@click.option("--runbook-base-url", "runbook_base", metavar="URL",
              help="Where docs/runbooks.md is published: each alert's runbook_url is "
                   "URL#<alert name in lower case>. Overrides the config's "
                   "runbook_base_url (default: docs/runbooks.md, a repository-relative link).")
def rules(config_path: Path | None, fmt: str, runbook_base: str | None) -> None:
    """Print the Prometheus recording and alerting rules.

    The thresholds and windows come from the config's growth: section; the
    defaults give deploy/prometheus/anontrace.rules.yml and (with --format
    prometheusrule) deploy/kubernetes/prometheusrule.yaml. Every alert links
    its section of docs/runbooks.md (runbook_url annotation).

    \b
    Examples:
      anontrace rules --config /etc/anontrace/anontrace.yaml > anontrace.rules.yml
      anontrace rules --format prometheusrule > prometheusrule.yaml
      anontrace rules --runbook-base-url https://docs.example.org/anontrace/runbooks.html
    """
    from exporters.config import load_config, parse_runbook_base_url
    from exporters.rules import render_prometheus_rule, render_rules

    if runbook_base is not None:
        try:
            parse_runbook_base_url(runbook_base)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--runbook-base-url") from exc
    try:
        cfg = load_config(config_path)
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    base = cfg.runbook_base_url if runbook_base is None else runbook_base
    if fmt == "prometheusrule":
        text = render_prometheus_rule(cfg.growth, runbook_base=base)
    else:
        text = render_rules(cfg.growth, runbook_base=base)
    click.echo(text, nl=False)


@main.command()
@click.argument("interval", type=click.FloatRange(min=0.1), default=1.0, required=False)
@click.argument("count", type=click.IntRange(min=1), required=False)
@click.option("-C", "--noclear", is_flag=True,
              help="Don't clear the screen: print a table every interval (what a pipe gets).")
@click.option("-r", "--maxrows", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows to show at most.")
@click.option("-s", "--sort", type=click.Choice(SORT_KEYS), default="anon_vmas",
              show_default=True, help="Sort key (families: anon_vmas, depth or growth).")
@click.option("--families", is_flag=True,
              help="Start with families (the anon_vmas below the roots one process made).")
@click.option("--no-rmap", is_flag=True,
              help="Do not measure rmap widths (a walk of every VMA on the host per refresh).")
@click.option("--backend", type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
              default="auto", show_default=True, help="Force a probe method.")
def top(interval: float, count: int | None, noclear: bool, maxrows: int, sort: str,
        families: bool, no_rmap: bool, backend: str) -> None:
    """Live view of the processes with the most anon_vmas, system-wide.

    Refreshes every INTERVAL seconds (default 1), COUNT times (default:
    until q or Ctrl-C). On a terminal, keys: q quit, s/S (or >/<) next or
    previous sort key, f processes/families, r reverse the order. Into a
    pipe (or with -C): one plain table per interval.

    \b
    Examples:
      sudo anontrace top                  # refresh every second until q
      sudo anontrace top -s depth 5       # deepest hierarchies first, every 5 s
      sudo anontrace top --families 1 10 | less   # ten tables of families
    """
    from tracer.commands.top_live import TopOptions, run_top

    _sigterm_to_interrupt()
    try:
        sys.exit(run_top(TopOptions(interval=interval, count=count, noclear=noclear,
                                    maxrows=maxrows, sort=sort, families=families,
                                    rmap=not no_rmap, backend=backend),
                         lambda msg: click.echo(msg, err=True)))
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("-d", "--duration", type=float, default=10.0, show_default=True,
              help="Seconds to measure (0: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--top", type=int, default=20, show_default=True,
              help="Families shown, most VMAs visited first (0: all).")
@click.option("--method", type=click.Choice(["auto", "fentry", "kprobe"]), default="auto",
              show_default=True, help="Force an attach method.")
def rmapwalk(duration: float, as_json: bool, top: int, method: str) -> None:
    """Measure the kernel's rmap walks of anonymous pages (false aliasing).

    Per family (root anon_vma): walks, VMAs the walks visited, VMAs that
    mapped the page, their ratio and its histogram. Needs fentry or kprobes.

    \b
    Examples:
      sudo anontrace rmapwalk -d 30          # 30 s, the 20 widest families
      sudo anontrace rmapwalk --json --top 0
    """
    from tracer.commands.rmapwalk_report import format_table, measure, to_json

    if duration < 0 or top < 0:
        raise click.UsageError("--duration and --top take values >= 0")
    _sigterm_to_interrupt()
    try:
        run = measure(duration, method, lambda m: click.echo(
            f"Measuring rmap walks with {m}" + (f" for {duration:g} s" if duration else
                                                 "... Hit Ctrl-C to end") + ".", err=True))
    except AnontraceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(to_json(run, top)) if as_json else format_table(run, top))


if __name__ == "__main__":
    main()
