"""The task seam: what a model is trained to do and how it is scored.

The trainer, growth and pruning never branch on the kind of model: they ask the
task for a batch's loss and for per-sample scores. A task's metric is
``sum(scores) / sum(weights)`` over a data set, in [0, 1], higher is better:
accuracy for classification (score = 1 if correct, weight 1); for a sequence
task such as CTC, 1 - WER (score = words right, weight = words in the reference).
Per-sample scores let pruning compare two models on the same samples (a paired
comparison) instead of two noisy totals.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gnp.augment import AffineConfig, affine_distort

__all__ = ["Task", "Classification", "CLASSIFICATION", "CTC", "CTC_TASK"]


class Task(Protocol):
    name: str

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of `model` on one batch (the forward pass included)."""

    def scores(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (score, weight) of one batch, on the batch's device (eval mode)."""

    def augment(self, batch: Any, gen: torch.Generator | None) -> Any:
        """A randomly distorted copy of a training batch (or the batch itself)."""


class Classification:
    """Cross-entropy over logits (B, classes); metric: accuracy."""

    name = "classification"

    def __init__(self, distortion: AffineConfig | None = AffineConfig()) -> None:
        self.distortion = distortion

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def scores(self, model: nn.Module,
               batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        correct = (model(x).argmax(1) == y).float()
        return correct, torch.ones_like(correct)

    def augment(self, batch: tuple[torch.Tensor, torch.Tensor],
                gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.distortion is None:
            return batch
        x, y = batch
        return affine_distort(x, self.distortion, gen), y


CLASSIFICATION = Classification()


class CTC:
    """CTC loss over per-frame symbol log-probabilities; metric: 1 - WER (greedy decoding).

    The model is called as ``model(x, lengths) -> (log_probs (B, T, symbols), lengths)``
    on a `gnp.sequences.SpeechBatch`. A sample's score is its reference's word count minus
    its word errors (substitutions + deletions + insertions), its weight the reference's
    word count, so sum(scores) / sum(weights) is exactly 1 - WER (a score can be negative
    when a hypothesis inserts words).
    """

    name = "ctc"

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        log_probs, lengths = model(batch.x, batch.lengths)
        return F.ctc_loss(log_probs.transpose(0, 1), batch.targets, lengths, batch.target_lengths,
                          blank=0, reduction="mean", zero_infinity=True)

    def transcribe(self, model: nn.Module, batch: Any) -> list[str]:
        """Greedy-decoded transcripts of a batch."""
        from gnp.transcripts import greedy_decode
        log_probs, lengths = model(batch.x, batch.lengths)
        return greedy_decode(log_probs, lengths)

    def scores(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from gnp.transcripts import decode, word_errors
        hyps = self.transcribe(model, batch)
        refs = [decode(t[:n]) for t, n in zip(batch.targets.tolist(), batch.target_lengths.tolist())]
        words = torch.tensor([len(r.split()) for r in refs], dtype=torch.float32)
        errors = torch.tensor([word_errors(r, h) for r, h in zip(refs, hyps)], dtype=torch.float32)
        device = batch.x.device
        return (words - errors).to(device), words.to(device)

    def augment(self, batch: Any, gen: torch.Generator | None) -> Any:
        return batch


CTC_TASK = CTC()
