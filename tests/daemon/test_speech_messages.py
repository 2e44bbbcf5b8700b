"""Speech sample messages: both audio forms, and every dead-letter reason of bad audio."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from daemon.messages import Rejection
from daemon.speech_messages import SpeechSample, encode_pcm16, parse_speech_message

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "speech-sample.schema.json"
RATE = 8000
WAVE = np.tile(np.array([0.0, 0.25, -0.5, 0.125], dtype=np.float32), 40)  # 160 samples, 20 ms


def _msg(**fields) -> bytes:
    base = {"sample_rate": RATE, "transcript": "three", "audio": WAVE.tolist()}
    base.update(fields)
    for k in [k for k, v in fields.items() if v is _DROP]:
        del base[k]
    return json.dumps(base).encode()


_DROP = object()


def _parse(raw, **kw):
    return parse_speech_message(raw, 0, 7, RATE, **kw)


def test_json_list_form():
    s = _parse(_msg(id="fsdd/3_x_1", transcript="  Three "))
    assert isinstance(s, SpeechSample)
    assert s.audio.dtype == np.float32 and s.audio.tolist() == WAVE.tolist()
    assert s.transcript == "three" and s.id == "fsdd/3_x_1" and s.offset == 7


def test_base64_pcm16_form_matches_the_list_form():
    s = _parse(_msg(audio=_DROP, audio_pcm16=encode_pcm16(WAVE)))
    assert isinstance(s, SpeechSample)
    np.testing.assert_array_equal(s.audio, WAVE)


def test_audio_shorter_than_one_analysis_window_is_rejected_and_the_shortest_accepted_has_features():
    """Fewer than 129 samples (8 kHz) could not become MFCCs: stored, such a sample would
    make every update of its chunk fail."""
    import torch

    from gnp.audio import FeatureConfig, mfcc
    shortest = FeatureConfig(sample_rate=RATE).min_samples
    assert shortest == 129
    for short in (_msg(audio=WAVE[:shortest - 1].tolist()),
                  _msg(audio=_DROP, audio_pcm16=encode_pcm16(WAVE[:shortest - 1]))):
        r = _parse(short)
        assert isinstance(r, Rejection) and r.reason == "bad_audio", r
        assert "129" in r.detail
    s = _parse(_msg(audio=WAVE[:shortest].tolist()))
    assert isinstance(s, SpeechSample)
    feats = mfcc(torch.from_numpy(s.audio), RATE)
    assert feats.shape[1] == 20 and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="129"):
        mfcc(torch.from_numpy(s.audio[:-1]), RATE)


@pytest.mark.parametrize("raw, reason", [
    (_msg(sample_rate=16000), "bad_rate"),
    (_msg(sample_rate="8000"), "bad_type"),
    (_msg(audio=[]), "bad_audio"),
    (_msg(audio=[0.0] * (2 * RATE + 1)), "bad_audio"),  # over max_seconds=2
    (_msg(audio=[[0.1, 0.2], [0.3, 0.4]]), "bad_audio"),  # not mono
    (_msg(audio=[0.1, 1.5]), "bad_audio"),
    (_msg(audio=[0.1, 1e39]), "non_finite"),
    (b'{"sample_rate": 8000, "transcript": "one", "audio": [0.1, NaN]}', "non_finite"),
    (_msg(audio=[0.1, "0.2"]), "bad_type"),
    (_msg(audio=[0.1, True]), "bad_type"),
    (_msg(audio_pcm16="AAAB"), "bad_audio"),  # both forms
    (_msg(audio=_DROP, audio_pcm16="not base64!"), "bad_audio"),
    (_msg(audio=_DROP, audio_pcm16=base64.b64encode(b"\x01\x02\x03").decode()), "bad_audio"),
    (_msg(audio=_DROP, audio_pcm16=""), "bad_audio"),  # empty
    (_msg(audio=_DROP), "missing_field"),
    (_msg(transcript=_DROP), "missing_field"),
    (_msg(transcript="thr3e"), "bad_transcript"),
    (_msg(transcript="drei ü"), "bad_transcript"),
    (_msg(transcript="   "), "bad_transcript"),
    (_msg(transcript=3), "bad_type"),
    (b"[1, 2]", "not_object"),
    (b"{", "invalid_json"),
    (None, "invalid_json"),
])
def test_bad_speech_messages_are_rejected_with_a_reason(raw, reason):
    r = _parse(raw, max_seconds=2.0)
    assert isinstance(r, Rejection), r
    assert r.reason == reason, r.detail
    assert r.offset == 7 and r.detail


def test_too_large_before_parsing():
    r = _parse(_msg(audio=[0.0] * 1000), max_bytes=100)
    assert isinstance(r, Rejection) and r.reason == "too_large"


def test_schema_accepts_the_valid_forms_and_refuses_both_or_neither():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid(json.loads(_msg()))
    assert v.is_valid(json.loads(_msg(audio=_DROP, audio_pcm16=encode_pcm16(np.zeros(4)))))
    assert not v.is_valid(json.loads(_msg(audio_pcm16="AAAA")))
    assert not v.is_valid(json.loads(_msg(audio=_DROP)))
    assert not v.is_valid(json.loads(_msg(transcript="thr3e")))


def test_the_producer_streams_fsdd_recordings_as_valid_speech_messages(tmp_path):
    import wave

    from daemon.producer import dataset_messages

    for name in ("3_ann_0.wav", "3_ann_7.wav", "8_bob_12.wav"):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes((np.arange(800) % 50 * 100).astype("<i2").tobytes())
    train = list(dataset_messages("fsdd", "train", root=tmp_path))
    assert sorted(m["id"] for m in train) == ["fsdd/3_ann_7", "fsdd/8_bob_12"]
    assert [m["id"] for m in dataset_messages("fsdd", "test", root=tmp_path)] == ["fsdd/3_ann_0"]
    for m in train:
        s = _parse(json.dumps(m).encode())
        assert isinstance(s, SpeechSample) and len(s.audio) == 800
        assert s.transcript == {"fsdd/3_ann_7": "three", "fsdd/8_bob_12": "eight"}[m["id"]]
