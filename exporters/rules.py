"""Prometheus recording and alerting rules for the metrics of `anontrace serve`.

`render_rules(growth)` returns the rule file as YAML text; `anontrace rules`
prints it and deploy/prometheus/anontrace.rules.yml is its output for the
default GrowthConfig. The thresholds and durations come from the config's
``growth:`` section; everything else here is fixed.

What "grows steadily" means
---------------------------
A process tree that forks short-lived children forever makes its anon_vma
counts swing up and down around a constant, often by more than a threshold
between two samples, so ``delta()`` or ``x - x offset W`` alone would fire on
noise. For a series x, a window W, a slice S = W/5 and the half-window
H = W/2, the rules compare the *lowest* value of a recent slice with the
*highest* value of an older one, which no oscillation can make positive:

* rise        = min_over_time(x[S]) - max_over_time(x[S] offset W)
* recent half = min_over_time(x[S]) - max_over_time(x[S] offset H)
* older half  = min_over_time(x[S] offset H) - max_over_time(x[S] offset W)

The "steady rise" is the rise, kept only while both halves rose as well: a
single jump (a big process starting) lies in one half only and never
qualifies, nor does a sawtooth whose peaks do not climb. An alert fires when
the steady rise reached its threshold and stayed there for ``for``; the
depth alert also wants the depth not below its maximum of the last S (it
never fell while the alert was pending).

Every expression keeps the labels of the scraped series (job, instance and,
for families, family and comm), so one rule file serves a whole fleet: each
exporter instance, and each family on it, is judged on its own.

Every alert carries a ``runbook_url`` annotation: the runbooks' base
(``docs/runbooks.md`` by default, the config's ``runbook_base_url`` or
``anontrace rules --runbook-base-url``), "#" and `runbook_anchor(alert)`, the
alert's name in lower case, which docs/runbooks.md defines with an explicit
``<a id=...>`` (tests/unit/test_rules.py checks that every anchor exists).

This module only builds text; it imports neither BCC nor the tracer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from exporters.config import DEFAULT_RUNBOOK_BASE_URL, GrowthConfig, parse_runbook_base_url
from exporters.metrics_spec import BY_NAME

# How long a detached probe or an unreachable exporter must last before it
# alerts. Fixed: these are not growth and do not follow growth.window/for.
OPERATIONAL_FOR_SECONDS = 300.0
# How far back AnontraceProbeDetached looks for a probe that used to attach on
# an instance: long enough to span a kernel upgrade and its reboot.
PROBE_HISTORY = "7d"
# `up` series of anontrace targets: the shipped scrape configs name their jobs
# "anontrace" and "anontrace-kubernetes"; the ServiceMonitor's job is the
# Service name, "anontrace".
ANONTRACE_JOB_RE = "anontrace.*"


# --- Prometheus durations ------------------------------------------------------

_UNITS_MS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def prometheus_duration(seconds: float) -> str:
    """Render seconds as a Prometheus duration: 900 -> "15m", 5400 -> "1h30m".

    Rounds to whole milliseconds, Prometheus' resolution. Raises ValueError
    for anything that is not a positive finite number of at least 1 ms.
    """
    if not _is_number(seconds):
        raise ValueError(f"expected a finite number of seconds, got {seconds!r}")
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"expected a duration of at least 1ms, got {seconds!r} s")
    parts = []
    for unit, size in _UNITS_MS:
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def _is_number(value: object) -> bool:
    """A finite int or float (bool excluded)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(value: float) -> str:
    """A threshold as PromQL text: 5 -> "5", 2.5 -> "2.5"."""
    if not _is_number(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# --- the rule model -------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """A recording rule."""

    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    """An alerting rule; `for_` is a rendered duration."""

    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


@dataclass(frozen=True)
class Group:
    """A rule group: its recording rules come first, so the alerts of the same
    evaluation already see them."""

    name: str
    rules: tuple[Record | Alert, ...]


@dataclass(frozen=True)
class _Durations:
    window: str   # W
    half: str     # H = W/2
    slice: str    # S = W/5
    for_: str

    @classmethod
    def of(cls, growth: GrowthConfig) -> _Durations:
        w = growth.window_seconds
        f = growth.for_seconds
        if not (_is_number(f) and f >= 0):
            raise ValueError(f"growth.for_seconds: expected a duration >= 0, got {f!r}")
        # S = W/5 must hold at least one millisecond for the slices to mean anything.
        if not (_is_number(w) and w >= 0.005):
            raise ValueError(f"growth.window_seconds: expected a duration of at least 5ms, "
                             f"got {w!r}")
        return cls(window=prometheus_duration(w), half=prometheus_duration(w / 2),
                   slice=prometheus_duration(w / 5),
                   for_=prometheus_duration(f) if f > 0 else "0s")


def _check_metric(name: str) -> str:
    """`name` must be in the metric contract (exporters.metrics_spec)."""
    base = name.removesuffix("_total")
    if base not in BY_NAME:
        raise KeyError(f"{name} is not in exporters.metrics_spec")
    return name


def _rise(metric: str, d: _Durations) -> str:
    return (f"min_over_time({metric}[{d.slice}])\n"
            f"  - max_over_time({metric}[{d.slice}] offset {d.window})")


def _steady_rise(metric: str, d: _Durations) -> str:
    return (f"(\n"
            f"  min_over_time({metric}[{d.slice}])\n"
            f"    - max_over_time({metric}[{d.slice}] offset {d.window})\n"
            f")\n"
            f"and (\n"
            f"  min_over_time({metric}[{d.slice}])\n"
            f"    - max_over_time({metric}[{d.slice}] offset {d.half})\n"
            f") > 0\n"
            f"and (\n"
            f"  min_over_time({metric}[{d.slice}] offset {d.half})\n"
            f"    - max_over_time({metric}[{d.slice}] offset {d.window})\n"
            f") > 0")


def _growth_records(level: str, metric: str, d: _Durations) -> tuple[Record, Record]:
    """`<level>:<metric>:rise_window` and `...:steady_rise_window` for a gauge."""
    _check_metric(metric)
    return (Record(f"{level}:{metric}:rise_window", _rise(metric, d)),
            Record(f"{level}:{metric}:steady_rise_window", _steady_rise(metric, d)))


def runbook_anchor(alert: str) -> str:
    """The anchor of an alert's section in docs/runbooks.md: its name in lower case."""
    return alert.lower()


def runbook_url(alert: str, base: str = DEFAULT_RUNBOOK_BASE_URL) -> str:
    """The runbook_url annotation of `alert`: ``<base>#<anchor>``.

    Raises ValueError for a base that parse_runbook_base_url refuses.
    """
    return f"{parse_runbook_base_url(base)}#{runbook_anchor(alert)}"


def rule_names(growth: GrowthConfig) -> dict[str, list[str]]:
    """{"record": [...], "alert": [...]}: every rule name render_rules emits."""
    out: dict[str, list[str]] = {"record": [], "alert": []}
    for group in build_groups(growth):
        for rule in group.rules:
            if isinstance(rule, Record):
                out["record"].append(rule.record)
            else:
                out["alert"].append(rule.alert)
    return out


_FAMILY = "family {{ $labels.family }} ({{ $labels.comm }}) on {{ $labels.instance }}"
_WHO = ("the process family whose root anon_vma was created by pid {{ $labels.family }} "
        "({{ $labels.comm }}) on {{ $labels.instance }}")
_WHO_CAP = "T" + _WHO[1:]
_FAMILY_CHECK = (
    "To investigate, on {{ $labels.instance }}: `anontrace -p {{ $labels.family }} -i 10` "
    "traces the family from now on and prints each process's AVS, CHAINS and DEPTH "
    "(if that pid has exited, pick its busiest descendants from the top-K series: "
    "topk(5, anontrace_process_max_depth{instance=\"{{ $labels.instance }}\"}) or "
    "topk(5, anontrace_process_anon_vmas{instance=\"{{ $labels.instance }}\"})); "
    "`pstree -p {{ $labels.family }}` shows the process tree. "
    "`anontrace record -o family.rec -p PID` keeps the event stream for "
    "`anontrace replay` later.")


def build_groups(growth: GrowthConfig) -> tuple[Group, ...]:
    """The rule groups for these growth settings (what render_rules prints)."""
    d = _Durations.of(growth)
    w = d.window
    depth_n = _number(growth.min_depth_increase)
    family_n = _number(growth.min_family_anon_vmas_increase)
    orphan_n = _number(growth.min_orphaned_increase)
    host_n = _number(growth.min_host_anon_vmas_increase)

    fam = "instance_family"
    depth = _growth_records(fam, "anontrace_family_max_depth", d)
    fam_avs = _growth_records(fam, "anontrace_family_anon_vmas", d)
    fam_orph = _growth_records(fam, "anontrace_family_orphaned_anon_vmas", d)
    host_avs = _growth_records("instance", "anontrace_anon_vmas", d)
    host_orph = _growth_records("instance", "anontrace_orphaned_anon_vmas", d)
    lost = Record("instance:anontrace_lost_events:increase_window",
                  f"increase({_check_metric('anontrace_lost_events_total')}[{w}])")

    steady = (f"rose in both halves of the window (not a single jump, not an "
              f"oscillation: every recent sample is above every sample {w} ago)")

    family_group = Group("anontrace-family", (
        *depth, *fam_avs, *fam_orph,
        Alert(
            alert="AnontraceFamilyDeepening",
            expr=(f"{depth[1].record} >= {depth_n}\n"
                  f"and anontrace_family_max_depth\n"
                  f"  >= max_over_time(anontrace_family_max_depth[{d.slice}])"),
            for_=d.for_, severity="critical",
            summary=f"anon_vma hierarchy of {_FAMILY} keeps deepening",
            description=(
                f"The deepest live anon_vma of {_WHO} is {{{{ $value }}}} levels deeper than "
                f"{w} ago; the depth {steady} and has not fallen since. Each fork "
                f"of a process whose anon_vmas came from its parent adds a level, so a "
                f"chain of forking generations that cannot reuse their ancestors' anon_vmas "
                f"(typically each forks the next without exec and stays alive, so no "
                f"ancestor is free for reuse) makes fork, exit, munmap and every rmap walk "
                f"slower and pins the ancestors' anon_vmas. {_FAMILY_CHECK} Look for the "
                f"generation that keeps forking: the DEPTH column rises by one per "
                f"generation."),
        ),
        Alert(
            alert="AnontraceFamilyAnonVmaGrowth",
            expr=f"{fam_avs[1].record} >= {family_n}",
            for_=d.for_, severity="warning",
            summary=f"live anon_vmas of {_FAMILY} grow steadily",
            description=(
                f"{_WHO_CAP} has {{{{ $value }}}} more live anon_vmas than {w} ago; the count "
                f"{steady}. anon_vmas are freed only when no VMA and no child anon_vma "
                f"needs them any more, so steady growth means processes or VMAs that "
                f"accumulate (children that never exit, ever more mappings) or a "
                f"hierarchy that cannot be freed. {_FAMILY_CHECK}"),
        ),
        Alert(
            alert="AnontraceFamilyOrphanedAnonVmaGrowth",
            expr=f"{fam_orph[1].record} >= {orphan_n}",
            for_=d.for_, severity="warning",
            summary=f"orphaned anon_vmas of {_FAMILY} grow steadily",
            description=(
                f"{_WHO_CAP} has {{{{ $value }}}} more orphaned anon_vmas (no VMA points at "
                f"them; they live on only for their children or pages) than {w} ago; the "
                f"count {steady}. This is the pattern of ancestors kept alive by their "
                f"descendants: memory that no process's mappings account for. "
                f"{_FAMILY_CHECK}"),
        ),
    ))

    host_check = (
        "To investigate: in Prometheus, "
        "topk(5, instance_family:anontrace_family_anon_vmas:rise_window"
        "{instance=\"{{ $labels.instance }}\"}) names the families that grew; on "
        "{{ $labels.instance }}, `anontrace -p PID -i 10` (one -p per process of a tree) "
        "shows them process by process.")
    host_group = Group("anontrace-host", (
        *host_avs, *host_orph,
        Alert(
            alert="AnontraceHostAnonVmaGrowth",
            expr=f"{host_avs[1].record} >= {host_n}",
            for_=d.for_, severity="warning",
            summary="live anon_vmas on {{ $labels.instance }} grow steadily",
            description=(
                f"{{{{ $labels.instance }}}} tracks {{{{ $value }}}} more live anon_vmas than "
                f"{w} ago; the count {steady}. Something on the host accumulates anonymous "
                f"memory hierarchies: many families a little, or one a lot. {host_check}"),
        ),
        Alert(
            alert="AnontraceOrphanedAnonVmaGrowth",
            expr=f"{host_orph[1].record} >= {orphan_n}",
            for_=d.for_, severity="warning",
            summary="orphaned anon_vmas on {{ $labels.instance }} grow steadily",
            description=(
                f"{{{{ $labels.instance }}}} has {{{{ $value }}}} more orphaned anon_vmas "
                f"(no VMA points at them; kept alive by children or pages only) than {w} "
                f"ago; the count {steady}. To investigate: in Prometheus, "
                "topk(5, instance_family:anontrace_family_orphaned_anon_vmas:rise_window"
                "{instance=\"{{ $labels.instance }}\"}) names the families; on "
                "{{ $labels.instance }}, `anontrace -p PID -i 10` shows one of them "
                "process by process."),
        ),
    ))

    op_for = prometheus_duration(OPERATIONAL_FOR_SECONDS)
    operational_group = Group("anontrace-operational", (
        lost,
        Alert(
            alert="AnontraceLostEvents",
            expr=f"{lost.record} > 0",
            for_=d.for_, severity="warning",
            summary="anontrace on {{ $labels.instance }} is losing events",
            description=(
                f"anontrace on {{{{ $labels.instance }}}} lost {{{{ $value | humanize }}}} "
                f"events over the last {w} (ring or perf buffer full, a BPF map full, "
                f"undecodable records), so its figures are incomplete and may undercount "
                f"until the affected anon_vmas are gone. Check the host's load and the "
                f"exporter's CPU; narrow what is traced (selection: comm, pids or cgroup "
                f"in the config); `anontrace events -d 10` on the host prints the loss "
                f"counters on stderr."),
        ),
        Alert(
            # A probe that no method can attach on this kernel is reported
            # (anontrace_probe_attached 0) but is not news: page_set_anon_rmap
            # has no tracepoint, so every tracepoint-only host would alert
            # forever. What needs a human is a probe this instance HAD and
            # lost: a kernel upgrade, lockdown switched on, kprobes compiled out.
            alert="AnontraceProbeDetached",
            expr=(f"max by (job, instance, probe) "
                  f"({_check_metric('anontrace_probe_attached')}) == 0\n"
                  f"and on (job, instance, probe)\n"
                  f"max by (job, instance, probe) "
                  f"(max_over_time(anontrace_probe_attached[{PROBE_HISTORY}])) == 1"),
            for_=op_for, severity="warning",
            summary=("anontrace probe {{ $labels.probe }} no longer attaches on "
                     "{{ $labels.instance }}"),
            description=(
                "The logical probe {{ $labels.probe }} was attached on {{ $labels.instance }} "
                f"within the last {PROBE_HISTORY} and now has no working attach method, so "
                "the events it sees are missing from now on. Usually the kernel changed "
                "(an upgrade, lockdown, kprobes or BTF gone). Run `anontrace check` on the "
                "host: it tries every backend and says why each probe cannot attach. "
                f"The alert clears when the probe is back, or {PROBE_HISTORY} after it was "
                "lost. A probe the kernel never offered (page_set_anon_rmap on "
                "tracepoint-only kernels) does not fire it."),
        ),
        Alert(
            alert="AnontraceExporterDown",
            expr=f'up{{job=~"{ANONTRACE_JOB_RE}"}} == 0',
            for_=op_for, severity="warning",
            summary="anontrace exporter on {{ $labels.instance }} is down",
            description=(
                "Prometheus cannot scrape anontrace on {{ $labels.instance }} (job "
                "{{ $labels.job }}), so none of the anontrace growth alerts can fire for "
                "it. Check the service (`systemctl status anontrace`, `journalctl -u "
                "anontrace`) or the DaemonSet pod on that node, and that the port is "
                "reachable from Prometheus."),
        ),
    ))
    return (family_group, host_group, operational_group)


# --- YAML text --------------------------------------------------------------------

class _RulesDumper(yaml.SafeDumper):
    """Multi-line PromQL as literal blocks ("|-"), everything else as YAML
    decides; keys in the order Prometheus documents them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RulesDumper.add_representer(str, _str)


def _rule_doc(rule: Record | Alert, runbook_base: str) -> dict[str, object]:
    if isinstance(rule, Record):
        return {"record": rule.record, "expr": rule.expr}
    return {"alert": rule.alert, "expr": rule.expr, "for": rule.for_,
            "labels": {"severity": rule.severity},
            "annotations": {"summary": rule.summary, "description": rule.description,
                            "runbook_url": runbook_url(rule.alert, runbook_base)}}


def _header(growth: GrowthConfig, d: _Durations, runbook_base: str,
            regenerate: str = "anontrace rules --config /etc/anontrace/anontrace.yaml "
                              "> anontrace.rules.yml") -> list[str]:
    return [
        "# Prometheus rules for anontrace serve: recording rules and growth alerts.",
        "#",
        "# Generated by `anontrace rules` (exporters/rules.py, render_rules) from",
        f"# GrowthConfig(window_seconds={growth.window_seconds!r}, "
        f"for_seconds={growth.for_seconds!r},",
        f"#              min_depth_increase={growth.min_depth_increase!r}, "
        f"min_family_anon_vmas_increase={growth.min_family_anon_vmas_increase!r},",
        f"#              min_orphaned_increase={growth.min_orphaned_increase!r}, "
        f"min_host_anon_vmas_increase={growth.min_host_anon_vmas_increase!r}).",
        "# Do not edit: change the growth: section of the config and run",
        f"#   {regenerate}",
        "#",
        f"# window W = {d.window}, half-window H = {d.half}, slice S = {d.slice}, for = {d.for_}.",
        "# *:rise_window        lowest value of the last S minus the highest value of",
        "#                      the S that ended W ago (an oscillation cannot make it",
        "#                      positive).",
        "# *:steady_rise_window the same, kept only while the series also rose over",
        "#                      each half of the window (a single jump does not).",
        "# Labels are kept as scraped (job, instance, family, comm): every exporter",
        "# instance and every family is judged on its own across a fleet.",
        "#",
        f"# runbook_url = {runbook_base}#<alert name in lower case>: the sections of",
        "# docs/runbooks.md. Set runbook_base_url in the config (or",
        "# --runbook-base-url) to where you publish that file.",
    ]


def render_rules(growth: GrowthConfig, runbook_base: str = DEFAULT_RUNBOOK_BASE_URL) -> str:
    """The Prometheus rule file (YAML text, ending in a newline) for `growth`,
    every alert's runbook_url under `runbook_base`.

    The output is stable: the same settings always give the same text, so the
    shipped deploy/prometheus/anontrace.rules.yml can be compared with it.
    Raises ValueError for a window under 5 ms, a negative `for`, a
    non-finite threshold or a runbook base parse_runbook_base_url refuses.
    """
    d = _Durations.of(growth)
    groups = _groups_doc(growth, runbook_base)
    return "\n".join(_header(growth, d, runbook_base)) + "\n" + _dump({"groups": groups})


def render_prometheus_rule(growth: GrowthConfig, namespace: str = "anontrace",
                           runbook_base: str = DEFAULT_RUNBOOK_BASE_URL) -> str:
    """The same groups as a Prometheus Operator ``PrometheusRule`` resource
    (``anontrace rules --format prometheusrule``), labelled like the
    ServiceMonitor (app.kubernetes.io/name: anontrace); add the labels your
    Prometheus's ruleSelector wants with kustomize."""
    d = _Durations.of(growth)
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "anontrace", "namespace": namespace,
                        "labels": {"app.kubernetes.io/name": "anontrace"}},
           "spec": {"groups": _groups_doc(growth, runbook_base)}}
    regenerate = ("anontrace rules --format prometheusrule --config "
                  "/etc/anontrace/anontrace.yaml > prometheusrule.yaml")
    return "\n".join(_header(growth, d, runbook_base, regenerate)) + "\n" + _dump(doc)


def _groups_doc(growth: GrowthConfig, runbook_base: str) -> list[dict[str, object]]:
    return [{"name": g.name, "rules": [_rule_doc(r, runbook_base) for r in g.rules]}
            for g in build_groups(growth)]


def _dump(doc: Mapping[str, object]) -> str:
    return yaml.dump(doc, Dumper=_RulesDumper, sort_keys=False, allow_unicode=True,
                     width=10_000, default_flow_style=False, indent=2)
