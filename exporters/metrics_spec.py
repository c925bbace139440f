"""Every metric `anontrace serve` exports: name, type, help and labels.

The one list the collector's describe(), the dashboards, the alert rules and
their tests all check against. Names follow Prometheus conventions: the
``anontrace_`` prefix, base units, ``_total`` only on counters. No label is
unbounded: per-process and per-family series exist only for the top-K.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str              # without the _total / _bucket suffixes
    type: str              # gauge, counter, histogram, info
    help: str
    labels: tuple[str, ...] = ()


PROBES = ("anon_vma_fork", "anon_vma_clone", "unlink_anon_vmas", "page_set_anon_rmap")

# Buckets of anontrace_hierarchy_depth (a root anon_vma has depth 1).
DEPTH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("anontrace_build_info", "gauge",
               "anontrace version, kernel release and the backend in use (always 1).",
               ("version", "kernel", "backend", "transport")),
    MetricSpec("anontrace_probe_attached", "gauge",
               "1 if the logical probe is attached, 0 if no method works on this kernel.",
               ("probe", "function", "method")),
    MetricSpec("anontrace_anon_vmas", "gauge",
               "Live anon_vmas tracked (system-wide, or the selected PIDs' trees)."),
    MetricSpec("anontrace_anon_vma_chains", "gauge",
               "anon_vma_chain entries on tracked VMAs."),
    MetricSpec("anontrace_orphaned_anon_vmas", "gauge",
               "Live anon_vmas that no VMA points at (num_active_vmas == 0), kept alive "
               "only by their children or pages."),
    MetricSpec("anontrace_tracked_processes", "gauge",
               "Live processes the model tracks."),
    MetricSpec("anontrace_events", "counter",
               "Events seen per logical probe.", ("probe",)),
    MetricSpec("anontrace_lost_events", "counter",
               "Events lost for any reason (buffer full, map full, decode errors)."),
    MetricSpec("anontrace_resyncs", "counter",
               "Times the state was rebuilt from a census of every process's VMAs after "
               "lost events had left it stale."),
    MetricSpec("anontrace_map_full", "counter",
               "Inserts a full BPF state map refused (each also counts as a lost event); "
               "the state is rebuilt from a census once they stop.", ("map",)),
    MetricSpec("anontrace_rmap_width_max", "gauge",
               "Largest rmap width of any anon_vma on the host at the last rmap census: "
               "the VMAs in its interval tree, all of which an rmap walk of one of its "
               "pages may visit."),
    MetricSpec("anontrace_rmap_census_duration_seconds", "gauge",
               "What the last rmap census (a walk of every VMA's anon_vma chain) took."),
    MetricSpec("anontrace_rmap_census_timestamp_seconds", "gauge",
               "When the last rmap census ran (Unix time); the rmap figures are as of then."),
    MetricSpec("anontrace_hierarchy_depth", "histogram",
               "Depth of anon_vmas as they are created (root = 1)."),
    MetricSpec("anontrace_process_anon_vmas", "gauge",
               "anon_vmas the process's VMAs point at (top-K processes only).",
               ("pid", "comm")),
    MetricSpec("anontrace_process_anon_vma_chains", "gauge",
               "anon_vma_chain entries on the process's VMAs (top-K processes only).",
               ("pid", "comm")),
    MetricSpec("anontrace_process_max_depth", "gauge",
               "Deepest anon_vma of the process (top-K processes only).", ("pid", "comm")),
    MetricSpec("anontrace_process_max_degree", "gauge",
               "Most live child anon_vmas of one of the process's anon_vmas (top-K only).",
               ("pid", "comm")),
    MetricSpec("anontrace_process_rmap_width_max", "gauge",
               "Largest rmap width of the anon_vmas the process's VMAs point at, at the last "
               "rmap census (top-K processes only).", ("pid", "comm")),
    MetricSpec("anontrace_process_rmap_links", "gauge",
               "Total rmap width of the anon_vmas the process's VMAs point at: the "
               "anon_vma_chain entries in their interval trees, at the last rmap census "
               "(top-K processes only).", ("pid", "comm")),
    MetricSpec("anontrace_family_anon_vmas", "gauge",
               "Live anon_vmas of a family: all anon_vmas sharing one root anon_vma. "
               "family is the pid that created the root (top-K families only).",
               ("family", "comm")),
    MetricSpec("anontrace_family_orphaned_anon_vmas", "gauge",
               "Live anon_vmas of the family that no VMA points at (top-K families only).",
               ("family", "comm")),
    MetricSpec("anontrace_family_max_depth", "gauge",
               "Deepest live anon_vma of the family (top-K families only).",
               ("family", "comm")),
    MetricSpec("anontrace_family_rmap_width_max", "gauge",
               "Largest rmap width of the family's anon_vmas at the last rmap census "
               "(top-K families only).", ("family", "comm")),
    MetricSpec("anontrace_family_rmap_links", "gauge",
               "Total rmap width of the family's anon_vmas: the anon_vma_chain entries in "
               "their interval trees, at the last rmap census (top-K families only).",
               ("family", "comm")),
)

BY_NAME = {m.name: m for m in METRICS}


def sample_names() -> frozenset[str]:
    """Every series name a scrape can contain (with _total, _bucket...)."""
    out: set[str] = set()
    for m in METRICS:
        if m.type == "counter":
            out |= {m.name + "_total", m.name + "_created"}
        elif m.type == "histogram":
            out |= {m.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            out.add(m.name)
    return frozenset(out)
