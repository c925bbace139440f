"""Read the PromQL of anontrace's dashboards, ready for Prometheus's HTTP API.

Pure Python, standard library only, importable by path (``dashboards`` is not
an installed package: add the repository root to sys.path)::

    from dashboards.queries import panel_queries, expand, DASHBOARDS
    for uid, title, expr in panel_queries(DASHBOARDS[0]):
        promql = expand(expr, {"instance": "host:9464", "pid": ".*", "family": ".*"})
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARDS: tuple[Path, ...] = (HERE / "anontrace-overview.json", HERE / "anontrace-process.json")

# Values for Grafana's built-in interval variables, used unless the caller
# passes its own. 1m is at least 4 scrape intervals at the usual 15s.
BUILTIN_DEFAULTS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "15000",
}

# $name, ${name}, ${name:format} and the deprecated [[name]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w-]+)?\]\]")
_REGEX_SPECIAL = re.compile(r"[\\^$.|?*+()\[\]{}]")


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        # Collapsed rows keep their panels inside the row.
        yield from _panels(panel.get("panels") or ())


def panel_queries(path: str | Path) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target of every panel,
    including panels nested in rows, in dashboard order. Targets without an
    expr (none in anontrace's dashboards) are left out."""
    dashboard = json.loads(Path(path).read_text())
    uid = dashboard.get("uid", "")
    out = []
    for panel in _panels(dashboard.get("panels") or ()):
        for target in panel.get("targets") or ():
            expr = target.get("expr")
            if expr:
                out.append((uid, panel.get("title", ""), expr))
    return out


def _value(value: str | Sequence[str]) -> str:
    """A string is used as is; a list of values becomes a regex alternation
    with each value escaped, as Grafana renders a multi-value variable."""
    if isinstance(value, str):
        return value
    escaped = [_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v) for v in value]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def expand(expr: str, variables: Mapping[str, str | Sequence[str]]) -> str:
    """Substitute Grafana variables in `expr` so Prometheus can run it.

    `variables` maps names (with or without the leading $) to values, e.g.
    {"instance": ".*", "pid": "1234"}; a string is inserted verbatim (so for
    `=~` matchers it is a regex). The interval variables ($__rate_interval,
    $__interval, $__range...) default to BUILTIN_DEFAULTS. A variable with no
    value raises KeyError, so a new dashboard variable cannot go unnoticed.
    """
    values = dict(BUILTIN_DEFAULTS)
    values.update({name.lstrip("$"): value for name, value in variables.items()})

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return _value(values[name])

    return _VARIABLE.sub(substitute, expr)
