"""PromQL helpers for the deploy checks: the dashboard's queries and the metric names in them.

No PromQL parser is at hand in Python, so :func:`metric_names` takes a lexical route that
is exact for the expressions we write: drop strings, label matchers, ranges and grouping
label lists, then every remaining identifier not followed by ``(`` and not a keyword is a
metric name. Whether an expression *parses* is left to a real Prometheus (the live test).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DASHBOARD",
    "Query",
    "dashboard_queries",
    "exported_sample_names",
    "load_dashboard",
    "metric_names",
    "panels",
    "substitute",
]

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "gnpd-dashboard.json"

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2", "start", "end",
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:]|\s*\()")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard and where it is."""

    panel: str
    ref: str
    legend: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included; rows themselves excluded."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panels({"panels": panel.get("panels", [])})
        else:
            yield panel


def dashboard_queries(dashboard: dict[str, Any], annotations: bool = True) -> list[Query]:
    """Every target expression of every panel, and the annotation queries."""
    found = [Query(p.get("title", ""), t.get("refId", ""), t.get("legendFormat", ""), t["expr"])
             for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    if annotations:
        found += [Query(f"annotation: {a['name']}", "", a.get("textFormat", ""), a["expr"])
                  for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]
    return found


def substitute(expr: str, rate_interval: str = "1m", instance: str = ".*",
               range_: str = "1h") -> str:
    """``expr`` with Grafana's variables replaced, ready for Prometheus' HTTP API."""
    values = {"__rate_interval": rate_interval, "__interval": rate_interval,
              "__range": range_, "instance": instance}
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (``rate(a_total[5m]) / b`` -> {a_total, b})."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)    # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)            # by (le), on (instance), ...
    text = re.sub(r"\$\{?\w+\}?", " ", text)   # Grafana variables left in
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_sample_names(families: Iterable[Any]) -> set[str]:
    """Every sample name metric families can expose, from their names and types alone.

    Works for families without samples too (a labelled gauge before its first ``labels()``).
    """
    names: set[str] = set()
    for family in families:
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names
