"""Training in a child process: a killed, starved or hung update never takes serving down.

Real child processes (``python -m daemon.trainproc``), a real store and registry, real
HTTP serving on 127.0.0.1, real signals and resource limits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import gnp
from daemon.registry import ModelVersion
from daemon.replay import ChunkView, chunked, row_bytes
from daemon.serving import HttpServer, create_app
from daemon.store import ChunkStore
from tests.daemon.update_env import FAKE, SHAPE, TINY, UpdateEnv, digits_arrays
from tools.harness import LogSeen

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHUNK = 200
SLOW = gnp.Schedule(new_epochs=400, all_epochs=400, baseline_epochs=800)


@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


class Env(UpdateEnv):
    def __init__(self, tmp_path, digits) -> None:
        super().__init__(tmp_path, digits, CHUNK, schedule=TINY, max_accuracy_drop=1.0)


@pytest.fixture
def env(tmp_path, digits) -> Env:
    return Env(tmp_path, digits)


class _Prober:
    """Predict requests against real HTTP in a thread; records every status and latency."""

    def __init__(self, url: str) -> None:
        self.url, self.codes, self.worst = url, [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                r = client.post("/v1/predict", json={"instances": [[0.5] * 64]})
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.codes.append(r.status_code)
                time.sleep(0.02)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_sigkill_of_the_training_child_keeps_serving_and_the_next_update_succeeds(env):
    env.seal()
    v1 = env.registry.save(gnp.build_model("lenet-300-100", SHAPE, 10), ModelVersion(
        version=0, parent=None, created=0.0, model_name="", input_shape=(), num_classes=0,
        chunk_ids=("1",), seen_chunk_ids=("1",), store_id=env.store.store_id))
    env.served.publish(*env.registry.load(v1.version))
    env.seal()
    worker = env.worker(schedule=SLOW)
    seen = LogSeen("training on")
    child_log = logging.getLogger("daemon.trainproc")
    level = child_log.level
    child_log.setLevel(logging.INFO)
    child_log.addHandler(seen)
    results: list = []
    http = HttpServer(create_app(env.served, env.metrics), "127.0.0.1", 0)
    http.start()
    try:
        with _Prober(http.url) as prober:
            t = threading.Thread(target=lambda: results.append(worker.update_pending()))
            t.start()
            assert seen.event.wait(120), "the child never started training"
            pid = worker.child_pid
            assert pid is not None and pid != os.getpid()
            time.sleep(1.0)  # well inside the first epochs
            os.kill(pid, signal.SIGKILL)
            t.join(60)
            assert not t.is_alive()
            time.sleep(0.3)
        assert prober.codes and set(prober.codes) == {200}, set(prober.codes)
        (killed,) = results
        assert killed.outcome == "infra_error" and "SIGKILL" in killed.reason
        assert worker.ledger.failures("2") == 0 and not worker.quarantined  # not the data's fault
        assert env.sample("gnp_updates_total", {"outcome": "infra_error"}) == 1
        assert env.served.version.version == 1
        worker.policy = dataclasses.replace(worker.policy, schedule=TINY)
        again = worker.update_pending()
        assert again.outcome == "success" and again.chunk_ids == ("2",)
        assert env.served.version.version == 2
    finally:
        child_log.removeHandler(seen)
        child_log.setLevel(level)
        worker.stop(timeout=30)
        http.stop()


def test_a_child_over_its_memory_limit_is_an_infrastructure_error(env):
    env.seal()
    worker = env.worker(child_memory_bytes=1)  # nothing beyond start-up: any allocation fails
    result = worker.update_pending()
    assert result.outcome == "infra_error", result
    assert worker.ledger.failures("1") == 0 and not worker.quarantined
    assert worker.child_pid is None
    worker.policy = dataclasses.replace(worker.policy, child_memory_bytes=0)
    assert worker.update_pending().outcome == "success"


def test_a_hung_child_is_killed_at_the_time_limit_and_not_blamed(env):
    env.seal()
    worker = env.worker(schedule=SLOW, timeout=8.0)
    t0 = time.monotonic()
    result = worker.update_pending()
    assert time.monotonic() - t0 < 30
    assert result.outcome == "infra_error" and "time limit of 8s" in result.reason
    assert worker.child_pid is None and worker.ledger.failures("1") == 0
    # as often as max_attempts (2) failures would quarantine it: still never blamed
    assert worker.update_pending().outcome == "infra_error"
    assert not worker.quarantined and env.sample("gnp_update_quarantined_chunks") == 0


def test_quarantine_and_failure_counts_survive_a_restart(env, monkeypatch):
    script = env.path / "script"
    script.write_text("ok fail fail fail")
    monkeypatch.setenv("GNPD_TEST_UPDATE_SCRIPT", str(script))
    env.seal()
    worker = env.worker(update_fn=FAKE + "scripted")
    assert worker.update_pending().outcome == "success"
    env.seal()
    assert worker.update_pending().outcome == "failed"
    assert worker.ledger.failures("2") == 1
    # restart: a new worker (a new daemon process would read the same file)
    worker = env.worker(update_fn=FAKE + "scripted")
    assert worker.ledger.failures("2") == 1
    assert worker.update_pending().quarantined == ("2",)
    restarted = env.worker(update_fn=FAKE + "scripted")
    assert restarted.quarantined == {"2"} and restarted.pending() == []
    assert env.sample("gnp_update_quarantined_chunks") == 1
    assert (env.store.path / "updates.json").exists()


def test_replay_over_the_memory_budget_streams_from_the_maps_and_leaves_nothing_out(env):
    """A backlog bigger than the replay budget is learnt in one real update: what fits is
    resident, the rest streams from the memory-mapped chunks; no chunk waits or is dropped."""
    env.seal(4)
    budget = 2 * CHUNK * row_bytes(64)  # room for validation and the new chunks, not replay
    worker = env.worker(replay_memory_bytes=budget)  # the real gnp.update, TINY schedule
    result = worker.update_pending()
    assert result.outcome == "success" and result.chunk_ids == ("1", "2", "3", "4")
    assert result.samples == {"new": 640, "replay": 640, "val": 160}
    assert env.served.version.seen_chunk_ids == ("1", "2", "3", "4")
    assert worker.update_pending() is None
    assert result.resident == {"val": True, "all": False, "new": False}
    big = env.worker(replay_memory_bytes=10 * budget)
    env.seal(1)
    assert big.update_pending().resident == {"val": True, "all": True, "new": True}


def test_a_cgap_update_trains_whole_units_and_publishes_them(env):
    """GNPD_TRAIN__METHOD=cgap: the child runs gnp's cgap policy; the published version
    has unit masks, loads back, and compacts to a smaller plain model."""
    from gnp.compact import compact_model
    from gnp.units import UnitMasks
    env.seal(2)
    result = env.worker(method="cgap").update_pending()
    assert result.outcome == "success"
    model, _ = env.registry.latest()
    counts = UnitMasks(model).counts()
    assert all(active < total for active, total in counts.values())
    small = compact_model(model)
    assert small.fc1.out_features == counts["fc1"][0]


DAEMON = """
import logging, sys, threading, time
import gnp
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ServedModel
from daemon.store import ChunkStore
from daemon.updater import UpdatePolicy, UpdateWorker
store = ChunkStore(sys.argv[1], 200, (1, 8, 8), 0.2)
reg = ModelRegistry(sys.argv[2], "lenet-300-100", (1, 8, 8), 10)
slow = gnp.Schedule(new_epochs=400, all_epochs=400, baseline_epochs=800)
worker = UpdateWorker(store, reg, ServedModel((1, 8, 8)), Metrics(),
                      UpdatePolicy(device="cpu", schedule=slow))
