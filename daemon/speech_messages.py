"""Wire format of a speech sample message and its validation.

A speech message is a UTF-8 JSON object (see ``schemas/speech-sample.schema.json``)
with mono PCM audio at a declared sample rate and its transcript, in one of two forms::

    {"id": "fsdd/3_jackson_12", "sample_rate": 8000, "transcript": "three",
     "audio": [0.0, 0.01, -0.02, ...]}                       # numbers in [-1, 1]
    {"sample_rate": 8000, "transcript": "three",
     "audio_pcm16": "AAABAP7/..."}                           # base64, 16-bit little-endian

:func:`parse_speech_message` turns one record into a :class:`SpeechSample` or a
:class:`daemon.messages.Rejection`; like :func:`daemon.messages.parse_message` it
never raises on bad input. Audio-specific reasons: ``bad_rate`` (sample rate other
than the model's), ``bad_audio`` (empty or shorter than one analysis window
(`gnp.audio.FeatureConfig.min_samples`: 129 samples, 16 ms at 8 kHz), too long, both
or neither audio form, not decodable base64 / odd byte count, samples outside
[-1, 1]), ``non_finite`` (NaN or
infinite samples) and ``bad_transcript`` (empty, or characters outside the model's
alphabet: letters and space).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.messages import _DETAIL_MAX, Rejection, _json_type, _load_object, _Reject, _check_id, \
    _check_timestamp, numeric_array, may_hold_bools

__all__ = ["SPEECH_REJECT_REASONS", "SpeechSample", "parse_speech_message", "encode_pcm16"]

SPEECH_REJECT_REASONS = ("bad_rate", "bad_audio", "bad_transcript")


@dataclass(frozen=True, eq=False)
class SpeechSample:
    """One valid speech sample: float32 mono audio in [-1, 1] and its normalised transcript."""

    audio: np.ndarray
    sample_rate: int
    transcript: str
    partition: int
    offset: int
    id: str | None = None
    timestamp: int | float | None = None


def encode_pcm16(audio: np.ndarray) -> str:
    """Float audio in [-1, 1] as base64 of 16-bit little-endian PCM (the compact form)."""
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767)
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")


def parse_speech_message(raw: bytes | None, partition: int, offset: int, sample_rate: int,
                         max_seconds: float = 10.0,
                         max_bytes: int = 1_000_000) -> SpeechSample | Rejection:
    """Validate one speech message; return a :class:`SpeechSample` or a Rejection."""
    data = b"" if raw is None else bytes(raw)
    try:
        return _parse(data, partition, offset, sample_rate, max_seconds, max_bytes)
    except _Reject as rej:
        return Rejection(rej.reason, rej.detail, partition, offset, data)
    except Exception as exc:  # noqa: BLE001 - a poison message must never escape
        return Rejection("bad_type", f"unexpected {type(exc).__name__}: {exc}"[:_DETAIL_MAX],
                         partition, offset, data)


def _parse(raw: bytes, partition: int, offset: int, rate: int, max_seconds: float,
           max_bytes: int) -> SpeechSample:
    obj = _load_object(raw, max_bytes)
    missing = [k for k in ("sample_rate", "transcript") if k not in obj]
    if not ("audio" in obj or "audio_pcm16" in obj):
        missing.append("audio or audio_pcm16")
    if missing:
        raise _Reject("missing_field", f"missing required field(s): {', '.join(missing)}")
    declared = obj["sample_rate"]
    if type(declared) is not int:
        raise _Reject("bad_type", f"sample_rate must be an integer, got {_json_type(declared)}")
    if declared != rate:
        raise _Reject("bad_rate", f"sample_rate {declared} Hz, the model takes {rate} Hz")
    transcript = _check_transcript(obj["transcript"])
    audio = _check_audio(obj, raw, rate, max_seconds)
    return SpeechSample(audio, rate, transcript, partition, offset, _check_id(obj.get("id")),
                        _check_timestamp(obj.get("timestamp")))


def _check_transcript(value: Any) -> str:
    from gnp.transcripts import normalise, valid_transcript

    if not isinstance(value, str):
        raise _Reject("bad_type", f"transcript must be a string, got {_json_type(value)}")
    reason = valid_transcript(value)
    if reason is not None:
        raise _Reject("bad_transcript", reason)
    return normalise(value)


def _check_audio(obj: dict, raw: bytes, rate: int, max_seconds: float) -> np.ndarray:
    if "audio" in obj and "audio_pcm16" in obj:
        raise _Reject("bad_audio", "give audio or audio_pcm16, not both")
    if "audio" in obj:
        try:
            arr = numeric_array(obj["audio"], may_hold_bools(raw))
        except _Reject as e:
            raise _Reject(e.reason, f"audio {e.detail}") from None
        if arr.ndim != 1:
            raise _Reject("bad_audio", f"audio must be a flat (mono) array, got shape {list(arr.shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            audio = arr.astype(np.float32)
        if not np.isfinite(audio).all():
            bad = int(np.flatnonzero(~np.isfinite(audio))[0])
            raise _Reject("non_finite", f"audio sample {bad} is {arr[bad]}")
        if audio.size and float(np.abs(audio).max()) > 1.0:
            raise _Reject("bad_audio", f"audio samples must lie in [-1, 1], got peak "
                                       f"{float(np.abs(audio).max()):.4g}")
    else:
        text = obj["audio_pcm16"]
        if not isinstance(text, str):
            raise _Reject("bad_type", f"audio_pcm16 must be a base64 string, got {_json_type(text)}")
        try:
            pcm = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Reject("bad_audio", f"audio_pcm16 is not base64: {exc}") from None
        if len(pcm) % 2:
            raise _Reject("bad_audio", f"audio_pcm16 holds {len(pcm)} bytes, not whole 16-bit samples")
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if audio.size == 0:
        raise _Reject("bad_audio", "audio is empty")
    from gnp.audio import FeatureConfig

    shortest = FeatureConfig(sample_rate=rate).min_samples
    if audio.size < shortest:  # the features could not be computed: every update would fail
        raise _Reject("bad_audio", f"audio has {audio.size} samples, fewer than the {shortest} "
                                   f"({1000 * shortest / rate:.0f} ms) one analysis window needs")
    if audio.size > max_seconds * rate:
        raise _Reject("bad_audio", f"audio lasts {audio.size / rate:.2f} s > {max_seconds} s")
    return audio
