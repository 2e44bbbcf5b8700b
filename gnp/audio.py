"""Audio input: 16-bit PCM WAV reading (standard library) and MFCC features (torchaudio).

torchaudio's own loader needs TorchCodec, which is not installed here, so WAVs are read
with `wave`; only `torchaudio.transforms` (pure tensor code) is used. Features are
MFCCs over 25 ms windows every 10 ms, normalised per utterance (each coefficient to zero
mean and unit variance over the utterance's frames), which removes the channel and
loudness differences between speakers and recordings.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["FeatureConfig", "read_wav", "pcm16_to_float", "mfcc", "normalise_utterance"]


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 8000
    n_mfcc: int = 20
    n_mels: int = 40
    window_ms: float = 25.0
    hop_ms: float = 10.0

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.window_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()  # next power of two

    @property
    def min_samples(self) -> int:
        """The shortest audio the features take: the centred window reflects n_fft / 2
        samples at each end, which needs more than that many."""
        return self.n_fft // 2 + 1


def pcm16_to_float(raw: bytes) -> torch.Tensor:
    """Little-endian signed 16-bit PCM bytes -> float32 samples in [-1, 1)."""
    if len(raw) % 2:
        raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(raw)}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0)


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """(samples float32 (N,), sample rate) of a mono 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: need mono 16-bit PCM, got {w.getnchannels()} channels "
                             f"of {8 * w.getsampwidth()} bits")
        return pcm16_to_float(w.readframes(w.getnframes())), w.getframerate()


@lru_cache(maxsize=4)
def _transform(cfg: FeatureConfig):
    import torchaudio  # only speech needs it

    return torchaudio.transforms.MFCC(
        sample_rate=cfg.sample_rate, n_mfcc=cfg.n_mfcc,
        melkwargs={"n_fft": cfg.n_fft, "win_length": cfg.win_length, "hop_length": cfg.hop_length,
                   "n_mels": cfg.n_mels, "center": True})


def normalise_utterance(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each feature (column) of (T, F) to zero mean and unit variance over the T frames."""
    mean = feats.mean(0, keepdim=True)
    std = feats.std(0, unbiased=False, keepdim=True)
    return (feats - mean) / (std + eps)


@torch.no_grad()
def mfcc(samples: torch.Tensor, sample_rate: int, cfg: FeatureConfig = FeatureConfig()) -> torch.Tensor:
    """Per-utterance normalised MFCCs (T, n_mfcc) of mono float samples (N,).

    Raises:
        ValueError: sample rate other than `cfg.sample_rate`, audio shorter than
            `cfg.min_samples`, or non-finite audio.
    """
    if sample_rate != cfg.sample_rate:
        raise ValueError(f"sample rate {sample_rate} Hz, expected {cfg.sample_rate} Hz")
    if samples.ndim != 1 or samples.numel() < cfg.min_samples:
        raise ValueError(f"need mono samples (N,) with N >= {cfg.min_samples}, got shape "
                         f"{tuple(samples.shape)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("audio has non-finite samples")
    feats = _transform(cfg)(samples.float()).transpose(0, 1)  # (T, n_mfcc)
    return normalise_utterance(feats)