training = threading.Event()
class Seen(logging.Handler):
    def emit(self, record):
        if "training on" in record.getMessage():
            training.set()
logging.getLogger("daemon.trainproc").addHandler(Seen())
logging.getLogger("daemon.trainproc").setLevel(logging.INFO)
worker.start()
training.wait(120)
print(worker.child_pid, flush=True)
time.sleep(600)
"""


def test_the_child_dies_with_a_sigkilled_daemon(env):
    env.seal()
    env.store.close()
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(env.store.path), str(env.registry.path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = int(daemon.stdout.readline())
        os.kill(child, 0)  # running
        daemon.kill()
        daemon.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the training child outlived its daemon"
    finally:
        daemon.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for init to reap it


def test_stop_terminates_a_running_child_within_the_bound(env):
    env.seal()
    worker = env.worker(schedule=SLOW, stop_timeout=20)
    results: list = []
    worker.on_result = results.append
    worker.start()
    deadline = time.monotonic() + 60
    while worker.child_pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = worker.child_pid
    t0 = time.monotonic()
    assert worker.stop()
    assert time.monotonic() - t0 < 15
    assert [r.outcome for r in results] == ["abandoned"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---- the child's data: memory-mapped, gathered once, bounded --------------------------------

def test_chunk_views_wrap_the_memory_map_without_copying(env):
    env.seal(2)
    views = [ChunkView(c.path, SHAPE) for c in env.store.chunks()]
    x0 = views[0].features[0]
    assert x0.shape == (CHUNK, *SHAPE) and not x0.flags.owndata and not x0.flags.writeable
    (xt, yt), = views[0].tensors()
    assert xt.data_ptr() == x0.ctypes.data  # torch wraps the same memory-mapped bytes
    train = chunked(views, "train")
    assert train.parts[0].x.data_ptr() == x0.ctypes.data  # gnp reads the map itself
    x, y = train.gather(slice(None), "cpu")
    ref_x, ref_y = env.store.dataset(split="train")
    np.testing.assert_array_equal(x.numpy(), ref_x)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    assert len(chunked(views, "val")) == 2 * CHUNK * 0.2
    assert train.nbytes == len(train) * row_bytes(64)


# ---- corrupt chunks: reported and left out, never blamed on the others ----------------------

@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "truncated-old-manifest"])
def test_a_corrupt_chunk_is_left_out_while_the_others_train(env, damage):
    env.seal(3)
    path = env.store.chunks()[1].path
    data = bytearray(path.read_bytes())
    if damage == "flipped-byte":  # still a valid Arrow file: only the checksum can tell
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    if damage == "truncated-old-manifest":  # a manifest from before checksums existed
        env.store.close()
        manifest = env.store.path / "manifest.json"
        doc = json.loads(manifest.read_text())
        for c in doc["chunks"]:
            del c["crc32c"]
        manifest.write_text(json.dumps(doc))
        env.store = ChunkStore(env.store.path, CHUNK, SHAPE, val_fraction=0.2)
    real = damage == "truncated"  # real training once; the stand-in elsewhere (faster)
    worker = env.worker(**({} if real else {"update_fn": FAKE + "ok"}))
    result = worker.update_pending()

    assert result.outcome == "success", result.reason
    assert result.chunk_ids == ("1", "3") and result.corrupt == ("2",)
    assert result.samples == {"new": 2 * 160, "replay": 2 * 160, "val": 2 * 40}
    assert env.served.version.seen_chunk_ids == ("1", "3")
    assert env.sample("gnp_store_corrupt_chunks") == 1
    assert env.sample("gnp_updates_total", {"outcome": "failed"}) == 0
    assert [worker.ledger.failures(i) for i in "123"] == [0, 0, 0] and not worker.quarantined
    assert "2" in json.loads((env.store.path / "updates.json").read_text())["corrupt"]
    assert worker.pending() == []  # the corrupt chunk is not pending forever
    if not real:
        return
    env.seal()
    again = worker.update_pending()
    assert again.outcome == "success" and again.chunk_ids == ("4",) and again.corrupt == ()
    assert again.samples["replay"] == 3 * 160


FULL_DISK = """
import resource, signal, sys
import gnp
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ServedModel
from daemon.store import ChunkStore
from daemon.updater import UpdatePolicy, UpdateWorker
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the child inherits it
store = ChunkStore(sys.argv[1], 200, (1, 8, 8), 0.2)
reg = ModelRegistry(sys.argv[2], "lenet-300-100", (1, 8, 8), 10)
worker = UpdateWorker(store, reg, ServedModel((1, 8, 8)), Metrics(),
                      UpdatePolicy(device="cpu", update_fn="tests.daemon.fake_updates:ok"))
