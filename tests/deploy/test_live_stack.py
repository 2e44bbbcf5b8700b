"""Live: a running daemon's /metrics and a real Prometheus answering the dashboard's queries.

Starts the daemon (embedded broker), the digits producer and Debian's Prometheus on
127.0.0.1 (tools/livestack.py), waits for model updates, then checks that

- every metric the dashboard and the alerts use is in the daemon's real /metrics output;
- every dashboard query parses in Prometheus and returns data, with finite values for the
  model, update, ingest and serving panels; model swaps show up for the annotation;
- the alert rules load into Prometheus and evaluate without error.

It also renders the dashboard PNG from this Prometheus (to a temp file, not docs/).
"""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

import pytest

from tools.livestack import LiveStack, prometheus_binary
from tools.promql import dashboard_queries, load_dashboard, metric_names, substitute

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="Prometheus server not installed: apt-get install -y prometheus"),
]

REPO = Path(__file__).resolve().parents[2]
RATE_INTERVAL = "10s"  # >= 4 scrapes at the stack's 1 s interval, as $__rate_interval would be
# Panels whose every value must be a finite number once updates have run.
FINITE = {
    "Served version", "Validation accuracy", "Active parameters", "Compression",
    "Buffered samples", "Since last update", "Served model version",
    "Parameters: active vs dense", "Compression ratio", "Update cost (epochs)",
    "Update duration", "Updates by outcome", "Sealed chunks", "Ingest rate",
    "Rejected messages by reason", "Consumer lag", "Predict latency", "Predict requests",
    "Training sample passes",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    started = time.monotonic()
    with LiveStack(tmp_path_factory.mktemp("live")) as live:
        # Two model versions: the first update and one grown from it.
        live.wait_for("gnp_model_version >= 2", timeout=120)
        live.wait_for("sum(gnp_ingest_rejected_total) > 0", timeout=30)
        # Let rate windows fill with predict and ingest traffic after the swap.
        live.wait_for(f"rate(gnp_predict_requests_total{{status=\"ok\"}}[{RATE_INTERVAL}]) > 0",
                      timeout=60)
        time.sleep(5)
        live.started_for = time.monotonic() - started
        yield live


def test_daemon_exports_every_metric_the_dashboard_and_alerts_use(stack):
    import yaml
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.daemon_url + "/metrics", timeout=10) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    scraped = {s.name for f in families for s in f.samples}
    used = set().union(*(metric_names(q.expr) for q in dashboard_queries(load_dashboard())))
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    used |= {n for g in rules["groups"] for r in g["rules"] for n in metric_names(r["expr"])}
    missing = used - scraped - {"up"}
    assert not missing, f"the dashboard/alerts use metrics the live daemon does not export: {missing}"


def test_every_dashboard_query_returns_data(stack):
    empty, not_finite = [], []
    for query in dashboard_queries(load_dashboard(), annotations=False):
        result = stack.query(substitute(query.expr, rate_interval=RATE_INTERVAL))
        if not result:
            empty.append(f"{query.panel} [{query.ref}]: {query.expr}")
        elif query.panel in FINITE and not all(math.isfinite(float(r["value"][1])) for r in result):
            not_finite.append(f"{query.panel} [{query.ref}]: {result}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert not not_finite, "queries with NaN/Inf:\n" + "\n".join(not_finite)


def test_main_values_make_sense(stack):
    def value(expr: str) -> float:
        return float(stack.query(expr)[0]["value"][1])

    assert value("gnp_model_version") >= 2
    assert 0.0 < value("gnp_model_accuracy") <= 1.0
    assert 0 < value("gnp_model_parameters") <= value("gnp_model_dense_parameters")
    assert value("gnp_update_epochs") > 0
    assert value('sum(gnp_updates_total{outcome="success"})') >= 2
    assert value("sum(gnp_ingest_rejected_total)") > 0, "the stack sends invalid messages"
    assert value(substitute(
        'histogram_quantile(0.95, sum by (le) (rate(gnp_predict_duration_seconds_bucket[$__rate_interval])))',
        rate_interval=RATE_INTERVAL)) > 0


def test_model_swaps_show_as_annotations(stack):
    note = next(a for a in load_dashboard()["annotations"]["list"] if a.get("expr"))
    end = time.time()
    series = stack.query_range(substitute(note["expr"]), end - stack.started_for - 10, end, 1)
    assert series and any(s["values"] for s in series), "no model swap annotated"


def test_alert_rules_load_and_evaluate(stack):
    time.sleep(2)  # at least one evaluation at the 1 s interval
    groups = stack.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"GnpdNoUpdateWhileIngesting", "GnpdConsumerLagging"}
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad
    # a healthy daemon reaches its broker: the outage alert must not even be pending
    kafka = next(r for r in rules if r["name"] == "GnpdKafkaUnreachable")
    assert kafka["state"] == "inactive", kafka


def test_render_dashboard_png(stack, tmp_path):
    from tools.render_dashboard import render

    out = tmp_path / "dashboard.png"
    end = time.time()
    render(stack.prometheus_url, out, start=end - stack.started_for, end=end, step=1.0,
           rate_interval=RATE_INTERVAL)
    assert out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
