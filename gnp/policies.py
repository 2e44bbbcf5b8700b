"""Update policies: how a model learns from a new chunk. All share one pruning policy.

- ours: grow and train on the new chunk first (E_new epochs), then on all stored
  data (E_all epochs), then recoverable pruning. The first chunk trains the
  initial model with NeST (grow-and-prune from a sparse seed).
- tfs:  train a dense model from scratch on all data, then prune.
- nft:  keep a dense model across chunks, fine-tune it on all data, prune a copy.
- nest: grow-and-prune from a sparse seed on all data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from gnp.cost import Cost, CostMeter
from gnp.data import Data
from gnp.grow import grow_by_gradient
from gnp.masks import Masks, ParamCount, count_parameters
from gnp.prune import PruneConfig, PruneReport, iterative_prune
from gnp.train import Progress, TrainConfig, Trainer, resolve_device

__all__ = ["Schedule", "UpdateResult", "METHODS", "update", "sparse_seed"]


@dataclass(frozen=True)
class Schedule:
    """Epoch counts and hyper-parameters of an update. Defaults are the paper's schedule."""

    new_epochs: int = 15  # ours: growth phase on the new chunk
    all_epochs: int = 20  # ours: growth phase on all data
    baseline_epochs: int = 60  # tfs / nft / nest (and ours' first chunk) training
    grow_every: int = 5  # a growth epoch every this many epochs of a growth phase
    alpha: float = 50.0  # growth percentile (paper: 30..50)
    seed_density: float = 0.1  # NeST's sparse seed: share of connections active at start
    incremental_lr: float | None = None  # ours after the first chunk (None: train.lr)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    nonrecoverable: PruneConfig | None = None  # set to also export an ultra-compact model

    @classmethod
    def quick(cls) -> "Schedule":
        """A reduced schedule that runs the whole protocol in minutes on a 2-core CPU."""
        return cls(new_epochs=3, all_epochs=4, baseline_epochs=12, grow_every=3,
                   prune=PruneConfig(beta=5.0, retrain_epochs=1.0, max_iterations=60))

    def with_nonrecoverable(self, tolerance: float = 0.005) -> "Schedule":
        return replace(self, nonrecoverable=replace(
            self.prune, recoverable=False, tolerance=tolerance))


@dataclass(frozen=True)
class UpdateResult:
    model: nn.Module  # the model to evaluate and serve (pruned, recoverable), on CPU
    carry: nn.Module | None  # what the next update starts from (nft: the dense model)
    val_accuracy: float
    params: ParamCount
    cost: Cost
    prune: PruneReport
    compact: nn.Module | None = None  # non-recoverable export, when asked for
    compact_params: ParamCount | None = None


@torch.no_grad()
def sparse_seed(masks: Masks, density: float, gen: torch.Generator) -> None:
    """Random sparse connectivity where every neuron keeps an input and an output.

    Surviving weights are scaled up by 1/sqrt(density) so the seed starts with
    the signal scale of a dense Kaiming-style init instead of ~sqrt(density) of it.
    """
    for i, layer in enumerate(masks):
        rand = torch.rand(layer.mask.shape, generator=gen, device="cpu").to(layer.mask.device)
        seed = rand < density
        rows = layer.mask.flatten(1).shape[0]
        seed.flatten(1)[torch.arange(rows), rand.flatten(1).argmax(1)] = True
        if i > 0:
            cols = seed.transpose(0, 1).flatten(1)
            r = rand.transpose(0, 1).flatten(1)
            cols[torch.arange(cols.shape[0]), r.argmax(1)] = True
            seed = cols.view(seed.transpose(0, 1).shape).transpose(0, 1)
        layer.mask.copy_(seed)
        # Keep activations at the dense init's scale: fan-in shrank to about `density`.
        layer.weight.mul_(1.0 / math.sqrt(max(float(seed.float().mean()), 1e-6)))
    masks.apply()


def _grow_and_train(t: Trainer, data: Data, epochs: int, s: Schedule, phase: str,
                    progress: Progress | None) -> None:
    """A growth phase: every `grow_every`-th epoch (the first included) is a growth epoch."""
    t.meter.phase = phase
    steps = math.ceil(len(data) / t.batch_size(len(data))) * epochs
    opt = t.optimizer()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=t.cfg.lr * 0.01)
    for epoch in range(epochs):
        if s.grow_every and epoch % s.grow_every == 0:
            grow_by_gradient(t.masks, t.mean_gradients(data), s.alpha, t.cfg.lr)
        else:
            t.train_epoch(data, opt, sched)
        if progress:
            progress(phase, epoch + 1, epochs)


