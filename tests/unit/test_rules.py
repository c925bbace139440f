"""The Prometheus rules: exporters/rules.py, the shipped rule file and its
promtool unit tests (tests/rules/anontrace.rules.test.yml).

promtool comes from Debian's prometheus package, which
`scripts/install.sh --test` installs; without it these tests fail, they do
not skip.
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from exporters.config import DEFAULT_RUNBOOK_BASE_URL, GrowthConfig, ServeConfig
from exporters.metrics_spec import sample_names
from exporters.rules import (
    build_groups,
    prometheus_duration,
    render_prometheus_rule,
    render_rules,
    rule_names,
    runbook_anchor,
    runbook_url,
)
from tests.unit.promtool import promtool

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "prometheus" / "anontrace.rules.yml"
PROMTOOL_TESTS = ROOT / "tests" / "rules" / "anontrace.rules.test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

GROWTH_ALERTS = {"AnontraceFamilyDeepening", "AnontraceFamilyAnonVmaGrowth",
                 "AnontraceFamilyOrphanedAnonVmaGrowth", "AnontraceOrphanedAnonVmaGrowth",
                 "AnontraceHostAnonVmaGrowth"}
OPERATIONAL_ALERTS = {"AnontraceLostEvents", "AnontraceProbeDetached", "AnontraceExporterDown"}




def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)}:\n{proc.stdout}\n{proc.stderr}"


def load(text: str) -> list[dict]:
    """Every rule of a rule file, in order."""
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


# --- the shipped file and promtool ------------------------------------------------

def test_shipped_file_is_render_rules_of_the_defaults() -> None:
    expected = render_rules(GrowthConfig())
    assert SHIPPED.read_text() == expected, (
        "deploy/prometheus/anontrace.rules.yml is stale: regenerate it with\n"
        "  .venv/bin/anontrace rules > deploy/prometheus/anontrace.rules.yml")


def test_promtool_check_rules_on_the_shipped_file() -> None:
    proc = promtool("check", "rules", SHIPPED)
    assert_ok(proc)
    assert f"SUCCESS: {len(load(SHIPPED.read_text()))} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_shipped_file() -> None:
    assert_ok(promtool("test", "rules", PROMTOOL_TESTS))


@pytest.mark.parametrize("window, for_", [(15.0, 10.0), (60.0, 0.0), (7200.0, 1800.0),
                                          (0.5, 0.25)])
def test_other_windows_give_valid_rules(tmp_path: Path, window: float, for_: float) -> None:
    growth = replace(GrowthConfig(), window_seconds=window, for_seconds=for_)
    path = tmp_path / "rules.yml"
    path.write_text(render_rules(growth))
    assert_ok(promtool("check", "rules", path))


def test_short_window_durations() -> None:
    text = render_rules(replace(GrowthConfig(), window_seconds=15.0, for_seconds=10.0))
    rules = load(text)
    growth = [r for r in rules if r.get("alert") in GROWTH_ALERTS]
    assert {r["for"] for r in growth} == {"10s"}
    exprs = "\n".join(r["expr"] for r in rules)
    # W = 15s, H = W/2, S = W/5
    assert "offset 15s" in exprs and "offset 7s500ms" in exprs and "[3s]" in exprs
    assert "[15s]" in exprs  # increase(anontrace_lost_events_total[15s])


# --- every name a rule uses exists ----------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, label
    names and durations left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)     # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                 # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_parser() -> None:
    assert metric_names('max by (job, instance) (rate(a_total{x="b c"}[5m] offset 7m30s)) '
                        '> on (job) group_left (y) lvl:b:rate5m and up{job=~"x.*"} == 0') \
        == {"a_total", "lvl:b:rate5m", "up"}


def test_every_metric_in_every_expr_exists() -> None:
    for growth in (GrowthConfig(), replace(GrowthConfig(), window_seconds=15.0, for_seconds=10.0)):
        rules = load(render_rules(growth))
        recorded = {r["record"] for r in rules if "record" in r}
        known = set(sample_names()) | recorded | {"up"}
        for rule in rules:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


def test_every_metric_named_in_annotations_exists() -> None:
    rules = load(render_rules(GrowthConfig()))
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        for text in rule.get("annotations", {}).values():
            for name in re.findall(r"\b(?:\w+:\w+:\w+|anontrace_\w+)", text):
                assert name in sample_names() or name in recorded, (rule["alert"], name)


# --- the shape of the rules ---------------------------------------------------------

def test_rule_names_and_naming_convention() -> None:
    names = rule_names(GrowthConfig())
    assert set(names["alert"]) == GROWTH_ALERTS | OPERATIONAL_ALERTS
    assert len(names["record"]) == len(set(names["record"]))
    for record in names["record"]:
        # level:metric:operations, the metric as scraped (without _total for increase)
        level, metric, ops = record.split(":")
        assert level in ("instance", "instance_family"), record
        assert metric.startswith("anontrace_") and ops.endswith("_window"), record
        base = metric.removesuffix("_total")
        assert base in sample_names() or base + "_total" in sample_names(), record


def test_alerts_have_severity_and_templated_annotations() -> None:
    rules = load(SHIPPED.read_text())
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        text = " ".join(rule["annotations"].values())
        assert "{{ $labels.instance }}" in text, name
        if name != "AnontraceExporterDown":
            assert "{{ $value" in text or name == "AnontraceProbeDetached", name
        if name.startswith("AnontraceFamily"):
            assert "{{ $labels.family }}" in text and "{{ $labels.comm }}" in text, name
            assert "anontrace -p {{ $labels.family }}" in text, name
    for name in GROWTH_ALERTS | {"AnontraceLostEvents"}:
        assert alerts[name]["for"] == "10m", name
    assert alerts["AnontraceFamilyDeepening"]["labels"]["severity"] == "critical"


def test_thresholds_and_windows_come_from_the_config() -> None:
    growth = GrowthConfig(window_seconds=3600.0, for_seconds=1200.0, min_depth_increase=7,
                          min_family_anon_vmas_increase=321, min_orphaned_increase=654,
                          min_host_anon_vmas_increase=98765)
    alerts = {r["alert"]: r for r in load(render_rules(growth)) if "alert" in r}
    assert ">= 7\n" in alerts["AnontraceFamilyDeepening"]["expr"] + "\n"
    assert alerts["AnontraceFamilyAnonVmaGrowth"]["expr"].endswith(">= 321")
    assert alerts["AnontraceFamilyOrphanedAnonVmaGrowth"]["expr"].endswith(">= 654")
    assert alerts["AnontraceOrphanedAnonVmaGrowth"]["expr"].endswith(">= 654")
    assert alerts["AnontraceHostAnonVmaGrowth"]["expr"].endswith(">= 98765")
    assert {alerts[n]["for"] for n in GROWTH_ALERTS} == {"20m"}
    text = render_rules(growth)
    assert "offset 1h" in text and "offset 30m" in text and "[12m]" in text
    assert "window_seconds=3600.0" in text  # the header records the settings


def test_expressions_keep_the_instance_label() -> None:
    # Nothing aggregates the instance (or family) away: a fleet's exporters
    # and each family on them are judged separately. An aggregation must say
    # `by (...)` and keep instance (AnontraceProbeDetached joins the series a
    # probe had under different method labels).
    aggregations = 0
    for group in build_groups(GrowthConfig()):
        for rule in group.rules:
            for m in re.finditer(r"\b(sum|avg|min|max|count|topk|bottomk)\s*(\(|by|without)",
                                 rule.expr):
                aggregations += 1
                kept = re.match(r"\s*by\s*\(([^)]*)\)", rule.expr[m.end(1):])
                assert kept, rule.expr
                labels = {x.strip() for x in kept.group(1).split(",")}
                assert "instance" in labels, rule.expr
                if "family" in rule.expr:
                    assert "family" in labels, rule.expr
    assert aggregations == 2


def test_render_is_stable_and_documented() -> None:
    a, b = render_rules(GrowthConfig()), render_rules(GrowthConfig())
    assert a == b and a.endswith("\n") and not a.endswith("\n\n")
    assert a.startswith("# ")
    assert "Generated by `anontrace rules`" in a and "GrowthConfig(" in a


@pytest.mark.parametrize("window, for_", [(0.0, 10.0), (-1.0, 10.0), (float("inf"), 10.0),
                                          (900.0, -1.0), (900.0, float("nan"))])
def test_bad_durations_are_refused(window: float, for_: float) -> None:
    with pytest.raises(ValueError):
        render_rules(replace(GrowthConfig(), window_seconds=window, for_seconds=for_))


@pytest.mark.parametrize("seconds, text", [
    (900, "15m"), (15, "15s"), (900.0, "15m"), (450, "7m30s"), (5400, "1h30m"),
    (7.5, "7s500ms"), (0.5, "500ms"), (86400, "1d"), (90061.001, "1d1h1m1s1ms"),
    (180, "3m"), (3600, "1h")])
def test_prometheus_duration(seconds: float, text: str) -> None:
    assert prometheus_duration(seconds) == text


@pytest.mark.parametrize("bad", [0, -5, 0.0004, float("inf"), float("nan"), True, "15m"])
def test_prometheus_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        prometheus_duration(bad)  # type: ignore[arg-type]


def test_rules_module_does_not_import_bcc() -> None:
    code = ("import sys; import exporters.rules; "
            "assert 'bcc' not in sys.modules, 'exporters.rules imported bcc'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_shipped_prometheus_rule_is_the_same_groups() -> None:
    """deploy/kubernetes/prometheusrule.yaml is `anontrace rules --format
    prometheusrule` of the defaults, and its spec holds exactly the groups of
    the rule file (which promtool checks above)."""
    shipped = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
    assert shipped.read_text() == render_prometheus_rule(GrowthConfig()), (
        "deploy/kubernetes/prometheusrule.yaml is stale: regenerate it with\n"
        "  .venv/bin/anontrace rules --format prometheusrule > "
        "deploy/kubernetes/prometheusrule.yaml")
    doc = yaml.safe_load(shipped.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["labels"] == {"app.kubernetes.io/name": "anontrace"}
    assert doc["spec"]["groups"] == yaml.safe_load(SHIPPED.read_text())["groups"]



# --- runbooks ---------------------------------------------------------------------

def runbook_ids(text: str) -> list[str]:
    """The explicit anchors (<a id="..."></a>) of a Markdown file, in order."""
    return re.findall(r'<a id="([^"]+)"></a>', text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation
    dropped, spaces to hyphens)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_runbook_defaults() -> None:
    assert DEFAULT_RUNBOOK_BASE_URL == "docs/runbooks.md"
    assert ServeConfig().runbook_base_url == DEFAULT_RUNBOOK_BASE_URL
    assert runbook_anchor("AnontraceFamilyDeepening") == "anontracefamilydeepening"
    assert runbook_url("AnontraceExporterDown") == "docs/runbooks.md#anontraceexporterdown"


@pytest.mark.parametrize("render", [render_rules, render_prometheus_rule])
def test_every_alert_has_a_runbook_url(render) -> None:
    doc = yaml.safe_load(render(GrowthConfig()))
    groups = doc["groups"] if "groups" in doc else doc["spec"]["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {r["alert"] for r in alerts} == GROWTH_ALERTS | OPERATIONAL_ALERTS
    for rule in alerts:
        assert rule["annotations"]["runbook_url"] == (
            f"docs/runbooks.md#{rule['alert'].lower()}"), rule["alert"]


def test_every_runbook_anchor_exists_in_docs_runbooks() -> None:
    """Each alert's anchor is an explicit <a id> of docs/runbooks.md, right
    above a heading that names the alert; no anchor is defined twice, none
    collides with a heading's own GitHub anchor, and no section is left for
    an alert that no longer exists."""
    text = RUNBOOKS.read_text()
    ids = runbook_ids(text)
    assert len(ids) == len(set(ids)), ids
    lines = text.splitlines()
    headings = [ln.lstrip("#").strip() for ln in lines if ln.startswith("#")]
    assert not set(ids) & {github_slug(h) for h in headings}
    alerts = rule_names(GrowthConfig())["alert"]
    anchors = {runbook_anchor(a): a for a in alerts}
    assert set(ids) == set(anchors), set(ids) ^ set(anchors)
    for i, line in enumerate(lines):
        m = re.fullmatch(r'<a id="([^"]+)"></a>', line)
        if m:
            heading = lines[i + 1]
            assert heading.startswith("## "), (m.group(1), heading)
            assert heading[3:].split(":")[0] == anchors[m.group(1)], heading


def test_runbook_urls_of_the_shipped_files_resolve_in_the_repository() -> None:
    """The shipped rule files use the default, repository-relative base:
    every link is docs/runbooks.md#<an anchor that exists>."""
    ids = set(runbook_ids(RUNBOOKS.read_text()))
    for path in (SHIPPED, ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"):
        urls = re.findall(r"^\s+runbook_url: (\S+)$", path.read_text(), flags=re.M)
        assert len(urls) == len(OPERATIONAL_ALERTS | GROWTH_ALERTS), path
        for url in urls:
            file, _, anchor = url.partition("#")
            assert (ROOT / file).resolve() == RUNBOOKS and anchor in ids, (path, url)


def test_runbook_links_inside_docs_runbooks_resolve() -> None:
    text = RUNBOOKS.read_text()
    targets = set(runbook_ids(text)) | {
        github_slug(ln.lstrip("#")) for ln in text.splitlines() if ln.startswith("#")}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in targets, anchor


BASE = "https://docs.example.org/anontrace/runbooks.html"


def test_runbook_base_is_configurable(tmp_path: Path) -> None:
    text = render_rules(GrowthConfig(), runbook_base=BASE)
    urls = [r["annotations"]["runbook_url"] for r in load(text) if "alert" in r]
    assert urls and all(u == f"{BASE}#{u.rsplit('#', 1)[1]}" for u in urls)
    assert f"{BASE}#anontracefamilydeepening" in urls
    assert f"# runbook_url = {BASE}#<alert name in lower case>" in text
    path = tmp_path / "rules.yml"
    path.write_text(text)
    assert_ok(promtool("check", "rules", path))
    pr = yaml.safe_load(render_prometheus_rule(GrowthConfig(), runbook_base=BASE))
    assert pr["spec"]["groups"] == yaml.safe_load(text)["groups"]


@pytest.mark.parametrize("bad", ["", "docs/runbooks.md#x", "ftp://host/r.md", "https://",
                                 "a b", "x{{ $labels.instance }}", "file:///tmp/r.md"])
def test_bad_runbook_bases_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        render_rules(GrowthConfig(), runbook_base=bad)
