"""Store identity and exclusive use: a daemon never mixes one store's checkpoints with another.

Real processes (``python -m daemon run``), real files, a real broker (``kafka_bootstrap``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import gnp
from daemon.app import Daemon
from daemon.broker import free_port
from daemon.registry import ModelRegistry, ModelVersion
from daemon.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 8, 8)


def _env(data: Path, bootstrap: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "GNPD_DATA_DIR": str(data),
            "GNPD_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "GNPD_KAFKA__TOPIC": "identity",
            "GNPD_MODEL__INPUT_SHAPE": "[1,8,8]", "GNPD_SERVE__HOST": "127.0.0.1",
            "GNPD_SERVE__PORT": str(free_port()), "GNPD_TRAIN__DEVICE": "cpu", **extra}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "run", "--env-file", "/dev/null",
                           *args], env=env, capture_output=True, text=True, timeout=120)


def _checkpoint(models: Path, store_id: str, seen: tuple[str, ...] = ("1", "2")) -> Path:
    reg = ModelRegistry(models, "lenet-300-100", SHAPE, 10)
    meta = ModelVersion(version=0, parent=None, created=0.0, model_name="", input_shape=(),
                        num_classes=0, chunk_ids=seen, seen_chunk_ids=seen, store_id=store_id)
    v = reg.save(gnp.build_model("lenet-300-100", SHAPE, 10), meta)
    return reg.file(v.version)


@pytest.mark.parametrize("legacy", [False, True], ids=["other-store-id", "legacy-checkpoint"])
def test_checkpoints_of_another_store_refuse_to_start_naming_both_paths(
        tmp_path, kafka_bootstrap, legacy):
    data = tmp_path / "data"
    ckpt = _checkpoint(data / "models", "" if legacy else "0" * 32)  # a wiped / new store
    proc = _run(_env(data, kafka_bootstrap))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "StoreMismatchError" in proc.stderr
    assert str(ckpt) in proc.stderr and str(data / "store") in proc.stderr
    assert "GNPD_MODEL__ON_STORE_MISMATCH=fresh" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fresh_on_mismatch_learns_the_new_store_from_scratch(tmp_path, kafka_bootstrap):
    data = tmp_path / "data"
    _checkpoint(data / "models", "0" * 32)
    env = _env(data, kafka_bootstrap)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        d = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--env-file", "/dev/null",
                              "--on-store-mismatch", "fresh"], env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "gnpd running" not in log.read_text():
            assert d.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{env['GNPD_SERVE__PORT']}/readyz", timeout=5)
        assert r.status_code == 503  # the other store's model is not served
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(60)
    assert d.returncode == 0, log.read_text()[-2000:]
    assert "ignoring checkpoints of other stores" in log.read_text()


def test_a_second_daemon_on_the_same_store_is_refused(tmp_path, kafka_bootstrap):
    data = tmp_path / "data"
    settings = Settings(data_dir=data, kafka={"bootstrap_servers": kafka_bootstrap,
                                              "topic": "identity"},
                        model={"input_shape": list(SHAPE)}, serve={"port": 0},
                        train={"device": "cpu"})
    with Daemon(settings):
        proc = _run(_env(data, kafka_bootstrap))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"in use by process {os.getpid()}" in proc.stderr
    assert str(data / "store") in proc.stderr
