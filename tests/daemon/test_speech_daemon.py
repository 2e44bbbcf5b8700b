"""The daemon learns speech: speech chunks in the store, speech updates in the training
child, and end to end (real broker, real store, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import json

import httpx
import numpy as np
import pytest

import gnp
from daemon.app import Daemon
from daemon.manifest import StoreError
from daemon.messages import Sample
from daemon.metrics import Metrics
from daemon.producer import ARROW_HEADERS, arrow_batches, fsdd_messages, produce
from daemon.registry import ModelRegistry, ServedModel
from daemon.settings import Settings
from daemon.speech_messages import SpeechSample
from daemon.speech_store import SpeechChunkCodec
from daemon.store import ChunkStore, val_mask
from daemon.updater import UpdatePolicy, UpdateWorker
from gnp.speech_protocol import SPEECH_TRAIN
from tests.daemon.test_app_e2e import _wait
from gnp.transcripts import NUM_SYMBOLS
from tests.gnp.test_speech_data import _write_wav

MODEL = "deepspeech2-hlstm-tiny"
WORDS = {0: "zero", 3: "three", 7: "seven"}
# A schedule a few seconds long on a 2-core CPU: speech's AdamW, one pruning step.
TINY = gnp.Schedule(new_epochs=1, all_epochs=1, baseline_epochs=2, grow_every=1,
                    incremental_lr=0.003, train=SPEECH_TRAIN,
                    prune=gnp.PruneConfig(max_iterations=1, retrain_epochs=0.5))


def _audio(i: int) -> np.ndarray:
    """A short tone whose pitch and length depend on i (no two rows alike)."""
    t = np.arange(1600 + 40 * (i % 7)) / 8000
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * (i % 10)) * t)).astype(np.float32)


def _speech(offsets, partition: int = 0) -> list[SpeechSample]:
    return [SpeechSample(_audio(o), 8000, WORDS[(0, 3, 7)[o % 3]], partition, o, f"s{o}")
            for o in offsets]


def _store(path, chunk: int = 20) -> ChunkStore:
    return ChunkStore(path, chunk, (20,), val_fraction=0.2, codec=SpeechChunkCodec())


def test_speech_chunks_are_sealed_verified_and_read_back_exactly_once(tmp_path):
    store = _store(tmp_path / "store")
    assert store.append(_speech(range(12))) == []
    assert store.skip(0, 12)  # a dead-lettered message counts as consumed
    sealed = store.append(_speech(range(5, 21)))  # 5..11 again: a re-delivery, ignored
    assert [c.rows for c in sealed] == [20] and store.next_offsets() == {0: 21}
    assert store.verify(sealed[0]) is None
    table = store.read_table()
    offs = table["offset"].to_numpy()
    assert offs.tolist() == [o for o in range(21) if o != 12]  # each once, in order
    assert [len(a) for a in table["audio"].to_pylist()] == [len(_audio(o)) for o in offs]
    assert table["transcript"].to_pylist()[:3] == ["zero", "three", "seven"]
    expected = val_mask(np.zeros(len(offs), np.int32), offs, 0.2)
    assert (table["split"].to_numpy(zero_copy_only=False) == "val").tolist() == expected.tolist()
    with pytest.raises(ValueError, match="speech samples"):
        store.append([Sample(np.zeros(20, np.float32), 1, 0, 30)])
    store.close()

    again = _store(tmp_path / "store")  # reopened: resumes after the seal, same chunk
    assert again.next_offsets() == {0: 21} and [c.id for c in again.chunks()] == [1]
    assert again.append(_speech(range(15, 21))) == [] and again.buffered == 0
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["kind"] == "speech"
    again.close()
    with pytest.raises(StoreError, match="holds speech chunks"):
        ChunkStore(tmp_path / "store", 20, (20,), val_fraction=0.2)  # an image model's store
    ChunkStore(tmp_path / "images", 20, (20,)).close()  # and the other way round
    with pytest.raises(StoreError, match="holds image chunks.*takes speech samples"):
        _store(tmp_path / "images")


def test_a_tampered_speech_chunk_fails_its_checksum(tmp_path):
    store = _store(tmp_path / "store", chunk=6)
    (chunk,) = store.append(_speech(range(6)))
    data = bytearray(chunk.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.path.write_bytes(bytes(data))
    assert "checksum mismatch" in store.verify(chunk)
    store.close()


def _worker(tmp_path, store, served: ServedModel | None = None,
            **policy) -> tuple[UpdateWorker, ServedModel]:
    registry = ModelRegistry(tmp_path / "models", MODEL, (20,), NUM_SYMBOLS)
    served = served or ServedModel((20,))
    policy = {"device": "cpu", "schedule": TINY, "max_accuracy_drop": 1.0, **policy}
    return UpdateWorker(store, registry, served, Metrics(), UpdatePolicy(**policy)), served


@pytest.mark.integration
def test_the_training_child_learns_speech_chunks_and_keeps_to_the_budget(tmp_path):
    """Speech over the replay budget streams from the store's MFCC cache instead of being
    refused; within it, the sets are resident. Both are real updates in the child."""
    store = _store(tmp_path / "store", chunk=24)
    store.append(_speech(range(24)))
    small, served = _worker(tmp_path, store, replay_memory_bytes=5_000)  # < any one set
    result = small.update_pending()
    assert result.outcome == "success", result.reason
    assert result.resident == {"val": False, "all": False, "new": False}  # all streamed
    assert result.samples == {"new": 19, "replay": 19, "val": 5}
    assert len(list((tmp_path / "store" / "mfcc-cache").glob("chunk-000001.*.arrow"))) == 1
    v = served.version
    assert v.version == 1 and v.model_name == MODEL and v.chunk_ids == ("1",)
    assert -1.0 <= v.val_accuracy <= 1.0 and 0 < v.active_params <= v.dense_params
    out = served.transcribe([_audio(1)], 8000)
    assert out.version == 1 and isinstance(out.transcripts[0], str)
    store.append(_speech(range(24, 48)))  # the next chunk: an update of version 1
    worker, _ = _worker(tmp_path, store, served)  # the default budget: resident
    result = worker.update_pending()
    assert result.outcome == "success", result.reason
    assert result.resident == {"val": True, "all": True, "new": True}
    assert served.version.parent == 1 and served.version.seen_chunk_ids == ("1", "2")
    assert len(list((tmp_path / "store" / "mfcc-cache").iterdir())) == 2  # one per chunk


@pytest.mark.integration
def test_the_daemon_learns_streamed_speech_and_serves_transcripts(tmp_path, kafka_bootstrap,
                                                                  topic):
    wavs = tmp_path / "wav"
    wavs.mkdir()
    for speaker in ("ann", "bob"):
        for digit in WORDS:
            for n in range(5, 10):  # recordings 5+: FSDD's training split
                _write_wav(wavs / f"{digit}_{speaker}_{n}.wav", 0.2 + 0.01 * n, 200 + 50 * digit)
    messages = list(fsdd_messages(wavs))
    assert len(messages) == 30
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic, "poll_timeout_ms": 100},
        store={"path": tmp_path / "store", "chunk_size": 30, "val_fraction": 0.2},
        model={"name": MODEL, "path": tmp_path / "models"},
        serve={"host": "127.0.0.1", "port": 0},
        train={"device": "cpu", "schedule": "quick", "max_accuracy_drop": 1.0})
    assert settings.model.input_shape == [20] and settings.model.num_classes == NUM_SYMBOLS
    policy = UpdatePolicy(device="cpu", schedule=TINY, max_accuracy_drop=1.0)
    with Daemon(settings, policy=policy) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=30) as client:
        bad = [{"sample_rate": 16000, "transcript": "one", "audio": [0.1] * 800},
               {"sample_rate": 8000, "transcript": "n1ne", "audio": [0.1] * 800}]
        assert produce(kafka_bootstrap, topic, messages[:10] + bad + messages[10:]) == 32
        _wait(lambda: client.get("/readyz").status_code == 200, 60, "the first speech version")
        info = client.get("/v1/model").json()
        assert info["version"] == 1 and info["history"][0]["chunks"] == ["1"]
        r = client.post("/v1/predict", json={"sample_rate": 8000, "instances": [
            {"audio": _audio(3).tolist()}, {"audio": _audio(4).tolist()}]})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_version"] == 1 and len(doc["transcripts"]) == 2
        assert all(isinstance(t, str) for t in doc["transcripts"])
        metrics = client.get("/metrics").text
        assert 'gnp_ingest_rejected_total{reason="bad_rate"} 1.0' in metrics
        assert 'gnp_ingest_rejected_total{reason="bad_transcript"} 1.0' in metrics
        wer = [line for line in metrics.splitlines() if line.startswith("gnp_model_wer_ratio ")]
        assert float(wer[0].split()[1]) == pytest.approx(1.0 - info["val_accuracy"])

        # An Arrow batch (fixed-size features) is no speech sample; the next 30 recordings
        # seal chunk 2, and version 2 (an update of version 1) answers from then on.
        assert produce(kafka_bootstrap, topic, [arrow_batches("digits", batch=4).__next__()],
                       headers=ARROW_HEADERS) == 1
        produce(kafka_bootstrap, topic, messages)
        _wait(lambda: client.get("/readyz").json().get("model_version") == 2, 60, "version 2")
        r = client.post("/v1/predict", json={"sample_rate": 8000, "instances": [
            {"audio": _audio(3).tolist()}]})
        assert r.status_code == 200 and r.json()["model_version"] == 2, r.text
        info = client.get("/v1/model").json()
        assert info["parent"] == 1 and info["history"][1]["chunks"] == ["2"]
        assert 'gnp_ingest_rejected_total{reason="bad_type"} 1.0' in client.get("/metrics").text
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["kind"] == "speech" and manifest["next_offsets"] == {"0": 63}
    assert [c["rows"] for c in manifest["chunks"]] == [30, 30]


def test_a_lost_speech_manifest_is_rebuilt_from_the_chunk_files(tmp_path):
    from daemon.rebuild import rebuild_manifest

    store = _store(tmp_path / "store", chunk=6)
    store.append(_speech(range(13)))
    before = store.chunks()
    store.close()
    (tmp_path / "store" / "manifest.json").unlink()
    done = rebuild_manifest(tmp_path / "store", (20,), 6, 0.2, kind="speech")
    assert done.manifest.kind == "speech" and done.skipped == ()
    again = _store(tmp_path / "store", chunk=6)
    assert [(c.id, c.rows, c.crc32c) for c in again.chunks()] == [
        (c.id, c.rows, c.crc32c) for c in before]
    assert again.next_offsets() == {0: 12}  # the open buffer (offset 12) is read again
    again.close()
    with pytest.raises(StoreError, match="holds speech samples"):  # not as an image store,
        rebuild_manifest(tmp_path / "store", (20,), 6, 0.2)  # which would skip (then lose) them
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["kind"] == "speech"
    assert len(list((tmp_path / "store" / "chunks").glob("chunk-*.arrow"))) == 2


def test_speech_models_take_the_speech_schedule_by_name():
    from daemon.trainproc import _schedule
    from gnp.speech_protocol import speech_schedule

    assert _schedule("quick", speech=True) == speech_schedule(quick=True)
    assert _schedule("paper", speech=True) == speech_schedule(quick=False)
    assert _schedule("quick", speech=True).train.optimizer == "adam"
    assert _schedule("quick") == gnp.Schedule.quick()
    assert _schedule(dataclasses.asdict(TINY), speech=True) == TINY  # a given schedule as is


def test_the_speech_demo_needs_its_recordings(tmp_path):
    import subprocess
    import sys

    for extra, fragment in (([], "needs --data-dir"),
                            (["--data-dir", str(tmp_path / "none")], "no {digit}_{speaker}")):
        proc = subprocess.run([sys.executable, "-m", "daemon", "demo", "--dataset", "fsdd",
                               "--port", "0", "--dir", str(tmp_path), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_the_speech_demo_prints_wer_per_version(tmp_path):
    import re
    import subprocess
    import sys

    wavs = tmp_path / "wav"
    wavs.mkdir()
    for speaker in ("ann", "bob"):
        for digit in WORDS:
            for n in range(5, 10):
                _write_wav(wavs / f"{digit}_{speaker}_{n}.wav", 0.2 + 0.01 * n, 200 + 50 * digit)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--dataset", "fsdd", "--data-dir", str(wavs),
         "--model", MODEL, "--chunk-size", "20", "--updates", "1", "--rate", "1000",
         "--port", "0", "--device", "cpu", "--dir", str(tmp_path / "demo")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^  v1 +val WER +\d+\.\d\d%.*params.*cost", proc.stdout, re.M), proc.stdout
    assert "done after 1 update(s)" in proc.stdout
