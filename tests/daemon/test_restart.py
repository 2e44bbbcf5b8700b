"""Crash safety: SIGKILL the daemon process during ingestion and during an update.

The broker comes from the ``kafka_bootstrap`` fixture, so the messages outlive the
daemon. After every restart serving must resume at once from the last checkpoint, and
in the end every produced sample must be stored exactly once (checked by sample id in
the Arrow chunk files themselves).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from daemon.broker import free_port
from daemon.producer import dataset_messages, produce

pytestmark = pytest.mark.integration

CHUNK = 200
TOTAL = 1000  # five chunks of digits


class Proc:
    """``python -m daemon run`` in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, int(env["GNPD_SERVE__PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        """Log lines written since the last start."""
        return self.log.read_text(errors="replace")[self._offset:]

    def first_readyz(self, timeout: float = 60) -> httpx.Response:
        """The first /readyz answer once the HTTP server is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited:\n{self.text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"daemon did not serve HTTP:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _wait(predicate, timeout: float, what: str, proc: Proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.proc.poll() is None, f"daemon exited:\n{proc.text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{proc.text()[-3000:]}")


def _manifest_chunks(store: Path) -> list[dict]:
    try:
        return json.loads((store / "manifest.json").read_text())["chunks"]
    except (OSError, ValueError):
        return []


def _saved_versions(models: Path) -> list[int]:
    return sorted(int(p.stem[1:]) for p in models.glob("v*.json"))


def _model(proc: Proc) -> dict:
    """/v1/model, or {} while it is not there; a slow answer on a loaded machine (a daemon
    just restarted beside its training child) counts as not there yet: this test is about
    data, the serving latency has its benchmark."""
    try:
        r = httpx.get(f"{proc.url}/v1/model", timeout=10)
    except httpx.TimeoutException:
        return {}
    return r.json() if r.status_code == 200 else {}


def _stored_ids(store: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted((store / "chunks").glob("*.arrow")):
        with pa.memory_map(str(path), "r") as src:
            ids += ipc.open_file(src).read_all().column("id").to_pylist()
    return ids


def test_sigkill_during_ingestion_and_update_loses_and_duplicates_nothing(
        tmp_path, kafka_bootstrap, topic):
    store, models = tmp_path / "store", tmp_path / "models"
    env = {**os.environ, "GNPD_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "GNPD_KAFKA__TOPIC": topic, "GNPD_KAFKA__POLL_TIMEOUT_MS": "100",
           "GNPD_STORE__PATH": str(store), "GNPD_STORE__CHUNK_SIZE": str(CHUNK),
           "GNPD_MODEL__PATH": str(models), "GNPD_MODEL__INPUT_SHAPE": "[1,8,8]",
           "GNPD_SERVE__HOST": "127.0.0.1", "GNPD_SERVE__PORT": str(free_port()),
           "GNPD_TRAIN__DEVICE": "cpu", "GNPD_TRAIN__SCHEDULE": "quick",
           "GNPD_TRAIN__MAX_ACCURACY_DROP": "1.0"}
    messages = list(itertools.islice(dataset_messages("digits"), TOTAL))
    produced = {m["id"] for m in messages}
    d = Proc(env, tmp_path / "daemon.log")
    try:
        # 1. Two chunks, trained; a stable state with a checkpoint.
        d.start()
        assert d.first_readyz().status_code == 503
        produce(kafka_bootstrap, topic, messages[:2 * CHUNK])
        _wait(lambda: _model(d).get("seen_chunks") == 2, 120, "chunks 1-2 learnt", d)
        before = _saved_versions(models)[-1]

        # 2. SIGKILL while messages are still arriving and being buffered.
        feeder = threading.Thread(target=produce, args=(
            kafka_bootstrap, topic, messages[2 * CHUNK:], 300.0))
        feeder.start()
        _wait(lambda: len(_manifest_chunks(store)) >= 3, 60, "chunk 3 sealed", d)
        d.kill()
        feeder.join()
        killed_at = _saved_versions(models)[-1]
        assert killed_at >= before

        # 3. Restart: served at once from the last checkpoint; catches up on the topic.
        d.start()
        r = d.first_readyz()
        assert r.status_code == 200 and r.json()["model_version"] == killed_at
        _wait(lambda: len(_manifest_chunks(store)) == TOTAL // CHUNK, 60, "all chunks", d)
        # ... then SIGKILL in the middle of an update.
        _wait(lambda: "update starting" in d.text().rsplit("saved model version", 1)[-1]
              and d.text().count("update starting") > d.text().count("saved model version"),
              120, "an update to start", d)
        d.kill()
        assert "update starting" in d.text().rsplit("saved model version", 1)[-1]
        last = _saved_versions(models)[-1]

        # 4. Restart again: same version served at once, then everything gets learnt.
        d.start()
        r = d.first_readyz()
        assert r.status_code == 200 and r.json()["model_version"] == last
        _wait(lambda: _model(d).get("seen_chunks") == TOTAL // CHUNK, 120, "all learnt", d)
        info = _model(d)
        assert info["version"] > last and info["history"][-1]["version"] == info["version"]

        # Every produced sample is stored exactly once, in chunk files the manifest lists.
        ids = _stored_ids(store)
        assert len(ids) == len(set(ids)) == TOTAL
        assert set(ids) == produced
        files = {p.name for p in (store / "chunks").iterdir()}
        assert files == {c["file"] for c in _manifest_chunks(store)}
        assert not list(models.glob("*.tmp"))

        # SIGTERM stops cleanly with exit code 0.
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(45) == 0
        assert "gnpd stopped" in d.text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
