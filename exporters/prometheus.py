"""The one Prometheus collector of `anontrace serve`.

It reads the current state inside ``collect()`` through a callable that
returns a :class:`ExportState` (taken under the serve loop's lock), and
describes its metrics from :mod:`exporters.metrics_spec` without touching
the model, so registering it costs nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from exporters.metrics_spec import BY_NAME, DEPTH_BUCKETS, METRICS, PROBES
from exporters.view import Snapshot
from tracer.kernel.kstate import MAP_NAMES


@dataclass(frozen=True)
class ProbeStatus:
    probe: str
    function: str      # "" when no function could be attached
    method: str        # fentry, kprobe, tracepoint, or "none"
    attached: bool


@dataclass
class ExportState:
    """Everything one scrape exports."""

    snapshot: Snapshot
    events_by_probe: dict[str, int] = field(default_factory=dict)
    lost_events: int = 0
    resyncs: int = 0
    build: dict[str, str] = field(default_factory=dict)   # version, kernel, backend, transport
    probes: list[ProbeStatus] = field(default_factory=list)
    map_full: dict[str, int] = field(default_factory=dict)   # inserts refused, per state map


def _family(name: str, labels: Iterable[str] = ()) -> GaugeMetricFamily | CounterMetricFamily:
    spec = BY_NAME[name]
    cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[spec.type]
    return cls(name, spec.help, labels=list(labels or spec.labels))


def _histogram(name: str) -> HistogramMetricFamily:
    spec = BY_NAME[name]
    assert spec.type == "histogram", name
    return HistogramMetricFamily(name, spec.help, labels=list(spec.labels))


def depth_buckets(learned: dict[int, int]) -> tuple[list[tuple[str, float]], int]:
    """Cumulative histogram buckets (le, count) and the sum, from counts by depth."""
    out: list[tuple[str, float]] = []
    acc = 0
    items = sorted(learned.items())
    j = 0
    for le in DEPTH_BUCKETS:
        while j < len(items) and items[j][0] <= le:
            acc += items[j][1]
            j += 1
        out.append((str(float(le)), acc))
    out.append(("+Inf", sum(n for _, n in items)))
    total = sum(d * n for d, n in items)
    return out, total


class AnontraceCollector:
    """Register with ``AnontraceCollector(state_fn, registry=registry)``."""

    def __init__(self, state_fn: Callable[[], ExportState],
                 registry: CollectorRegistry | None = None) -> None:
        self._state_fn = state_fn
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterator[Metric]:
        for spec in METRICS:
            yield _histogram(spec.name) if spec.type == "histogram" else _family(spec.name)

    def collect(self) -> Iterator[Metric]:
        st = self._state_fn()
        snap = st.snapshot

        m = _family("anontrace_build_info")
        m.add_metric([st.build.get(k, "") for k in BY_NAME["anontrace_build_info"].labels], 1)
        yield m

        m = _family("anontrace_probe_attached")
        for p in st.probes:
            m.add_metric([p.probe, p.function, p.method], 1 if p.attached else 0)
        yield m

        for name, value in (("anontrace_anon_vmas", snap.anon_vmas),
                            ("anontrace_anon_vma_chains", snap.anon_vma_chains),
                            ("anontrace_orphaned_anon_vmas", snap.orphaned_anon_vmas),
                            ("anontrace_tracked_processes", snap.tracked_processes)):
            m = _family(name)
            m.add_metric([], value)
            yield m

        m = _family("anontrace_events")
        for probe in PROBES:
            m.add_metric([probe], st.events_by_probe.get(probe, 0))
        yield m

        m = _family("anontrace_lost_events")
        m.add_metric([], st.lost_events)
        yield m

        m = _family("anontrace_resyncs")
        m.add_metric([], st.resyncs)
        yield m

        m = _family("anontrace_map_full")
        for name in MAP_NAMES:
            m.add_metric([name], st.map_full.get(name, 0))
        yield m

        if snap.rmap is not None:
            rmap: tuple[tuple[str, float], ...] = (
                ("anontrace_rmap_width_max", snap.rmap.max_width),
                ("anontrace_rmap_census_duration_seconds", snap.rmap.seconds),
                ("anontrace_rmap_census_timestamp_seconds", snap.rmap_time))
            for name, reading in rmap:
                m = _family(name)
                m.add_metric([], reading)
                yield m

        h = _histogram("anontrace_hierarchy_depth")
        buckets, total = depth_buckets(snap.learned_depths)
        h.add_metric([], buckets, total)
        yield h

        per_process = (("anontrace_process_anon_vmas", "anon_vmas"),
                       ("anontrace_process_anon_vma_chains", "anon_vma_chains"),
                       ("anontrace_process_max_depth", "max_depth"),
                       ("anontrace_process_max_degree", "max_degree"),
                       ("anontrace_process_rmap_width_max", "rmap_max_width"),
                       ("anontrace_process_rmap_links", "rmap_links"))
        for name, attr in per_process:
            m = _family(name)
            for r in snap.processes:
                value = getattr(r, attr)
                if value is not None:   # rmap: not measured (yet) for this row
                    m.add_metric([str(r.pid), r.comm], value)
            yield m

        per_family = (("anontrace_family_anon_vmas", "anon_vmas"),
                      ("anontrace_family_orphaned_anon_vmas", "orphaned_anon_vmas"),
                      ("anontrace_family_max_depth", "max_depth"),
                      ("anontrace_family_rmap_width_max", "rmap_max_width"),
                      ("anontrace_family_rmap_links", "rmap_links"))
        for name, attr in per_family:
            m = _family(name)
            for f in snap.families:
                value = getattr(f, attr)
                if value is not None:
                    m.add_metric([f.family, f.comm], value)
            yield m
