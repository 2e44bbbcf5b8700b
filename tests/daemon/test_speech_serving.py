"""/v1/predict with a served speech model: audio in, transcripts out (real HTTP)."""

from __future__ import annotations

import numpy as np
import httpx
import pytest

from daemon.metrics import Metrics
from daemon.registry import ModelVersion, ServedModel, UpdateCost
from daemon.serving import HttpServer, create_app
from daemon.speech_messages import encode_pcm16
from gnp.models import build_model
from gnp.transcripts import NUM_SYMBOLS

pytestmark = pytest.mark.integration


def _version(n: int) -> ModelVersion:
    return ModelVersion(version=n, parent=None, created=1.0e9, model_name="deepspeech2-hlstm-tiny",
                        input_shape=(20,), num_classes=NUM_SYMBOLS, chunk_ids=("c1",),
                        seen_chunk_ids=("c1",), val_accuracy=0.5, active_params=1000,
                        dense_params=4000, cost=UpdateCost(500, 1.5, 2.0, "cpu"))


@pytest.fixture
def client():
    served = ServedModel((20,))
    srv = HttpServer(create_app(served, Metrics(), lambda: []), "127.0.0.1", 0)
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield served, c
    srv.stop()


def test_speech_predict_returns_transcripts_from_one_version(client):
    served, c = client
    assert c.post("/v1/predict", json={"instances": [[0.0] * 20]}).status_code == 503
    served.publish(build_model("deepspeech2-hlstm-tiny", (20,), NUM_SYMBOLS), _version(3))
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(2400)).clip(-1, 1)
    r = c.post("/v1/predict", json={"sample_rate": 8000, "instances": [
        {"audio": audio.tolist()}, {"audio_pcm16": encode_pcm16(audio[:1600])}]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_version"] == 3 and len(doc["transcripts"]) == 2
    assert all(isinstance(t, str) for t in doc["transcripts"])
    assert all(0.0 < p <= 1.0 for p in doc["confidence"])


@pytest.mark.parametrize("body, fragment", [
    ({"sample_rate": 16000, "instances": [{"audio": [0.1] * 800}]}, "sample rate"),
    ({"instances": [{"audio": [0.1] * 800}]}, "sample_rate"),
    ({"sample_rate": 8000, "instances": [{"audio": []}]}, "empty"),
    ({"sample_rate": 8000, "instances": [{"audio": [0.01] * 128}]}, "one analysis window"),
    ({"sample_rate": 8000, "instances": [{"audio": [0.1, 2.0]}]}, "[-1, 1]"),
    ({"sample_rate": 8000, "instances": [[0.1, 0.2]]}, "audio or audio_pcm16"),
    ({"sample_rate": 8000, "instances": []}, "instances"),
])
def test_bad_audio_requests_are_400_with_the_reason(client, body, fragment):
    served, c = client
    served.publish(build_model("deepspeech2-hlstm-tiny", (20,), NUM_SYMBOLS), _version(1))
    r = c.post("/v1/predict", json=body)
    assert r.status_code == 400 and fragment in r.json()["detail"], r.text


def test_served_speech_model_exports_its_wer_and_classifiers_nan():
    import dataclasses
    import math

    from daemon.control import record_served

    metrics = Metrics()
    assert math.isnan(metrics.registry.get_sample_value("gnp_model_wer_ratio"))  # no model yet
    record_served(metrics, dataclasses.replace(_version(2), val_accuracy=0.93))
    assert metrics.registry.get_sample_value("gnp_model_wer_ratio") == pytest.approx(0.07)
    assert metrics.registry.get_sample_value("gnp_model_accuracy") == pytest.approx(0.93)
    record_served(metrics, dataclasses.replace(_version(3), model_name="lenet-300-100"))
    assert math.isnan(metrics.registry.get_sample_value("gnp_model_wer_ratio"))


def test_publishing_a_speech_model_measures_its_batch1_latency():
    served = ServedModel((20,))
    served.publish(build_model("deepspeech2-hlstm-tiny", (20,), NUM_SYMBOLS), _version(1))
    info = served.info()
    assert info["variant"] == "recoverable" and info["parameters"] > 0
    assert info["latency_seconds_batch1"] is not None and info["latency_seconds_batch1"] > 0


def test_speech_predict_runs_off_the_event_loop_under_the_body_limit_and_is_counted():
    import threading

    from daemon.settings import ServeSettings

    served, metrics = ServedModel((20,)), Metrics()
    served.publish(build_model("deepspeech2-hlstm-tiny", (20,), NUM_SYMBOLS), _version(4))
    threads = []
    transcribe = served.transcribe

    def recording(audios, rate):
        threads.append(threading.current_thread().name)
        return transcribe(audios, rate)

    served.transcribe = recording
    app = create_app(served, metrics, serve=ServeSettings(max_body_bytes=20_000))
    with HttpServer(app, "127.0.0.1", 0) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ok = c.post("/v1/predict", json={"sample_rate": 8000,
                                         "instances": [{"audio": [0.01] * 800}]})
        big = c.post("/v1/predict", json={"sample_rate": 8000,
                                          "instances": [{"audio": [0.01] * 8000}]})
    assert ok.status_code == 200 and ok.json()["model_version"] == 4, ok.text
    assert big.status_code == 413 and "MAX_BODY_BYTES" in big.json()["detail"]
    assert threads and all(t.startswith("gnpd-predict") for t in threads)
    get = metrics.registry.get_sample_value
    assert get("gnp_predict_requests_total", {"status": "ok"}) == 1
    assert get("gnp_predict_requests_total", {"status": "error"}) == 1


def test_a_speech_request_before_the_first_model_is_a_503_not_a_classifier_400():
    # Before a publish the served model's kind was unknown, so a speech body took the
    # classifier path: 400 "instances must be lists of numbers". The configured model says.
    served = ServedModel((20,), model_name="deepspeech2-hlstm")
    srv = HttpServer(create_app(served, Metrics()), "127.0.0.1", 0)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            r = c.post("/v1/predict", json={"sample_rate": 8000, "instances": [{"audio": [0.0] * 800}]})
    finally:
        srv.stop()
    assert r.status_code == 503 and "no model" in r.json()["detail"], (r.status_code, r.text)
