"""docs/operations.md: its generated tables follow the code; the dashboard picture exists."""

from __future__ import annotations

import re
from pathlib import Path

from tools import gen_docs

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operations.md"


def test_generated_tables_are_up_to_date():
    text = DOC.read_text(encoding="utf-8")
    assert gen_docs.render(text) == text, "run: python tools/gen_docs.py"


def test_settings_table_lists_every_setting(settings_env_names):
    text = DOC.read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(GNPD_\w+)` \|", text, re.M))
    assert listed == settings_env_names


def test_metrics_table_lists_every_metric():
    from prometheus_client import CollectorRegistry

    from daemon.metrics import Metrics

    families = Metrics(CollectorRegistry()).registry.collect()
    exposed = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    listed = set(re.findall(r"^\| `(gnp_\w+)` \|", DOC.read_text(encoding="utf-8"), re.M))
    assert listed == exposed


def test_render_out_of_date_is_detected(tmp_path):
    stale = DOC.read_text(encoding="utf-8").replace("`GNPD_STORE__CHUNK_SIZE`", "`GNPD_X`")
    path = tmp_path / "operations.md"
    path.write_text(stale, encoding="utf-8")
    assert gen_docs.main(["--check", "--doc", str(path)]) == 1


def test_dashboard_png_is_committed_and_documented():
    png = REPO / "docs" / "dashboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = DOC.read_text(encoding="utf-8")
    assert "](dashboard.png)" in text
    assert "tools/render_dashboard.py --live" in text


# The Kafka-outage alert (issue 8, item 11) joins alerts.yml with the ingest work; its
# runbook entry is here already, so it is required whether or not the rule is there yet.
RUNBOOK_ALWAYS = {"GnpdKafkaUnreachable"}


def _runbook(text: str) -> dict[str, str]:
    """Entry text by alert name, from the 'What to do when an alert fires' section."""
    match = re.search(r"^## What to do when an alert fires\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "docs/operations.md has no '## What to do when an alert fires' section"
    parts = re.split(r"^### (\w+)\n", match.group(1), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_runbook_has_an_entry_for_every_alert():
    import yaml

    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    entries = _runbook(DOC.read_text(encoding="utf-8"))
    missing = (alerts | RUNBOOK_ALWAYS) - set(entries)
    assert not missing, f"no runbook entry for {sorted(missing)}"
    for name, body in entries.items():
        for part in ("**Means.**", "**First checks.**", "**Fix.**"):
            assert part in body, f"runbook entry {name} lacks {part}"
        assert not re.search(r"\b(TODO|TBD|FIXME|XXX)\b|<fill", body), f"{name}: placeholder"


def test_runbook_kafka_entry_matches_the_alert_it_documents():
    body = _runbook(DOC.read_text(encoding="utf-8"))["GnpdKafkaUnreachable"]
    assert "gnp_ingest_last_poll_timestamp_seconds" in body and "60" in body
