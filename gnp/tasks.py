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

__all__ = ["Task", "Classification", "CLASSIFICATION"]


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
