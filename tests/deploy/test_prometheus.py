"""Prometheus config and alert rules: promtool-valid, unit-tested, and naming real metrics."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tools.promql import metric_names

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"


def _promtool(promtool: str, *args: str) -> str:
    proc = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_promtool_check_config(promtool):
    assert "SUCCESS" in _promtool(promtool, "check", "config", "prometheus.yml")


def test_promtool_check_rules(promtool):
    assert "SUCCESS" in _promtool(promtool, "check", "rules", "alerts.yml")


def test_promtool_unit_tests_of_the_alerts(promtool):
    """alerts_test.yml: each alert fires on a faulty series and stays quiet on a healthy one."""
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "alerts_test.yml")


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    """A rule with a wrong threshold makes `promtool test rules` fail (the test is not vacuous)."""
    broken = (PROM / "alerts.yml").read_text().replace(
        "sum by (job, instance) (gnp_ingest_lag_messages) > 10000",
        "sum by (job, instance) (gnp_ingest_lag_messages) > 100000")
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text((PROM / "alerts_test.yml").read_text())
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "GnpdConsumerLagging" in proc.stdout + proc.stderr


def test_the_issue_s_alerts_exist(rules):
    names = {r["alert"] for r in rules}
    assert {"GnpdNoUpdateWhileIngesting", "GnpdAccuracyDropAfterSwap", "GnpdHighRejectionRate",
            "GnpdUpdateFailed", "GnpdConsumerLagging", "GnpdKafkaUnreachable"} <= names


def test_every_alert_has_for_severity_and_text(rules):
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_unit_tested_firing(rules):
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    assert {r["alert"] for r in rules} <= fired


def test_alerts_use_only_exported_metrics(rules, exported_names):
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exported_names - {"up"}
        assert not unknown, f"{rule['alert']} uses metrics the daemon does not export: {unknown}"


def test_the_kafka_alert_unit_test_can_fail(promtool, tmp_path):
    """A Kafka alert that waited 2 minutes instead of 1 fails its promtool unit test."""
    text = (PROM / "alerts.yml").read_text()
    broken = text.replace("time() - gnp_ingest_last_poll_timestamp_seconds > 60",
                          "time() - gnp_ingest_last_poll_timestamp_seconds > 120")
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text((PROM / "alerts_test.yml").read_text())
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "GnpdKafkaUnreachable" in proc.stdout + proc.stderr