for _ in range(3):
    r = worker.update_pending()
    print(r.outcome, worker.ledger.failures("1"), sorted(worker.quarantined), r.reason)
"""


def test_a_full_disk_is_an_infrastructure_error_never_charged_to_chunks(env):
    env.seal()
    env.store.close()
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(env.store.path), str(env.registry.path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr[-3000:]
    for line in lines:  # three times: more than max_attempts, still nobody blamed
        assert line.startswith("infra_error 0 [] OSError") and "File too large" in line, line
    assert env.registry.history() == []


def test_out_of_memory_and_storage_errors_are_infrastructure_errors():
    import errno

    import torch

    from daemon.trainproc import _is_infra

    assert _is_infra(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert _is_infra(MemoryError())
    assert _is_infra(OSError(errno.ENOSPC, "No space left on device"))
    assert _is_infra(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not _is_infra(RuntimeError("boom"))
    assert not _is_infra(gnp.TrainingDiverged("training loss became nan"))


def test_the_training_child_runs_niced_with_its_configured_threads(env, tmp_path, monkeypatch):
    """Serving and ingestion get a busy CPU first: every thread of the child, torch's
    included, runs at the daemon's niceness plus GNPD_TRAIN__NICE."""
    out = tmp_path / "priority.txt"
    monkeypatch.setenv("GNPD_TEST_PRIORITY_FILE", str(out))
    env.seal()
    worker = env.worker(update_fn=FAKE + "records_priority", nice=7, torch_threads=2)
    assert worker.update_pending().outcome == "success"
    threads, *nice = map(int, out.read_text().split())
    assert threads == 2 and len(nice) >= 2
    assert set(nice) == {min(os.getpriority(os.PRIO_PROCESS, 0) + 7, 19)}


