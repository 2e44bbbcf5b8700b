"""Iterative magnitude pruning, recoverable and non-recoverable.

Select (pure): in each layer, the `beta` percent smallest-magnitude active
weights. Under the recoverable constraint, a connection that is the last
active input of a neuron (a row of the weight: an output unit of the layer) or
the last active output of a hidden neuron (a column of a layer after the
first: a unit of the previous layer; for convolutions, a channel) is kept.
Layers are taken in module order, which is the data-flow order for the
sequential models here; for models with skip connections the constraint is
per layer pair and therefore approximate.

Iterate: prune a step, and if validation accuracy fell below the reference,
retrain in short slices until it recovers; a step that cannot recover within
the retraining budget is rolled back and pruning stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gnp.data import Data
from gnp.masks import Masks
from gnp.train import Trainer

__all__ = ["PruneConfig", "PruneReport", "select_prune", "keep_connected", "prune_step",
           "iterative_prune"]


@dataclass(frozen=True)
class PruneConfig:
    beta: float = 5.0  # percent of each layer's active weights removed per iteration
    recoverable: bool = True
    tolerance: float = 0.0  # accuracy (0..1) the pruned model may lose vs the reference
    retrain_epochs: float = 2.0  # retraining budget per iteration, in epochs of the data
    retrain_slice: float = 0.25  # retrain in slices of this fraction of an epoch
    retrain_lr_factor: float = 0.1  # retraining lr = this x the training lr
    max_iterations: int = 200


@dataclass(frozen=True)
class PruneReport:
    iterations: int
    reference_accuracy: float
    final_accuracy: float
    active_before: int
    active_after: int
    stopped_by: str  # "accuracy", "no_progress" or "max_iterations"


def select_prune(weight: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """The new mask after removing the `beta` percent smallest |weight| among active ones."""
    if not 0.0 < beta < 100.0:
        raise ValueError(f"beta must be a percent in (0, 100), got {beta}")
    active = int(mask.sum())
    n_remove = int(active * beta / 100.0)
    if n_remove == 0:
        return mask.clone()
    score = weight.detach().abs().masked_fill(~mask, float("inf")).flatten()
    drop = torch.topk(score, n_remove, largest=False).indices
    new = mask.clone().flatten()
    new[drop] = False
    return new.view_as(mask)


def _restore_last(old: torch.Tensor, new: torch.Tensor, weight: torch.Tensor,
                  dim: int) -> torch.Tensor:
    """Where a unit along `dim` had active connections in `old` and has none in `new`,
    restore its largest-magnitude connection. `dim` 0 = rows (inputs of output units),
    1 = columns (outputs of input units)."""
    o, n, w = (t.transpose(0, 1).flatten(1) if dim == 1 else t.flatten(1)
               for t in (old, new, weight.detach().abs()))
    dead = o.any(1) & ~n.any(1)
    if dead.any():
        best = w.masked_fill(~o, -1.0).argmax(1)
        rows = dead.nonzero().squeeze(1)
        n = n.clone()
        n[rows, best[rows]] = True
        shape = (new.transpose(0, 1).shape if dim == 1 else new.shape)
        n = n.view(shape)
        return n.transpose(0, 1) if dim == 1 else n
    return new


def keep_connected(old: torch.Tensor, new: torch.Tensor, weight: torch.Tensor,
                   first_layer: bool) -> torch.Tensor:
    """Enforce the recoverable constraint on a proposed mask (only ever re-adds connections)."""
    new = _restore_last(old, new, weight, dim=0)
    if not first_layer:
        new = _restore_last(old, new, weight, dim=1)
    return new


@torch.no_grad()
def prune_step(masks: Masks, beta: float, recoverable: bool) -> int:
    """Prune every layer once; returns the number of connections removed."""
    removed = 0
    proposals = {}
    for i, layer in enumerate(masks):
        new = select_prune(layer.weight, layer.mask, beta)
        if recoverable:
            new = keep_connected(layer.mask, new, layer.weight, first_layer=(i == 0))
        removed += int(layer.mask.sum() - new.sum())
        proposals[layer.name] = new
    masks.set(proposals)
    return removed


def _recover(trainer: Trainer, train: Data, val: Data, target: float, cfg: PruneConfig,
             lr: float) -> float:
    """Retrain in slices until validation accuracy reaches `target` or the budget is spent."""
    acc = trainer.evaluate(val)
    slices = int(round(cfg.retrain_epochs / cfg.retrain_slice))
    opt = trainer.optimizer(lr * cfg.retrain_lr_factor) if slices else None
    for _ in range(slices):
        if acc >= target:
            break
        trainer.train_epoch(train, opt, fraction=cfg.retrain_slice)
        acc = trainer.evaluate(val)
    return acc


def iterative_prune(trainer: Trainer, train: Data, val: Data, cfg: PruneConfig,
                    lr: float, reference: float | None = None) -> PruneReport:
    """Prune `beta` percent per iteration with retraining, until accuracy cannot recover."""
    masks = trainer.masks
    reference = trainer.evaluate(val) if reference is None else reference
    target = reference - cfg.tolerance
    before, acc, stopped, it = masks.count().active, reference, "max_iterations", 0
    for it in range(1, cfg.max_iterations + 1):
        state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if prune_step(masks, cfg.beta, cfg.recoverable) == 0:
            stopped, it = "no_progress", it - 1
            break
        new_acc = _recover(trainer, train, val, target, cfg, lr)
        if new_acc < target:
            trainer.model.load_state_dict(state)  # roll back the step that broke it
            stopped, it = "accuracy", it - 1
            break
        acc = new_acc
    return PruneReport(it, reference, acc, before, masks.count().active, stopped)
