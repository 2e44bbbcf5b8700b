"""End to end against a real broker: produce -> chunks seal -> updates -> serving and metrics."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gnp
from daemon.app import Daemon
from daemon.producer import dataset_messages, produce
from daemon.settings import Settings
from daemon.updater import UpdatePolicy

pytestmark = pytest.mark.integration

CHUNK = 200
TINY = gnp.Schedule(new_epochs=1, all_epochs=1, baseline_epochs=3, grow_every=1,
                    prune=gnp.PruneConfig(max_iterations=3, retrain_epochs=0.5))


def _settings(tmp_path, bootstrap: str, topic: str) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "topic": topic, "poll_timeout_ms": 100},
        store={"path": tmp_path / "store", "chunk_size": CHUNK, "val_fraction": 0.2},
        model={"name": "lenet-300-100", "input_shape": [1, 8, 8], "num_classes": 10,
               "path": tmp_path / "models"},
        serve={"host": "127.0.0.1", "port": 0},
        train={"device": "cpu", "schedule": "quick", "max_accuracy_drop": 1.0})


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _served_version(client: httpx.Client) -> int:
    r = client.get("/readyz")
    return r.json()["model_version"] if r.status_code == 200 else 0


def _families(client: httpx.Client) -> dict[str, dict[tuple, float]]:
    """Parsed /metrics: family name -> {(sample name, sorted labels): value}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def _value(families, family: str, sample: str | None = None, **labels) -> float:
    return families[family][(sample or family, tuple(sorted(labels.items())))]


def test_stream_to_versions_history_and_metrics(tmp_path, kafka_bootstrap, topic):
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    messages = dataset_messages("digits")
    policy = UpdatePolicy(device="cpu", schedule=TINY, max_accuracy_drop=1.0)
    with Daemon(settings, policy=policy) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # no model yet
        assert client.post("/v1/predict", json={"instances": [[0.0] * 64]}).status_code == 503

        # Chunk 1 plus one poison message: the first update trains the initial model.
        sent = produce(kafka_bootstrap, topic, itertools.chain(
            itertools.islice(messages, 100), [b'{"features": "oops", "label": 1}'],
            itertools.islice(messages, 100)))
        assert sent == CHUNK + 1
        _wait(lambda: _served_version(client) == 1, 90, "version 1")
        # Chunk 2 and 3, one after the other: versions keep advancing.
        for expected in (2, 3):
            produce(kafka_bootstrap, topic, itertools.islice(messages, CHUNK))
            _wait(lambda: _served_version(client) == expected, 90, f"version {expected}")

        info = client.get("/v1/model").json()
        assert info["version"] == 3 and info["parent"] == 2 and info["seen_chunks"] == 3
        assert [h["version"] for h in info["history"]] == [1, 2, 3]
        assert [h["chunks"] for h in info["history"]] == [["1"], ["2"], ["3"]]
        assert [h["parent"] for h in info["history"]] == [None, 1, 2]
        assert 0.0 <= info["val_accuracy"] <= 1.0
        assert 0 < info["active_parameters"] <= info["dense_parameters"] == 50610
        assert info["cost"]["sample_passes"] > 0 and info["cost"]["epochs"] > 0

        r = client.post("/v1/predict", json={"instances": [[0.5] * 64, [0.0] * 64]})
        assert r.status_code == 200 and r.json()["model_version"] == 3
        assert all(0 <= p < 10 for p in r.json()["predictions"])

        fam = _families(client)
        assert _value(fam, "gnp_model_accuracy") == pytest.approx(info["val_accuracy"])
        assert _value(fam, "gnp_model_parameters") == info["active_parameters"]
        assert _value(fam, "gnp_model_dense_parameters") == 50610
        assert 0 < _value(fam, "gnp_update_epochs") == pytest.approx(info["cost"]["epochs"])
        assert _value(fam, "gnp_model_version") == 3
        assert _value(fam, "gnp_updates", "gnp_updates_total", outcome="success") == 3
        assert _value(fam, "gnp_updates", "gnp_updates_total", outcome="failed") == 0
        assert _value(fam, "gnp_model_swaps", "gnp_model_swaps_total") == 3
        assert _value(fam, "gnp_update_duration_seconds", "gnp_update_duration_seconds_count") == 3
        assert _value(fam, "gnp_ingest_samples", "gnp_ingest_samples_total") == 3 * CHUNK
        assert sum(fam["gnp_ingest_rejected"].values()) == 1  # the poison message
        assert _value(fam, "gnp_store_chunks") == 3
        assert _value(fam, "gnp_store_buffered_samples") == 0
        assert _value(fam, "gnp_predict_requests", "gnp_predict_requests_total",
                      status="ok") == 1

    # Stopped cleanly: the three versions are on disk and the next daemon serves v3 at once.
    with Daemon(settings, policy=policy) as again, \
            httpx.Client(base_url=again.url, timeout=10) as client:
        assert client.get("/readyz").json() == {"ready": True, "model_version": 3}
        assert _value(_families(client), "gnp_model_version") == 3


def test_embedded_broker_is_started_and_stopped_with_the_daemon(tmp_path):
    settings = _settings(tmp_path, "", "samples")
    with Daemon(settings) as daemon:
        broker = daemon.broker
        assert broker is not None and broker.running
        assert daemon.bootstrap_servers == broker.bootstrap_servers
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503
    assert not broker.running


def test_run_with_invalid_settings_exits_2_naming_the_field(tmp_path):
    env = {**os.environ, "GNPD_STORE__CHUNK_SIZE": "0", "GNPD_SERVE__PORT": "http"}
    proc = subprocess.run([sys.executable, "-m", "daemon", "run", "--env-file", "/dev/null"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "GNPD_STORE__CHUNK_SIZE" in proc.stderr and "GNPD_SERVE__PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_command_prints_urls_and_one_line_per_update(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--dataset", "digits", "--updates", "2",
         "--rate", "1000", "--port", "0", "--device", "cpu", "--dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for path in ("/v1/model", "/metrics", "/docs"):
        assert re.search(rf"http://127\.0\.0\.1:\d+{path}", out)
    assert re.search(r"^  v1 .*val accuracy.*params.*cost.*epochs", out, re.M)
    assert re.search(r"^  v2 ", out, re.M) and "done after 2 update(s)" in out
    assert sorted(p.name for p in (tmp_path / "models").glob("*.json"))[:2] == [
        "v000001.json", "v000002.json"]