def test_each_update_is_seeded_by_its_first_new_chunk(env, tmp_path, monkeypatch):
    """Updates draw their own shuffles and dropout (not seed 0 every time), reproducibly:
    the seed is the first new chunk's id."""
    out = tmp_path / "seeds.txt"
    monkeypatch.setenv("GNPD_TEST_SEED_FILE", str(out))
    worker = env.worker(update_fn=FAKE + "records_seed")
    env.seal()
    assert worker.update_pending().outcome == "success"
    env.seal(2)
    assert worker.update_pending().outcome == "success"
    first, second = (int(v) for v in out.read_text().split())
    ids = [int(c.id) for c in env.store.chunks()]
    assert (first, second) == (ids[0], ids[1]) and first != second


def test_the_daemons_training_settings_reach_the_update(env, tmp_path, monkeypatch):
    """GNPD_TRAIN__AUGMENT, __COMPILE and __REPLAY_MEMORY_BYTES end up in the schedule the
    child's update trains with ("off" is eager: no compile mode)."""
    out = tmp_path / "train.json"
    monkeypatch.setenv("GNPD_TEST_TRAIN_FILE", str(out))
    env.seal()
    for compile_mode, augment in (("reduce-overhead", True), ("off", False)):
        worker = env.worker(update_fn=FAKE + "records_train_config", compile=compile_mode,
                            augment=augment, replay_memory_bytes=12345)
        assert worker.update_pending().outcome == "success"
        train = json.loads(out.read_text())
        assert train["compile"] == (None if compile_mode == "off" else compile_mode)
        assert train["augment"] is augment and train["resident_bytes"] == 12345
        env.seal(2)
