"""Scrape an AnontraceCollector as Prometheus would: name -> [(labels, value)]."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporters.prometheus import AnontraceCollector, ExportState


def scrape(state: ExportState) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample one scrape of ``state`` exports, by sample name."""
    reg = CollectorRegistry()
    AnontraceCollector(lambda: state, registry=reg)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out
