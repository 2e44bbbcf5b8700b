"""Iterative magnitude pruning, recoverable and non-recoverable.

Select (pure): in each layer, the `beta` percent smallest-magnitude active
weights. Under the recoverable constraint, a connection that is the last
active input of a neuron (a row of the weight: an output unit of the layer) or
the last active output of a hidden neuron (a column of a layer after the
first: a unit of the previous layer; for convolutions, a channel) is kept.
Layers are taken in module order, which is the data-flow order for the
sequential models here; for models with skip connections the constraint is
per layer pair and therefore approximate.

Iterate (the paper's rule): prune a step, then retrain until the validation
metric has recovered to the pre-pruning model's, and go on; a step that cannot
recover within the retraining budget is rolled back, and pruning retries it
with half the step before it stops.

"Recovered" is a paired comparison on the validation samples, so that it is
not decided by noise: with d_i the difference of per-sample scores between
the pruned model and the pre-pruning reference (for accuracy: +1 where only
the pruned model is right, -1 where only the reference is), the pruned model
has recovered when sum(d) >= -z * sqrt(sum(d^2)): its deficit is within z
standard deviations of what two equally good models disagreeing on the same
samples would show (McNemar's statistic for accuracy). Every step is compared
with the same fixed reference, so allowances do not compound; z = 0 is the
plain "no lower than before" rule, which stops a converged model at the first
unlucky draw. A continuity correction of one sample keeps "-2 among 10
disagreements" from counting as a loss.

Held-out verdict. Deciding a hundred times "recovered or not" on the same
validation samples overfits those decisions to them: the pruned model keeps
passing while its accuracy on samples the decisions never saw falls (measured:
docs/results/pruning-rule). So the recovery checks see only part of the
validation set; the rest is held out. Snapshots of the model are kept along
the way (each time the active weights fall by another 10%), and the model
served is the sparsest snapshot that passes the same paired check against the
pre-pruning model on the held-out samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from gnp.data import Samples
from gnp.masks import Masks
from gnp.train import Trainer

__all__ = ["PruneConfig", "PruneReport", "select_prune", "keep_connected", "prune_step",
           "iterative_prune", "recovered", "PruneStep"]


@dataclass(frozen=True)
class PruneConfig:
    beta: float = 5.0  # percent of each layer's active weights removed per iteration
    recoverable: bool = True
    tolerance: float = 0.0  # metric (0..1) the pruned model may lose vs the reference
    noise_z: float = 0.5  # paired-noise allowance, in standard deviations (see above)
    correction: float = 1.0  # continuity correction, in units of score (one sample)
    retrain_epochs: float = 4.0  # most retraining per iteration, in epochs of the data
    retrain_slice: float = 0.5  # retrain in slices of this fraction of an epoch
    retrain_lr_factor: float = 0.1  # retraining lr = this x the base training lr
    max_halvings: int = 1  # a failed step is retried with half the step this many times
    max_iterations: int = 300
    holdout: float = 0.5  # share of the validation set kept for the final verdict (0: none)
    snapshot_ratio: float = 0.9  # keep a snapshot each time active weights fall below this x


@dataclass(frozen=True)
class PruneReport:
    iterations: int  # pruning steps in the served model (after the held-out verdict)
    reference_accuracy: float  # the metric before pruning (validation)
    final_accuracy: float
    active_before: int
    active_after: int
    stopped_by: str  # "accuracy", "no_progress" or "max_iterations"
    retrain_passes: int = 0  # training sample passes spent retraining
    iterations_tried: int = 0  # pruning steps kept by the recovery checks (before the verdict)


@dataclass(frozen=True)
class PruneStep:
    """One pruning iteration, for progress and diagnostics."""

    iteration: int
    beta: float
    active: int  # active weights after the step (before a rollback)
    slices: int  # retraining slices it took
    kept: bool  # recovered (kept) or rolled back
    metric: float  # validation metric after retraining


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


def recovered(ref: torch.Tensor, new: torch.Tensor, weights: torch.Tensor,
              tolerance: float = 0.0, z: float = 1.0, correction: float = 1.0) -> bool:
    """Paired check that per-sample scores `new` are not worse than `ref` beyond noise.

    The metric is sum(scores) / sum(weights); `tolerance` is a metric loss allowed
    on top of the noise allowance of `z` standard deviations; `correction` (one unit
    of score: one sample's correctness) is the continuity correction that keeps a
    difference of a sample or two among a handful of disagreements from counting as
    a loss.
    """
    d = (new - ref).double()
    allowance = tolerance * float(weights.sum()) + z * math.sqrt(float((d * d).sum())) + correction
    return float(d.sum()) >= -allowance


class _Checks:
    """The paired check against the reference, on the checking or the held-out samples."""

    def __init__(self, ref: torch.Tensor, weights: torch.Tensor, cfg: PruneConfig) -> None:
        n = len(ref)
        self.hold = torch.zeros(n, dtype=torch.bool, device=ref.device)
        if cfg.holdout > 0 and n > 1:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            self.hold[order[: max(1, int(round(cfg.holdout * n)))].to(ref.device)] = True
        self.ref, self.weights, self.cfg = ref, weights, cfg

    def _passes(self, new: torch.Tensor, part: torch.Tensor) -> bool:
        c = self.cfg
        return recovered(self.ref[part], new[part], self.weights[part], c.tolerance, c.noise_z,
                         c.correction)

    def recovered(self, new: torch.Tensor) -> bool:
        return self._passes(new, ~self.hold)

    def held_out(self, new: torch.Tensor) -> bool:
        return self._passes(new, self.hold) if bool(self.hold.any()) else True


def _retrain_until_recovered(t: Trainer, train: Samples, val: Samples, checks: _Checks,
                             cfg: PruneConfig, lr: float) -> tuple[bool, int, float]:
    """Retrain in slices until the paired check passes or the budget is spent; returns
    (recovered, slices taken, validation metric)."""
    budget = int(round(cfg.retrain_epochs / cfg.retrain_slice))
    s, w = t.scores(val)
    for taken in range(budget + 1):
        if checks.recovered(s):
            return True, taken, float(s.sum() / w.sum())
        if taken == budget:
            break
        t.train_epoch(train, fraction=cfg.retrain_slice, lr=lr)
        s, w = t.scores(val)
    return False, budget, float(s.sum() / w.sum())


@dataclass(frozen=True)
class _Snapshot:
    iteration: int
    active: int
    state: dict[str, torch.Tensor]  # model state on the CPU


def _snapshot(t: Trainer, iteration: int) -> _Snapshot:
    state = {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}
    return _Snapshot(iteration, t.masks.count().active, state)


def _verdict(t: Trainer, val: Samples, trail: list[_Snapshot], checks: _Checks) -> _Snapshot:
    """Load and return the sparsest snapshot that passes on the held-out samples (the
    reference, first in the trail, always does)."""
    for snap in reversed(trail):
        t.model.load_state_dict(snap.state)
        if snap.iteration == 0 or checks.held_out(t.scores(val)[0]):
            return snap
    raise AssertionError("unreachable: the reference passes against itself")


def iterative_prune(t: Trainer, train: Samples, val: Samples, cfg: PruneConfig,
                    base_lr: float, on_step: Callable[[PruneStep], None] | None = None,
                    step: Callable[[float], int] | None = None) -> PruneReport:
    """Prune `beta` percent per iteration with retraining, until a step cannot recover; then
    serve the sparsest snapshot that passes on the held-out validation samples.

    The reference is the model as it is now; retraining runs at the constant rate
    `cfg.retrain_lr_factor` x `base_lr` (the training config's lr: the same rate for
    every method, whatever the peak of its update's schedule).
    `step(beta)` prunes once and returns the number of weights removed (default: the
    connection `prune_step`; `gnp.units.unit_prune_step` prunes whole units instead).
    """
    masks = t.masks
    ref, weights = t.scores(val)
    checks = _Checks(ref, weights, cfg)
    reference = float(ref.sum() / weights.sum())
    before, passes0 = masks.count().active, t.meter.sample_passes
    beta, halvings, kept, stopped = cfg.beta, 0, 0, "max_iterations"
    lr = cfg.retrain_lr_factor * base_lr
    trail = [_snapshot(t, 0)]
    for i in range(1, cfg.max_iterations + 1):
        snap = t.snapshot()
        removed = step(beta) if step is not None else prune_step(masks, beta, cfg.recoverable)
        if removed == 0:
            stopped = "no_progress"
            break
        masks.mask_state(t.opt)
        ok, slices, metric = _retrain_until_recovered(t, train, val, checks, cfg, lr)
        if on_step is not None:
            on_step(PruneStep(i, beta, masks.count().active, slices, ok, metric))
        if ok:
            kept += 1
            if masks.count().active <= cfg.snapshot_ratio * trail[-1].active:
                trail.append(_snapshot(t, kept))
            continue
        t.restore(snap)  # roll back the step that broke it
        if halvings >= cfg.max_halvings:
            stopped = "accuracy"
            break
        beta, halvings = beta / 2, halvings + 1
    if trail[-1].iteration != kept:
        trail.append(_snapshot(t, kept))
    served = _verdict(t, val, trail, checks)
    masks.mask_state(t.opt)  # the momentum of weights the verdict made dormant again
    return PruneReport(served.iteration, reference, t.evaluate(val), before, masks.count().active,
                       stopped, t.meter.sample_passes - passes0, kept)
