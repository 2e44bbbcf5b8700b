"""The update worker over a real chunk store and registry, training in a real child process.

gnp's update runs in the child, or a stand-in from ``tests/daemon/fake_updates.py``
(named by ``module:function``: the child imports it).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import gnp
from daemon.registry import ModelVersion
from daemon.updater import UpdatePolicy
from tests.daemon.update_env import FAKE, SHAPE, TINY, UpdateEnv, digits_arrays

CHUNK = 200


@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


class Env(UpdateEnv):
    """A store, registry, served model and metrics in tmp_path, plus a worker factory."""

    def __init__(self, tmp_path, digits) -> None:
        super().__init__(tmp_path, digits, CHUNK, schedule=TINY, max_accuracy_drop=1.0,
                         update_fn="gnp:update")

    def learnt_first_chunk(self) -> None:
        """Seal chunk 1 and serve a saved (untrained) version that learnt it: no update run."""
        self.seal()
        v = self.registry.save(gnp.build_model("lenet-300-100", SHAPE, 10), ModelVersion(
            version=0, parent=None, created=0.0, model_name="", input_shape=(), num_classes=0,
            chunk_ids=("1",), seen_chunk_ids=("1",), store_id=self.store.store_id))
        self.served.publish(*self.registry.load(v.version))


@pytest.fixture
def env(tmp_path, digits) -> Env:
    return Env(tmp_path, digits)


def test_first_update_trains_saves_publishes_and_records(env):
    env.seal()
    worker = env.worker()
    assert env.sample("gnp_store_buffered_samples") == CHUNK
    assert env.sample("gnp_update_pending_chunks") == 1
    result = worker.update_pending()

    assert result.outcome == "success" and result.chunk_ids == ("1",)
    v = result.version
    assert v.version == 1 and v.parent is None and v.seen_chunk_ids == ("1",)
    assert v.offsets == {"1": {"0": (0, CHUNK - 1)}}
    assert 0.0 <= v.val_accuracy <= 1.0 and 0 < v.active_params <= v.dense_params
    assert v.cost.sample_passes > 0 and v.cost.epochs > 0
    assert env.served.version == v and env.registry.latest()[1] == v
    assert v.parent is None and v.store_id == env.store.store_id
    assert result.samples == {"new": CHUNK * 0.8, "replay": CHUNK * 0.8, "val": CHUNK * 0.2}
    assert not (env.registry.path / ".work").exists() or \
        not list((env.registry.path / ".work").iterdir())  # the candidate is cleaned up

    assert env.sample("gnp_model_version") == 1
    assert env.sample("gnp_model_accuracy") == pytest.approx(v.val_accuracy)
    assert env.sample("gnp_model_parameters") == v.active_params
    assert env.sample("gnp_model_dense_parameters") == v.dense_params
    assert env.sample("gnp_update_epochs") == pytest.approx(v.cost.epochs)
    assert env.sample("gnp_update_sample_passes_total") == v.cost.sample_passes
    assert env.sample("gnp_updates_total", {"outcome": "success"}) == 1
    assert env.sample("gnp_model_swaps_total") == 1
    assert env.sample("gnp_update_duration_seconds_count") == 1
    assert env.sample("gnp_update_last_success_timestamp_seconds") > 0
    assert env.sample("gnp_store_buffered_samples") == 0
    assert env.sample("gnp_update_pending_chunks") == 0
    assert worker.update_pending() is None  # nothing pending any more


def test_next_update_learns_only_pending_chunks_together_and_replays_all(env):
    env.seal()
    worker = env.worker()
    first = worker.update_pending().version
    served_model = env.served.current()[0]
    before = {k: v.clone() for k, v in served_model.state_dict().items()}
    env.seal(2)  # two chunks sealed during/after the first update join one update
    assert env.sample("gnp_store_buffered_samples") == 2 * CHUNK
    assert env.sample("gnp_update_pending_chunks") == 2

    result = worker.update_pending()
    assert result.outcome == "success" and result.chunk_ids == ("2", "3")
    v = result.version
    assert v.version == 2 and v.parent == first.version
    assert v.seen_chunk_ids == ("1", "2", "3") and set(v.offsets) == {"2", "3"}
    assert result.samples == {"new": 2 * CHUNK * 0.8, "replay": 3 * CHUNK * 0.8,
                              "val": 3 * CHUNK * 0.2}
    # The published model of version 1 was never touched by the second update.
    assert all(torch.equal(before[k], t) for k, t in served_model.state_dict().items())
    assert env.served.version.version == 2 and env.sample("gnp_model_swaps_total") == 2


FAILURES = {
    "raises": ("raises", {}, "RuntimeError while training: boom"),
    "diverged": ("diverged", {}, "TrainingDiverged"),
    "nan weights": ("nan_weights", {}, "non-finite"),
    "nan accuracy": ("nan_accuracy", {}, "non-finite"),
    "accuracy collapse": ("collapse", {"min_accuracy": 0.05}, "below the floor"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_update_keeps_the_served_model_and_counts_failed(env, case):
    fn, policy, reason = FAILURES[case]
    env.learnt_first_chunk()
    served_before = env.served.current()
    env.seal()
    worker = env.worker(update_fn=FAKE + fn, **policy)
    result = worker.update_pending()

    assert result.outcome == "failed" and reason in result.reason
    assert env.served.current() == served_before  # same model object, same version
    assert [v.version for v in env.registry.history()] == [1]
    assert env.sample("gnp_updates_total", {"outcome": "failed"}) == 1
    assert [c.id for c in worker.pending()] == [2]  # still pending for a retry
    assert env.sample("gnp_update_duration_seconds_count") == 1
    assert worker.ledger.failures("2") == 1  # charged to the chunk, durably


def test_collapse_floor_is_relative_to_the_served_model(env):
    env.learnt_first_chunk()
    env.seal()
    worker = env.worker(update_fn=FAKE + "accuracy_075", evaluate_fn=FAKE + "evaluate_09",
                        max_accuracy_drop=0.1)
    result = worker.update_pending()
    assert result.outcome == "failed" and "0.7500 below the floor 0.8000" in result.reason
    assert result.samples["val"] == 2 * CHUNK * 0.2  # the served model is judged on this set


def test_a_chunk_failing_twice_is_quarantined_and_later_updates_proceed(env, monkeypatch):
    env.seal()
    script = env.path / "script"
    script.write_text("ok fail fail ok")
    monkeypatch.setenv("GNPD_TEST_UPDATE_SCRIPT", str(script))
    worker = env.worker(update_fn=FAKE + "scripted")
    assert worker.update_pending().outcome == "success"
    env.seal()  # chunk 2
    first = worker.update_pending()
    assert first.outcome == "failed" and first.quarantined == ()
    env.seal()  # chunk 3: the retry of chunk 2 happens together with it
    second = worker.update_pending()
    assert second.outcome == "failed" and second.chunk_ids == ("2", "3")
    assert second.quarantined == ("2",) and worker.quarantined == {"2"}
    env.seal()  # chunk 4
    third = worker.update_pending()
    assert third.outcome == "success" and third.chunk_ids == ("3", "4")
    assert third.samples["replay"] == 3 * CHUNK * 0.8  # chunks 1, 3, 4: not the quarantined one
    assert env.sample("gnp_updates_total", {"outcome": "failed"}) == 2
    assert env.sample("gnp_store_buffered_samples") == 0


def _started(env):
    """The env's worker thread, started, with the results it reports and an event set on each."""
    results, done = [], threading.Event()
    worker = env.worker()
    worker.on_result = lambda r: (results.append(r), done.set())
    worker.start()
    return worker, results, done


