#!/usr/bin/env python3
"""Generate anontrace's Grafana dashboards with grafana-foundation-sdk.

    .venv/bin/python dashboards/build.py           # (re)write the generated files
    .venv/bin/python dashboards/build.py --check   # exit 1 if they are stale

The JSON files beside this script are generated: edit this file, not them.
Output is deterministic (sorted keys, indent 2, trailing newline) so the
committed JSON can be compared with a fresh build (tests/unit/test_dashboards.py).
The same run writes deploy/kubernetes/dashboards-configmap.yaml, the JSON
files as ConfigMaps for Grafana's dashboard sidecar (`render_configmaps`;
tests/unit/test_kubernetes.py compares it with the committed JSON).

Every query filters on ``instance=~"$instance"`` and keeps ``instance`` in its
result, so one dashboard serves a single host or a whole fleet. Metric names
come from exporters/metrics_spec.py.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
CONFIGMAPS = HERE.parent / "deploy" / "kubernetes" / "dashboards-configmap.yaml"

OVERVIEW_UID = "anontrace-overview"
PROCESS_UID = "anontrace-process"
TAGS = ["anontrace", "ebpf", "memory"]

# Every panel and target goes through the dashboard's datasource variable.
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
INST = 'instance=~"$instance"'
# Rows of the top-K tables (the exporter itself exports only its top-K).
TOP_ROWS = 20

PROC_KEYS = "instance, pid, comm"
FAM_KEYS = "instance, family, comm"


# --------------------------------------------------------------------------
# Small helpers around the SDK builders


def query(expr: str, legend: str | None = None, ref: str = "A", *, instant: bool = False,
          fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend is not None:
        q = q.legend_format(legend)
    q = q.instant() if instant else q.range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def legend() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM).show_legend(True)
            .calcs(["lastNotNull", "max"]))


def ts(title: str, description: str, targets: list[prometheus.Dataquery], *,
       unit: str = "short", w: int = 12, h: int = 8) -> timeseries.Panel:
    return (timeseries.Panel().title(title).description(description).datasource(DS)
            .targets(targets).unit(unit).min(0).span(w).height(h)
            .legend(legend())
            .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                     .sort(cm.SortOrder.DESCENDING))
            .fill_opacity(10).line_width(1).show_points(cm.VisibilityMode.NEVER))


def stat_panel(title: str, description: str, expr: str, *, unit: str = "short",
               steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
               w: int = 4, h: int = 4) -> stat.Panel:
    return (stat.Panel().title(title).description(description).datasource(DS)
            .with_target(query(expr, "fleet", instant=True))
            .unit(unit).span(w).height(h).thresholds(thresholds(*steps))
            .color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.NONE)
            .text_mode(cm.BigValueTextMode.VALUE)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def organize(rename: dict[str, str],
             exclude: tuple[str, ...] = ("Time",)) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {name: True for name in exclude},
        "renameByName": rename,
    })


def table_panel(title: str, description: str, targets: list[prometheus.Dataquery], *,
                rename: dict[str, str], exclude: tuple[str, ...] = ("Time",),
                sort: str | None = None, w: int = 24, h: int = 8) -> table.Panel:
    p = (table.Panel().title(title).description(description).datasource(DS)
         .targets(targets).span(w).height(h).show_header(True)
         .footer(cb.TableFooterOptions().show(False).reducer(["sum"]).fields([])))
    if len(targets) > 1:
        p = p.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    p = p.with_transformation(organize(rename, exclude))
    if sort is not None:
        p = p.sort_by([cb.TableSortByFieldState().display_name(sort).desc(True)])
    return p


def top_table_targets(metrics: list[str], keys: str, rank: str) -> list[prometheus.Dataquery]:
    """One instant table query per metric, all restricted to the series that
    are in the top TOP_ROWS by `rank`, aggregated to drop __name__ so the
    merge transformation joins them on `keys`."""
    ranked = f"topk({TOP_ROWS}, max by ({keys}) ({rank}{{{INST}}}))"
    out = []
    for i, metric in enumerate(metrics):
        if metric == rank:
            expr = ranked
        else:
            expr = f"max by ({keys}) ({metric}{{{INST}}}) and on ({keys}) {ranked}"
        out.append(query(expr, ref=chr(ord("A") + i), instant=True, fmt=PromQueryFormat.TABLE))
    return out


def data_link(title: str, url: str) -> db.DashboardLink:
    return db.DashboardLink(title).url(url).target_blank(False)


def number_panels(panels: list[dm.Panel | dm.RowPanel]) -> None:
    """Give every panel (rows and the panels nested in them) a unique id."""
    next_id = 1
    for p in panels:
        p.id_val = next_id
        next_id += 1
        for inner in getattr(p, "panels", None) or []:
            inner.id_val = next_id
            next_id += 1


def datasource_variable() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Data source").type("prometheus")


def instance_variable(*, multi: bool) -> db.QueryVariable:
    v = (db.QueryVariable("instance").label("Instance").datasource(DS)
         .query("label_values(anontrace_build_info, instance)")
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dm.VariableSort.ALPHABETICAL_ASC))
    if multi:
        v = (v.multi(True).include_all(True).all_value(".*")
             .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))
    else:
        v = v.multi(False).include_all(False)
    return v


def topk_variable(name: str, label: str, metric: str) -> db.QueryVariable:
    return (db.QueryVariable(name).label(label).datasource(DS)
            .query(f'label_values({metric}{{{INST}}}, {name})')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NUMERICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))


def finish(builder: db.Dashboard) -> dm.Dashboard:
    d = builder.build()
    number_panels(d.panels or [])
    # The SDK leaves `annotations` as {}; Grafana expects a list (it adds its
    # built-in "Annotations & Alerts" entry to it on load).
    if d.annotations.list_val is None:
        d.annotations.list_val = []
    return d


# --------------------------------------------------------------------------
# anontrace-overview


def overview() -> dm.Dashboard:
    b = (db.Dashboard("anontrace: anon_vma overview").uid(OVERVIEW_UID).tags(TAGS)
         .description("anon_vma lifecycle across every instance running `anontrace serve`.")
         .editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .time("now-1h", "now").refresh("1m").timezone("browser")
         .with_variable(datasource_variable())
         .with_variable(instance_variable(multi=True))
         .link(db.DashboardLink("Process / family drill-down").type(dm.DashboardLinkType.LINK)
               .url(f"/d/{PROCESS_UID}").icon("dashboard").keep_time(True).include_vars(True)))

    # Headline numbers: totals over the selected instances.
    b = (b
         .with_panel(stat_panel(
             "Instances", "Instances exporting anontrace_build_info.",
             f"count(anontrace_build_info{{{INST}}})"))
         .with_panel(stat_panel(
             "Live anon_vmas now", "Live anon_vmas tracked, summed over the selected instances.",
             f"sum(anontrace_anon_vmas{{{INST}}})"))
         .with_panel(stat_panel(
             "Orphaned anon_vmas now",
             "Live anon_vmas no VMA points at, kept alive by children or pages.",
             f"sum(anontrace_orphaned_anon_vmas{{{INST}}})"))
         .with_panel(stat_panel(
             "Tracked processes now", "Live processes the model tracks.",
             f"sum(anontrace_tracked_processes{{{INST}}})"))
         .with_panel(stat_panel(
             "Lost events/s", "Events lost (buffer full, map full, decode errors).",
             f"sum(rate(anontrace_lost_events_total{{{INST}}}[$__rate_interval])) or vector(0)",
             unit="ops", steps=((None, "green"), (1e-9, "red"))))
         .with_panel(stat_panel(
             "Probes detached", "Logical probes with no working attach method.",
             f"count(anontrace_probe_attached{{{INST}}} == 0) or vector(0)",
             steps=((None, "green"), (1, "red"))))
         .with_panel(table_panel(
             "Firing anontrace alerts", "Alerts named Anontrace* that are firing now.",
             [query(f'ALERTS{{alertname=~"Anontrace.*", alertstate="firing", {INST}}}',
                    instant=True, fmt=PromQueryFormat.TABLE)],
             rename={}, exclude=("Time", "Value", "__name__", "alertstate"), h=5)))

    b = (b.with_row(db.Row("anon_vmas").collapsed(False))
         .with_panel(ts(
             "Live anon_vmas", "Live anon_vmas tracked per instance.",
             [query(f"sum by (instance) (anontrace_anon_vmas{{{INST}}})", "{{instance}}")]))
         .with_panel(ts(
             "anon_vma_chains", "anon_vma_chain entries on tracked VMAs per instance.",
             [query(f"sum by (instance) (anontrace_anon_vma_chains{{{INST}}})", "{{instance}}")]))
         .with_panel(ts(
             "Orphaned anon_vmas",
             "Live anon_vmas that no VMA points at (num_active_vmas == 0).",
             [query(f"sum by (instance) (anontrace_orphaned_anon_vmas{{{INST}}})",
                    "{{instance}}")]))
         .with_panel(ts(
             "Tracked processes", "Live processes the model tracks per instance.",
             [query(f"sum by (instance) (anontrace_tracked_processes{{{INST}}})",
                    "{{instance}}")])))

    b = (b.with_row(db.Row("Events").collapsed(False))
         .with_panel(ts(
             "anon_vma creation rate",
             "anon_vmas created per second (every creation is observed by the depth histogram).",
             [query("sum by (instance) "
                    f"(rate(anontrace_hierarchy_depth_count{{{INST}}}[$__rate_interval]))",
                    "{{instance}}")], unit="ops", w=8))
         .with_panel(ts(
             "Events per probe", "Events per second seen by each logical probe.",
             [query("sum by (instance, probe) "
                    f"(rate(anontrace_events_total{{{INST}}}[$__rate_interval]))",
                    "{{instance}} {{probe}}")], unit="ops", w=8))
         .with_panel(ts(
             "Lost events", "Events lost per second; any loss makes the model approximate "
             "until serve rebuilds it from a census (resyncs, at most one per 10 s).",
             [query("sum by (instance) "
                    f"(rate(anontrace_lost_events_total{{{INST}}}[$__rate_interval]))",
                    "{{instance}} lost"),
              query("sum by (instance) "
                    f"(increase(anontrace_resyncs_total{{{INST}}}[$__rate_interval]))",
                    "{{instance}} resyncs", ref="B"),
              query("sum by (instance, map) "
                    f"(rate(anontrace_map_full_total{{{INST}}}[$__rate_interval]))",
                    "{{instance}} {{map}} full", ref="C")], unit="ops", w=8)))

    bucket_rate = ("sum by (instance, le) "
                   f"(rate(anontrace_hierarchy_depth_bucket{{{INST}}}[$__rate_interval]))")
    b = (b.with_row(db.Row("Hierarchy depth").collapsed(False))
         .with_panel(
             heatmap.Panel().title("Depth of new anon_vmas")
             .description("anon_vmas created per depth bucket (root = 1), all selected instances.")
             .datasource(DS).span(12).height(9)
             .with_target(query(
                 "sum by (le) "
                 f"(increase(anontrace_hierarchy_depth_bucket{{{INST}}}[$__rate_interval]))",
                 "{{le}}", fmt=PromQueryFormat.HEATMAP))
             .calculate(False)
             .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.LE))
             .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME)
                    .scheme("Oranges").scale(hm.HeatmapColorScale.EXPONENTIAL)
                    .exponent(0.5).steps(64).fill("dark-orange").reverse(False))
             .y_axis(heatmap.YAxisConfig().unit("short").axis_label("depth"))
             .cell_values(heatmap.CellValues().unit("short"))
             .show_value(cm.VisibilityMode.NEVER)
             .show_legend().show_tooltip())
         .with_panel(ts(
             "Depth of new anon_vmas: p50 / p99, deepest family",
             "Quantiles of the depth of newly created anon_vmas, and the deepest live "
             "anon_vma among the top-K families.",
             [query(f"histogram_quantile(0.5, {bucket_rate})", "{{instance}} p50", "A"),
              query(f"histogram_quantile(0.99, {bucket_rate})", "{{instance}} p99", "B"),
              query(f"max by (instance) (anontrace_family_max_depth{{{INST}}})",
                    "{{instance}} deepest live (top-K families)", "C")], h=9)))

    b = (b.with_row(db.Row("Rmap width").collapsed(False))
         .with_panel(ts(
             "Widest anon_vma (rmap width)",
             "The most VMAs in one anon_vma's interval tree on each instance: every one of "
             "them an rmap walk (reclaim, migration, compaction, KSM) of one of its pages "
             "may visit. Measured by the rmap census every rmap_interval.",
             [query(f"max by (instance) (anontrace_rmap_width_max{{{INST}}})", "{{instance}}"),
              query(f"max by (instance) (anontrace_family_rmap_width_max{{{INST}}})",
                    "{{instance}} widest top-K family", ref="B")], w=8))
         .with_panel(ts(
             "Top 10 processes by rmap width",
             "Largest rmap width of the anon_vmas of the 10 widest top-K processes.",
             [query(f"topk(10, anontrace_process_rmap_width_max{{{INST}}})",
                    "{{instance}} {{pid}} {{comm}}")], w=8))
         .with_panel(ts(
             "rmap census cost and age",
             "What each rmap census (a walk of every VMA's chain) took, and how old the "
             "rmap figures are.",
             [query(f"max by (instance) (anontrace_rmap_census_duration_seconds{{{INST}}})",
                    "{{instance}} duration"),
              query(f"max by (instance) (time() - "
                    f"anontrace_rmap_census_timestamp_seconds{{{INST}}})",
                    "{{instance}} age", ref="B")], unit="s", w=8)))

    proc_link = data_link(
        "Drill down to ${__data.fields.comm} (${__data.fields.pid})",
        f"/d/{PROCESS_UID}?${{__url_time_range}}&var-datasource=${{datasource}}"
        "&var-instance=${__data.fields.instance}&var-pid=${__data.fields.pid}")
    fam_link = data_link(
        "Drill down to family ${__data.fields.family}",
        f"/d/{PROCESS_UID}?${{__url_time_range}}&var-datasource=${{datasource}}"
        "&var-instance=${__data.fields.instance}&var-family=${__data.fields.family}")
    b = (b.with_row(db.Row("Top processes and families").collapsed(False))
         .with_panel(table_panel(
             "Top processes",
             f"The {TOP_ROWS} processes with the most anon_vmas (top-K processes only).",
             top_table_targets(["anontrace_process_anon_vmas", "anontrace_process_anon_vma_chains",
                                "anontrace_process_max_depth", "anontrace_process_max_degree",
                                "anontrace_process_rmap_width_max",
                                "anontrace_process_rmap_links"],
                               PROC_KEYS, "anontrace_process_anon_vmas"),
             rename={"Value #A": "anon_vmas", "Value #B": "anon_vma_chains",
                     "Value #C": "max depth", "Value #D": "max degree",
                     "Value #E": "rmap width", "Value #F": "rmap links"},
             sort="anon_vmas", w=12, h=10).data_links([proc_link]))
         .with_panel(table_panel(
             "Top families",
             f"The {TOP_ROWS} families (anon_vmas sharing one root; family = pid that created "
             "the root) with the most anon_vmas (top-K families only).",
             top_table_targets(["anontrace_family_anon_vmas",
                                "anontrace_family_orphaned_anon_vmas",
                                "anontrace_family_max_depth",
                                "anontrace_family_rmap_width_max",
                                "anontrace_family_rmap_links"],
                               FAM_KEYS, "anontrace_family_anon_vmas"),
             rename={"Value #A": "anon_vmas", "Value #B": "orphaned", "Value #C": "max depth",
                     "Value #D": "rmap width", "Value #E": "rmap links"},
             sort="anon_vmas", w=12, h=10).data_links([fam_link]))
         .with_panel(ts(
             "Top 10 processes by anon_vmas", "anon_vmas of the 10 largest top-K processes.",
             [query(f"topk(10, anontrace_process_anon_vmas{{{INST}}})",
                    "{{instance}} {{pid}} {{comm}}")]))
         .with_panel(ts(
             "Top 10 families by anon_vmas", "anon_vmas of the 10 largest top-K families.",
             [query(f"topk(10, anontrace_family_anon_vmas{{{INST}}})",
                    "{{instance}} family {{family}} {{comm}}")])))

    attached_map = dm.ValueMap(options={
        "0": dm.ValueMappingResult(text="detached", color="red", index=0),
        "1": dm.ValueMappingResult(text="attached", color="green", index=1),
    })
    b = b.with_row(
        db.Row("Exporter").collapsed(True)
        .with_panel(table_panel(
            "Probe status", "Each logical probe: the kernel function and the method used.",
            [query("max by (instance, probe, function, method) "
                   f"(anontrace_probe_attached{{{INST}}})",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            rename={"Value": "attached"}, w=12, h=8)
            .mappings([attached_map])
            .override_by_name("attached", [dm.DynamicConfigValue(
                id_val="custom.cellOptions", value={"type": "color-text"})]))
        .with_panel(table_panel(
            "Build info", "anontrace version, kernel release, backend and transport.",
            [query("max by (instance, version, kernel, backend, transport) "
                   f"(anontrace_build_info{{{INST}}})",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            rename={}, exclude=("Time", "Value"), w=12, h=8)))
    return finish(b)


# --------------------------------------------------------------------------
# anontrace-process


def process() -> dm.Dashboard:
    pid = f'{INST}, pid=~"$pid"'
    fam = f'{INST}, family=~"$family"'
    proc_legend = "{{instance}} {{pid}} {{comm}}"
    fam_legend = "{{instance}} family {{family}} {{comm}}"
    topk_note = " Only processes in the exporter's top-K have series."
    fam_note = " Only families in the exporter's top-K have series."
    b = (db.Dashboard("anontrace: process and family drill-down").uid(PROCESS_UID).tags(TAGS)
         .description("anon_vmas of chosen processes and families on one instance.")
         .editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .time("now-1h", "now").refresh("1m").timezone("browser")
         .with_variable(datasource_variable())
         .with_variable(instance_variable(multi=False))
         .with_variable(topk_variable("pid", "PID", "anontrace_process_anon_vmas"))
         .with_variable(topk_variable("family", "Family", "anontrace_family_anon_vmas"))
         .link(db.DashboardLink("anontrace overview").type(dm.DashboardLinkType.LINK)
               .url(f"/d/{OVERVIEW_UID}").icon("dashboard").keep_time(True)
               .include_vars(True)))

    b = (b.with_row(db.Row("Process").collapsed(False))
         .with_panel(ts("Process anon_vmas",
                        "anon_vmas the process's VMAs point at." + topk_note,
                        [query(f"anontrace_process_anon_vmas{{{pid}}}", proc_legend)]))
         .with_panel(ts("Process anon_vma_chains",
                        "anon_vma_chain entries on the process's VMAs." + topk_note,
                        [query(f"anontrace_process_anon_vma_chains{{{pid}}}", proc_legend)]))
         .with_panel(ts("Process max depth",
                        "Deepest anon_vma of the process (root = 1)." + topk_note,
                        [query(f"anontrace_process_max_depth{{{pid}}}", proc_legend)]))
         .with_panel(ts("Process max degree",
                        "Most live child anon_vmas of one of the process's anon_vmas."
                        + topk_note,
                        [query(f"anontrace_process_max_degree{{{pid}}}", proc_legend)]))
         .with_panel(ts("Process rmap width",
                        "Largest rmap width of the process's anon_vmas (VMAs an rmap walk of "
                        "one of its pages may visit), and their total (rmap links), at the "
                        "last rmap census." + topk_note,
                        [query(f"anontrace_process_rmap_width_max{{{pid}}}",
                               proc_legend + " max"),
                         query(f"anontrace_process_rmap_links{{{pid}}}",
                               proc_legend + " links", ref="B")], w=24)))

    b = (b.with_row(db.Row("Family").collapsed(False))
         .with_panel(ts("Family anon_vmas",
                        "Live anon_vmas sharing the family's root anon_vma." + fam_note,
                        [query(f"anontrace_family_anon_vmas{{{fam}}}", fam_legend)], w=8))
         .with_panel(ts("Family orphaned anon_vmas",
                        "Live anon_vmas of the family that no VMA points at." + fam_note,
                        [query(f"anontrace_family_orphaned_anon_vmas{{{fam}}}", fam_legend)],
                        w=8))
         .with_panel(ts("Family max depth",
                        "Deepest live anon_vma of the family (root = 1)." + fam_note,
                        [query(f"anontrace_family_max_depth{{{fam}}}", fam_legend)], w=8))
         .with_panel(ts("Family rmap width",
                        "Largest rmap width of the family's anon_vmas, and their total (rmap "
                        "links), at the last rmap census." + fam_note,
                        [query(f"anontrace_family_rmap_width_max{{{fam}}}", fam_legend + " max"),
                         query(f"anontrace_family_rmap_links{{{fam}}}", fam_legend + " links",
                               ref="B")], w=24)))
    return finish(b)


# --------------------------------------------------------------------------

DASHBOARDS = {
    "anontrace-overview.json": overview,
    "anontrace-process.json": process,
}


def render() -> dict[str, str]:
    """File name -> the JSON text build.py writes for it."""
    return {name: json.dumps(make(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"
            for name, make in DASHBOARDS.items()}


# --------------------------------------------------------------------------
# The dashboards as Kubernetes ConfigMaps

# Grafana's dashboard sidecar (the grafana Helm chart's sidecar.dashboards,
# kube-prometheus-stack's default) loads every ConfigMap carrying this label.
SIDECAR_LABEL = {"grafana_dashboard": "1"}
# The folder, for sidecars configured with folderAnnotation: grafana_folder;
# ignored otherwise.
FOLDER_ANNOTATION = {"grafana_folder": "anontrace"}


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the dashboard JSON) as literal blocks."""


_LiteralDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                         style="|" if "\n" in v else None))


def render_configmaps(dashboards: dict[str, str], namespace: str = "anontrace") -> str:
    """deploy/kubernetes/dashboards-configmap.yaml: one ConfigMap per
    dashboard (file name -> JSON text, as `render` gives or as committed),
    labelled for Grafana's sidecar, the JSON kept byte for byte."""
    docs = []
    for name, text in sorted(dashboards.items()):
        json.loads(text)  # only JSON goes in
        short = name.removeprefix("anontrace-").removesuffix(".json")
        docs.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"anontrace-dashboard-{short}",
                         "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "anontrace", **SIDECAR_LABEL},
                         "annotations": dict(FOLDER_ANNOTATION)},
            "data": {name: text},
        })
    header = (
        "# anontrace's Grafana dashboards (dashboards/*.json) as ConfigMaps for\n"
        "# Grafana's dashboard sidecar, which loads every ConfigMap labelled\n"
        "# grafana_dashboard: \"1\" (the grafana Helm chart's sidecar.dashboards; let it\n"
        "# search the anontrace namespace, or ALL). grafana_folder names the folder for\n"
        "# sidecars set up with folderAnnotation: grafana_folder. The dashboards pick\n"
        "# their Prometheus through their datasource variable.\n"
        "#\n"
        "# Generated by dashboards/build.py (render_configmaps) from the JSON files;\n"
        "# do not edit: run .venv/bin/python dashboards/build.py\n")
    body = yaml.dump_all(docs, Dumper=_LiteralDumper, sort_keys=False, width=10_000,
                         default_flow_style=False, explicit_start=True)
    return header + body


def outputs() -> dict[Path, str]:
    """Every generated file -> its text: the dashboards' JSON and their ConfigMaps."""
    built = render()
    out = {HERE / name: text for name, text in built.items()}
    out[CONFIGMAPS] = render_configmaps(built)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if a committed file differs from the build")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        name = path.name
        old = path.read_text() if path.exists() else ""
        if args.check:
            if old != text:
                stale.append(name)
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(True), text.splitlines(True),
                    f"{name} (committed)", f"{name} (built)", n=1))
        elif old != text:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run {Path(__file__).name} to regenerate",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