def _train_dense(t: Trainer, data: Data, epochs: int, s: Schedule, phase: str,
                 progress: Progress | None) -> None:
    _grow_and_train(t, data, epochs, replace(s, grow_every=0), phase, progress)


def _prune(t: Trainer, data: Data, val: Data, cfg: PruneConfig, lr: float, phase: str,
           progress: Progress | None) -> PruneReport:
    t.meter.phase = phase
    if progress:
        progress(phase, 0, 1)
    report = iterative_prune(t, data, val, cfg, lr)
    if progress:
        progress(phase, 1, 1)
    return report


def _ours(t, new, all, val, s, first, progress):
    if first:
        return _nest(t, new, all, val, s, first, progress)
    if s.incremental_lr is not None:  # updating a trained model, not training one
        t.cfg = replace(t.cfg, lr=s.incremental_lr)
    _grow_and_train(t, new, s.new_epochs, s, "grow-new", progress)
    _grow_and_train(t, all, s.all_epochs, s, "grow-all", progress)
    return None


def _nest(t, new, all, val, s, first, progress):
    # Draw the seed's generator from the global stream (already past the weight init): a
    # generator seeded with the same number as the init would select by the init's own draws.
    gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    sparse_seed(t.masks, s.seed_density, gen)
    _grow_and_train(t, all, s.baseline_epochs, s, "grow-all", progress)
    return None


def _tfs(t, new, all, val, s, first, progress):
    _train_dense(t, all, s.baseline_epochs, s, "train-all", progress)
    return None


def _nft(t, new, all, val, s, first, progress):
    _train_dense(t, all, s.baseline_epochs, s, "finetune-all", progress)
    return copy.deepcopy(t.model).cpu()  # the dense model carries on; a copy is pruned


# (phase runner, starts from a fresh model?)
METHODS: dict[str, tuple[Callable, bool]] = {
    "ours": (_ours, False), "tfs": (_tfs, True), "nft": (_nft, False), "nest": (_nest, True),
}


def update(method: str, model: nn.Module | None, *, new: Data, all: Data, val: Data,
           schedule: Schedule | None = None, build: Callable[[], nn.Module] | None = None,
           device: str | torch.device = "auto", seed: int = 0,
           progress: Progress | None = None,
           should_stop: Callable[[], bool] | None = None) -> UpdateResult:
    """Run one update of `method` with the new chunk `new` and all stored data `all`.

    `model` is the previous update's `carry` (None on the first chunk); fresh
    models come from `build()` or, when omitted, from rebuilding `model.spec`.
    Raises Abandoned when `should_stop()` turns true, TrainingDiverged on a
    non-finite loss, ValueError for bad arguments. The input model is never modified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if len(new) == 0 or len(all) == 0 or len(val) == 0:
        raise ValueError(f"new, all and val must be non-empty (got {len(new)}, {len(all)}, {len(val)})")
    s = schedule or Schedule()
    run, fresh = METHODS[method]
    torch.manual_seed(seed)  # before building: a fresh model's init is part of the run
    work = _fresh_model(model, build) if (fresh or model is None) else copy.deepcopy(model)
    dev = resolve_device(device)
    meter = CostMeter(device=str(dev))
    t = Trainer(work, dev, s.train, meter, seed=seed, should_stop=should_stop)
    new_d, all_d, val_d = new.to(dev), all.to(dev), val.to(dev)
    carry = run(t, new_d, all_d, val_d, s, model is None, progress)
    report = _prune(t, all_d, val_d, s.prune, s.train.lr, "prune", progress)
    cost = meter.finish(len(all))
    compact = compact_params = None
    if s.nonrecoverable is not None:  # an export pruned from a copy, on its own cost meter
        tc = Trainer(copy.deepcopy(t.model), dev, s.train, CostMeter(str(dev)), seed=seed,
                     should_stop=should_stop)
        tc.gen = t.gen  # continue the same shuffle stream: the export is reproducible as before
        _prune(tc, all_d, val_d, s.nonrecoverable, s.train.lr, "prune-compact", progress)
        compact, compact_params = tc.model.cpu().eval(), count_parameters(tc.model)
    served = t.model.cpu().eval()
    return UpdateResult(served, served if carry is None and method != "tfs" else carry,
                        report.final_accuracy, count_parameters(served), cost, report,
                        compact, compact_params)


def _fresh_model(model: nn.Module | None, build: Callable[[], nn.Module] | None) -> nn.Module:
    if build is not None:
        return build()
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("a fresh model is needed: pass build=, or a model made by gnp.build_model")
    from gnp.models import build_model
    return build_model(spec.name, spec.input_shape, spec.num_classes)