def test_worker_thread_learns_stored_chunks_at_start_and_on_seal(env):
    env.seal()
    worker, results, done = _started(env)
    try:
        assert done.wait(60) and results[0].outcome == "success"
        done.clear()
        env.seal()
        worker.notify([])
        assert done.wait(60) and results[1].version.chunk_ids == ("2",)
    finally:
        assert worker.stop(timeout=30)
    assert env.served.version.version == 2


def test_a_chunk_without_validation_rows_waits_for_the_next_seal_not_in_a_loop(tmp_path, digits):
    """round(2 x 0.2) = 0 validation rows: the child answers no_data, and the loop woke itself
    again at once for the same chunk, spawning training children back to back forever."""
    env = UpdateEnv(tmp_path, digits, 2, schedule=TINY)
    env.seal()
    worker, results, first = _started(env)
    try:
        assert first.wait(60)
        time.sleep(6)  # a child takes about a second: a loop would have run several
    finally:
        assert worker.stop(timeout=30)
    assert [r.outcome for r in results] == ["no_data"]
    assert "no validation rows" in results[0].reason


def test_a_work_folder_that_cannot_be_made_is_an_infra_error(tmp_path, digits):
    """out.mkdir() sat above the try that turns storage errors into infra_error: the update
    escaped as an exception, neither counted nor reported."""
    env = UpdateEnv(tmp_path, digits, 200, schedule=TINY)
    env.seal()
    worker = env.worker()
    (env.registry.path / ".work").write_text("")  # stands in for ENOSPC or EROFS on mkdir
    result = worker.update_pending()
    assert result.outcome == "infra_error" and "NotADirectoryError" in result.reason
    assert env.sample("gnp_updates_total", {"outcome": "infra_error"}) == 1


