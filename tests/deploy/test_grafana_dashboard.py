"""The Grafana dashboard: imports cleanly, charts what the issue asks, with real metric names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.promql import DASHBOARD, dashboard_queries, load_dashboard, metric_names, panels, substitute

REPO = Path(__file__).resolve().parents[2]
DS = "${DS_PROMETHEUS}"


@pytest.fixture(scope="module")
def dash() -> dict:
    return load_dashboard()


def test_json_parses_with_identity(dash):
    json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_datasource_is_a_variable(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert [i["name"] for i in dash.get("__inputs", [])] in ([], ["DS_PROMETHEUS"])


def test_every_panel_has_a_datasource_and_targets(dash):
    found = list(panels(dash))
    assert len(found) >= 12
    for panel in found:
        assert panel["datasource"]["uid"] == DS, panel["title"]
        assert panel["targets"], f"{panel['title']}: no targets"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == DS, panel["title"]


def test_panels_fit_the_grid_without_overlap(dash):
    taken: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_queries_name_only_exported_metrics(dash, exported_names):
    for query in dashboard_queries(dash):
        substitute(query.expr)  # only known Grafana variables
        unknown = metric_names(query.expr) - exported_names
        assert not unknown, f"{query.panel}: {query.expr} uses unknown metrics {unknown}"


def test_metric_name_extraction():
    """The extractor behind the check above finds names and only names."""
    expr = ('histogram_quantile(0.9, sum by (instance, le) (rate(a_seconds_bucket{x=~"$i", y="by(z)"}'
            '[$__rate_interval]))) / on (instance) group_left b_total offset 5m and time() - c > 1e3')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}
    assert metric_names('sum(rate(gnp_ingest_samples_total[5m]))') == {"gnp_ingest_samples_total"}


def _panel_metrics(dash: dict) -> dict[str, set[str]]:
    return {p["title"]: set().union(*(metric_names(t["expr"]) for t in p["targets"]))
            for p in panels(dash) if p["type"] == "timeseries"}


@pytest.mark.parametrize("what, metrics", [
    ("served model version", {"gnp_model_version"}),
    ("validation accuracy", {"gnp_model_accuracy"}),
    ("word error rate of a speech model", {"gnp_model_wer_ratio"}),
    ("active parameters", {"gnp_model_parameters"}),
    ("compression ratio", {"gnp_model_dense_parameters", "gnp_model_parameters"}),
    ("update cost in epochs", {"gnp_update_epochs"}),
    ("update cost in seconds", {"gnp_update_duration_seconds_bucket"}),
    ("ingest rate", {"gnp_ingest_samples_total"}),
    ("rejected samples", {"gnp_ingest_rejected_total"}),
    ("buffered samples", {"gnp_store_buffered_samples"}),
    ("update outcomes", {"gnp_updates_total"}),
    ("predict latency", {"gnp_predict_duration_seconds_bucket"}),
    ("consumer lag", {"gnp_ingest_lag_messages"}),
])
def test_charts_what_the_issue_asks_over_time(dash, what, metrics):
    assert any(metrics <= used for used in _panel_metrics(dash).values()), f"no chart of {what}"


def test_specific_expressions(dash):
    exprs = [q.expr for q in dashboard_queries(dash, annotations=False)]
    assert any("gnp_model_dense_parameters" in e and "/" in e and "gnp_model_parameters" in e
               for e in exprs), "compression = dense / active"
    assert any("histogram_quantile" in e and "gnp_predict_duration_seconds_bucket" in e for e in exprs)
    assert any("by (reason)" in e and "gnp_ingest_rejected_total" in e for e in exprs)
    assert any("by (outcome)" in e and "gnp_updates_total" in e for e in exprs)


def test_model_swaps_are_annotated(dash):
    notes = [a for a in dash["annotations"]["list"] if a.get("expr")]
    assert notes, "no annotation query"
    assert any(metric_names(a["expr"]) & {"gnp_model_version", "gnp_model_swaps_total"}
               and a["enable"] and a["datasource"]["uid"] == DS for a in notes)
