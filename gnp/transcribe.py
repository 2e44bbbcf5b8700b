"""Transcribing raw audio with a trained speech model (what serving needs of gnp).

Audio -> per-utterance normalised MFCCs (gnp.audio) -> padded batch -> the model's
CTC outputs -> greedy decoding. The confidence of a transcript is the geometric mean
over the utterance's output frames of the probability of the best symbol: 1 when the
model is certain of every frame of its best path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from gnp.audio import FeatureConfig, mfcc
from gnp.sequences import pad_sequences
from gnp.transcripts import greedy_decode

__all__ = ["Transcript", "transcribe"]


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float  # 0..1


@torch.inference_mode()
def transcribe(model: nn.Module, audios: Sequence[torch.Tensor], sample_rate: int,
               cfg: FeatureConfig = FeatureConfig()) -> list[Transcript]:
    """Greedy transcripts of mono float audios (each (N,), in [-1, 1]) at `sample_rate`.

    Raises:
        ValueError: no audio, a sample rate other than the features', or empty /
            non-finite audio (from gnp.audio.mfcc).
    """
    if not audios:
        raise ValueError("transcribe needs at least one audio")
    feats = [mfcc(torch.as_tensor(a, dtype=torch.float32), sample_rate, cfg) for a in audios]
    x, lengths = pad_sequences(feats)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        log_probs, out_lengths = model(x.to(device), lengths.to(device))
    finally:
        model.train(was_training)
    texts = greedy_decode(log_probs, out_lengths)
    best = log_probs.max(-1).values  # (B, T)
    frames = torch.arange(best.shape[1], device=best.device) < out_lengths.unsqueeze(1)
    mean_log = (best * frames).sum(1) / out_lengths.clamp(min=1)
    return [Transcript(t, float(c)) for t, c in zip(texts, mean_log.exp().cpu())]