def test_a_damaged_old_checkpoint_is_left_out_of_the_gate_and_blames_no_chunk(tmp_path, digits):
    """Start-up skips a version whose weights fail their checksum, but it stayed a gate
    reference: its CheckpointError in the child was blamed on the new chunks, which were
    quarantined, and no update could succeed again."""
    from daemon.control import ModelControl
    from daemon.updater import UpdateWorker

    env = UpdateEnv(tmp_path, digits, 200, schedule=TINY, max_accuracy_drop=1.0)
    env.seal(2)
    for chunks, seen, parent in ((("1",), ("1",), None), (("2",), ("1", "2"), 1)):
        env.registry.save(gnp.build_model("lenet-300-100", SHAPE, 10), ModelVersion(
            version=0, parent=parent, created=0.0, model_name="", input_shape=(), num_classes=0,
            chunk_ids=chunks, seen_chunk_ids=seen, store_id=env.store.store_id))
    weights = env.registry.path / "v000002.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # bit rot in version 2
    weights.write_bytes(bytes(blob))
    latest = env.registry.latest()
    assert latest[1].version == 1  # start-up serves version 1
    control = ModelControl(env.served, env.registry, env.metrics, env.store.store_id)
    control.start(latest)
    worker = UpdateWorker(env.store, env.registry, env.served, env.metrics,
                          UpdatePolicy(**{**env.defaults, "update_fn": FAKE + "ok"}), control=control)
    for _ in range(2):  # max_attempts failures used to quarantine chunk 2
        result = worker.update_pending()
        assert result.outcome == "success", result.reason
        env.seal()
    assert worker.quarantined == frozenset() and env.served.version.version == 4


def test_a_pin_during_cleanup_never_leaves_a_pinned_version_without_its_files(tmp_path, digits):
    """Cleanup read the protected versions, then deleted, outside the control lock: a pin
    of an old version landing in between was answered and served while its files went."""
    from daemon.control import ControlError

    env = UpdateEnv(tmp_path, digits, 200, schedule=TINY, max_accuracy_drop=1.0, keep_versions=1)
    env.seal()
    worker = env.worker(update_fn=FAKE + "ok")
    assert worker.update_pending().outcome == "success"  # version 1
    env.seal()
    control, original, outcome = worker.control, worker.control.protected, []

    def pin_one() -> None:  # POST /v1/model/pin {"version": 1}, from an HTTP thread
        try:
            outcome.append(control.pin(1).version)
        except ControlError as e:
            outcome.append(str(e))

    def protected_then_a_pin_arrives():
        keep = original()
        pinner = threading.Thread(target=pin_one)
        pinner.start()
        pinner.join(0.5)  # it waits for the cleanup now
        worker.pinner = pinner
        return keep

    control.protected = protected_then_a_pin_arrives
    assert worker.update_pending().outcome == "success"  # version 2, then the cleanup
    worker.pinner.join(30)
    assert len(outcome) == 1
    if control.pinned() == 1:  # pinned after all: its files must be there
        assert (env.registry.path / "v000001.json").exists() and outcome == [1]
    else:  # refused: version 1 was deleted first
        assert "1" in outcome[0] and env.served.version.version == 2


def test_a_model_the_registry_cannot_build_is_an_infra_error_and_quarantines_nothing(tmp_path, digits):
    """The build error came inside the "training" step, so it was blamed on the chunks."""
    from daemon.registry import ModelRegistry, ServedModel
    from daemon.updater import UpdateWorker

    env = UpdateEnv(tmp_path, digits, 100)
    env.registry = ModelRegistry(tmp_path / "models", "lenet-300", SHAPE, 10)  # no such model
    worker = UpdateWorker(env.store, env.registry, ServedModel(SHAPE), env.metrics,
                          UpdatePolicy(device="cpu", max_attempts=2))
    env.seal()
    for _ in range(2):
        result = worker.update_pending()
        assert result.outcome == "infra_error" and "building the model" in result.reason
    assert not worker.quarantined


def test_stop_abandons_a_running_update_within_the_bound_and_saves_nothing(env):
    env.seal()
    slow = gnp.Schedule(new_epochs=200, all_epochs=200, baseline_epochs=400)
    results = []
    worker = env.worker(schedule=slow, stop_timeout=20)
    worker.on_result = results.append
    worker.start()
    deadline = time.monotonic() + 30
    while not worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert worker.stop()
    assert time.monotonic() - t0 < 10
    assert [r.outcome for r in results] == ["abandoned"]
    assert env.sample("gnp_updates_total", {"outcome": "abandoned"}) == 1
    assert env.registry.history() == [] and env.served.version is None


def test_policy_from_settings():
    from daemon.settings import Settings

    s = Settings(train={"device": "cpu", "schedule": "quick", "stop_timeout_seconds": 7,
                        "min_accuracy": 0.3, "max_accuracy_drop": 0.05, "max_attempts": 3,
                        "update_timeout_seconds": 60, "replay_memory_bytes": 10**6,
                        "child_memory_bytes": 10**9})
    p = UpdatePolicy.from_settings(s)
    assert (p.device, p.schedule, p.stop_timeout, p.min_accuracy, p.max_accuracy_drop) == (
        "cpu", "quick", 7.0, 0.3, 0.05)
    assert (p.max_attempts, p.timeout, p.replay_memory_bytes, p.child_memory_bytes) == (
        3, 60.0, 10**6, 10**9)
    assert np.isclose(p.max_accuracy_drop, 0.05)


def test_only_the_newest_versions_are_kept(env):
    worker = env.worker(update_fn=FAKE + "ok", keep_versions=2)
    for _ in range(3):
        env.seal()
        assert worker.update_pending().outcome == "success"
    assert [v.version for v in env.registry.history()] == [2, 3]
    assert env.served.version.version == 3 and not list(env.registry.path.glob("*.tmp"))
