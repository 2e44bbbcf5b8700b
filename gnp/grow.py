"""Gradient-based connection growth (Dai, Yin and Jha).

Score: the mean gradient of each weight over one epoch with updates paused
(Trainer.mean_gradients). Select: in each layer, the dormant connections whose
|mean gradient| is at or above the alpha-th percentile. Apply: activate them
and start each at learning rate x gradient, in the descent direction.

The percentile population. The threshold is the alpha-th percentile of
|mean gradient| over *all* connections of the layer, active and dormant, and
only dormant connections at or above it are activated. We take the whole
layer, as the paper's algorithm does with the layer's full gradient matrix,
because (a) it is the layer's own scale of "a useful gradient", independent of
how sparse the layer is right now, and (b) growth then tapers by itself as a
layer densifies (active connections take up their share of the top
percentiles), where a percentile over the dormant set alone would activate a
fixed 1 - alpha/100 of whatever is dormant at every growth step and make the
layer dense after a few steps. Percentiles are per layer because gradient
scales differ by orders of magnitude between layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gnp.masks import Masks

__all__ = ["GrowthStep", "select_growth", "grow_by_gradient"]


@dataclass(frozen=True)
class GrowthStep:
    """One growth step: connections activated and the model's density around it."""

    phase: str
    grown: int
    density_before: float
    density_after: float
    lr: float  # the learning rate the new weights were initialised with


def select_growth(grad: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dormant connections with |grad| at or above the alpha-th percentile of the layer's |grad|.

    Args:
        grad: mean gradient of the layer's weight (any shape).
        mask: current bool mask of the same shape.
        alpha: percentile in [0, 100].
    Returns:
        bool tensor of the connections to activate (all dormant).
    """
    if not 0.0 <= alpha <= 100.0:
        raise ValueError(f"alpha must be a percentile in [0, 100], got {alpha}")
    if grad.shape != mask.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != mask shape {tuple(mask.shape)}")
    score = grad.detach().abs().flatten().float()
    # kthvalue, not torch.quantile: quantile refuses tensors over 16M elements.
    k = min(score.numel(), max(1, int(round(alpha / 100.0 * score.numel()))))
    threshold = score.kthvalue(k).values if alpha > 0 else score.new_tensor(0.0)
    return (grad.detach().abs() >= threshold) & ~mask & (grad != 0)


@torch.no_grad()
def grow_by_gradient(masks: Masks, grads: dict[str, torch.Tensor], alpha: float,
                     lr: float, phase: str = "") -> GrowthStep:
    """Activate the selected dormant connections of every layer.

    New weights start at -lr * gradient, lr being the current learning rate: magnitude
    learning rate x gradient, in the direction one descent step from zero takes them.
    """
    before, grown = masks.density(), 0
    for layer in masks:
        add = select_growth(grads[layer.name], layer.mask, alpha)
        layer.weight[add] = -lr * grads[layer.name][add]
        layer.mask.logical_or_(add)  # in place: the buffer keeps its identity
        grown += int(add.sum())
    return GrowthStep(phase, grown, before, masks.density(), lr)
