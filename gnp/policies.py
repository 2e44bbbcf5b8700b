"""Update policies: how a model learns from a new chunk. All share one pruning policy.

- ours: grow and train on the new chunk first (E_new epochs), then on all stored
  data (E_all epochs), then recoverable pruning. The first chunk trains the
  initial model with NeST (grow-and-prune from a sparse seed).
- tfs:  train a dense model from scratch on all data, then prune.
- nft:  keep a dense model across chunks, fine-tune it on all data, prune a copy.
- nest: grow-and-prune from a sparse seed on all data.
- cgap: the structured counterpart of ours (gnp.units): the first model grows whole
  units from a seed of `unit_seed` of each layer's units on all data; each update
  grows units on the new chunk, then on all data, then prunes whole units with the
  same recoverable rules and paired check (iterative_prune with unit_prune_step).

Every method is a list of phases run by one `Trainer`: one optimiser and one cosine
schedule per update, sized from the training steps of all its phases. Updating an
already trained model (ours and nft after the first chunk) peaks at
`Schedule.incremental_lr`; training from scratch at `train.lr`. Pruning retrains at
a fixed share of the update's peak, the same rule for every method.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from gnp.cost import Cost, CostMeter
from gnp.data import Samples, place_all
from gnp.grow import GrowthStep, grow_by_gradient
from gnp.masks import MASK, Masks, ParamCount, count_parameters
from gnp.prune import PruneConfig, PruneReport, iterative_prune
from gnp.tasks import CLASSIFICATION, Task
from gnp.train import Progress, TrainConfig, Trainer, portable, resolve_device
from gnp.units import UnitMasks, grow_units, propose_candidates, seed_units, unit_prune_step

__all__ = ["Phase", "Schedule", "UpdateResult", "METHODS", "update", "sparse_seed", "derive_seed"]


@dataclass(frozen=True)
class Schedule:
    """Epoch counts and hyper-parameters of an update. Defaults are the paper's schedule."""

    new_epochs: int = 15  # ours: growth phase on the new chunk
    all_epochs: int = 20  # ours: growth phase on all data
    baseline_epochs: int = 60  # tfs / nft / nest (and ours' first chunk) training
    grow_every: int = 5  # a growth epoch every this many epochs of a growth phase
    alpha: float = 50.0  # growth percentile (paper: 30..50)
    seed_density: float = 0.1  # NeST's sparse seed: share of connections active at start
    # Peak lr updating a trained model (ours, nft after the first chunk); None: train.lr.
    # Measured (docs/results/incremental-lr/lr0.05-full, 3 seeds): the training lr (0.05)
    # beats 0.01 at every chunk for ours and nft alike, so None is the default; the runs
    # made before the switch pass --incremental-lr 0.01 to reproduce.
    incremental_lr: float | None = None
    # Shrink and perturb (Ash & Adams 2020) before updating a trained model (ours, nft,
    # alike): weights x shrink + N(0, perturb^2) on active weights. None: off (the paper's
    # method); an ablation against the warm-start gap to TFS.
    shrink: float | None = None
    perturb: float = 0.01
    # nft: epochs of an update of a trained model (None: baseline_epochs, the paper's).
    # Fewer is a control, fine-tuning at ours' cost, never the baseline itself.
    finetune_epochs: int | None = None
    # ours / cgap: carry the grown model as it was before pruning to the next update and
    # serve a pruned copy, as nft carries its dense model. False: the pruned model carries
    # on (the paper's method); True is an ablation of what the sparse carry costs.
    carry_unpruned: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    nonrecoverable: PruneConfig | None = None  # set to also export an ultra-compact model
    unit_seed: float = 0.25  # cgap: share of each layer's units active at start
    unit_growth: float = 0.5  # cgap: a growth step adds this x a layer's active units

    @classmethod
    def quick(cls) -> "Schedule":
        """A reduced schedule that runs the whole protocol in minutes on a 2-core CPU."""
        return cls(new_epochs=3, all_epochs=4, baseline_epochs=12, grow_every=3,
                   prune=PruneConfig(retrain_epochs=1.0, max_iterations=60))

    def with_nonrecoverable(self, tolerance: float = 0.005) -> "Schedule":
        return replace(self, nonrecoverable=replace(
            self.prune, recoverable=False, tolerance=tolerance))


@dataclass(frozen=True)
class Phase:
    """`epochs` passes over the new chunk or all data; every `grow_every`-th (the first
    included) is a growth epoch: gradients accumulated, no update (0: no growth)."""

    name: str
    data: str  # "new" or "all"
    epochs: int
    grow_every: int = 0

    def grows(self, epoch: int) -> bool:
        return bool(self.grow_every) and epoch % self.grow_every == 0

    @property
    def training_epochs(self) -> int:
        return sum(not self.grows(e) for e in range(self.epochs))


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
    compact_val_accuracy: float | None = None
    pre_prune_accuracy: float = float("nan")  # validation metric before pruning
    growth: tuple[GrowthStep, ...] = ()  # every growth step, in order
    peak_lr: float = float("nan")


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one use of a run's seed (init, shuffling, sparse seed)."""
    digest = hashlib.blake2b(f"{seed}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def shrink_perturb(model: nn.Module, shrink: float, sigma: float, gen: torch.Generator) -> None:
    """Every parameter x ``shrink``; Gaussian noise of sd ``sigma`` on active masked weights.

    Noise goes only where a connection mask says active: the connectivity is unchanged,
    and parameters without a mask (biases, a dormant unit's bias held at zero) are only
    shrunk.
    """
    if not 0.0 < shrink <= 1.0 or sigma < 0:
        raise ValueError(f"need 0 < shrink <= 1 and sigma >= 0, got {shrink}, {sigma}")
    masks = {name[: -len(MASK)] + "weight": m for name, m in model.named_buffers()
             if name.endswith(MASK)}
    for name, p in model.named_parameters():
        p.mul_(shrink)
        mask = masks.get(name)
        if mask is not None and sigma > 0:
            noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.add_(noise.mul_(sigma).mul_(mask))


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


def _grow_units(t: Trainer, units: UnitMasks, data: Samples, s: Schedule,
                phase: str) -> GrowthStep:
    """One unit growth step: candidates in, one gradient epoch, the best units grown."""
    before = t.masks.density()
    propose_candidates(units, t.cpu_gen)
    grads = t.mean_gradients(data)
    step = grow_units(units, t.masks, grads, s.unit_growth, t.lr, phase)
    return GrowthStep(phase, sum(step.grown.values()), before, t.masks.density(), t.lr)


def _run_phases(t: Trainer, phases: list[Phase], data: dict[str, Samples], s: Schedule,
                peak: float, progress: Progress | None,
                units: UnitMasks | None = None) -> list[GrowthStep]:
    """Run `phases` under one cosine schedule over all their training steps (growing
    whole units when `units` is given, connections otherwise)."""
    t.plan(sum(p.training_epochs * t.steps(len(data[p.data])) for p in phases), peak)
    growth = []
    for p in phases:
        t.meter.phase = p.name
        for epoch in range(p.epochs):
            if p.grows(epoch) and units is not None:
                growth.append(_grow_units(t, units, data[p.data], s, p.name))
            elif p.grows(epoch):
                grads = t.mean_gradients(data[p.data])
                growth.append(grow_by_gradient(t.masks, grads, s.alpha, t.lr, p.name))
            else:
                t.train_epoch(data[p.data])
            if progress:
                progress(p.name, epoch + 1, p.epochs)
    return growth


def _ours_phases(s: Schedule) -> list[Phase]:
    return [Phase("grow-new", "new", s.new_epochs, s.grow_every),
            Phase("grow-all", "all", s.all_epochs, s.grow_every)]


def _nest_phases(s: Schedule) -> list[Phase]:
    return [Phase("grow-all", "all", s.baseline_epochs, s.grow_every)]


# method -> (phases of the first chunk, phases of later chunks, fresh model every chunk?,
#            sparse seed at the start?, carries a dense copy?)
@dataclass(frozen=True)
class _Method:
    first: Callable[[Schedule], list[Phase]]
    later: Callable[[Schedule], list[Phase]]
    fresh: bool  # a new model every update (from scratch)
    seeded: bool  # starts from NeST's sparse seed when fresh
    dense_carry: bool = False  # the unpruned model carries on (nft)
    structured: bool = False  # grows and prunes whole units (cgap)


METHODS: dict[str, _Method] = {
    "ours": _Method(_nest_phases, _ours_phases, fresh=False, seeded=True),
    "tfs": _Method(lambda s: [Phase("train-all", "all", s.baseline_epochs)],
                   lambda s: [Phase("train-all", "all", s.baseline_epochs)],
                   fresh=True, seeded=False),
    "nft": _Method(lambda s: [Phase("train-all", "all", s.baseline_epochs)],
                   lambda s: [Phase("finetune-all", "all", s.baseline_epochs
                                    if s.finetune_epochs is None else s.finetune_epochs)],
                   fresh=False, seeded=False, dense_carry=True),
    "nest": _Method(_nest_phases, _nest_phases, fresh=True, seeded=True),
    "cgap": _Method(_nest_phases, _ours_phases, fresh=False, seeded=True, structured=True),
}


def update(method: str, model: nn.Module | None, *, new: Samples, all: Samples,
           val: Samples, schedule: Schedule | None = None,
           build: Callable[[], nn.Module] | None = None,
           device: str | torch.device = "auto", seed: int = 0, task: Task = CLASSIFICATION,
           progress: Progress | None = None,
           should_stop: Callable[[], bool] | None = None,
           observe: Callable[[str, nn.Module], None] | None = None) -> UpdateResult:
    """Run one update of `method` with the new chunk `new` and all stored data `all`.

    `model` is the previous update's `carry` (None on the first chunk); fresh
    models come from `build()` or, when omitted, from rebuilding `model.spec`, and
    are initialised from `seed`.
    Only local generators are used (the global RNG is neither read nor reseeded).
    `observe(stage, model)` is called with the model before pruning ("pre-prune"),
    e.g. to test it; it must not modify the model.
    Raises Abandoned when `should_stop()` turns true, TrainingDiverged on a
    non-finite loss, ValueError for bad arguments. The input model is never modified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if len(new) == 0 or len(all) == 0 or len(val) == 0:
        raise ValueError(f"new, all and val must be non-empty (got {len(new)}, {len(all)}, {len(val)})")
    s, m = schedule or Schedule(), METHODS[method]
    first = model is None
    fresh = m.fresh or first
    work = _fresh_model(model, build, derive_seed(seed, "init")) if fresh else copy.deepcopy(model)
    if not fresh and s.shrink is not None:
        shrink_perturb(work, s.shrink, s.perturb,
                       torch.Generator().manual_seed(derive_seed(seed, "perturb")))
    dev = resolve_device(device)
    meter = CostMeter(device=str(dev))
    t = Trainer(work, dev, s.train, meter, task, seed=derive_seed(seed, "shuffle"),
                should_stop=should_stop)
    # One memory budget: validation (read most often per sample) first, then replay.
    placed = place_all({"val": val, "all": all, "new": new}, dev, s.train.resident_bytes)
    data, val_d = {"new": placed["new"], "all": placed["all"]}, placed["val"]
    units = UnitMasks.attach(t.model) if m.structured else None
    if fresh and m.seeded:
        gen = torch.Generator().manual_seed(derive_seed(seed, "sparse"))
        if units is not None:
            seed_units(units, t.masks, s.unit_seed, gen)
        else:
            sparse_seed(t.masks, s.seed_density, gen)
    peak = s.train.lr if fresh or s.incremental_lr is None else s.incremental_lr
    growth = _run_phases(t, (m.first if first else m.later)(s), data, s, peak, progress, units)
    unpruned_carry = m.dense_carry or (s.carry_unpruned and not m.fresh)
    carry = portable(copy.deepcopy(t.model)) if unpruned_carry else None
    pre_prune = t.evaluate(val_d)
    if observe is not None:
        observe("pre-prune", t.model)
    step = None if units is None else (lambda beta: unit_prune_step(units, t.masks, beta, t.opt))
    report = _prune(t, data["all"], val_d, s.prune, s.train.lr, "prune", progress, step)
    cost = meter.finish(len(all))
    compact = _export(t, data["all"], val_d, s, progress, units is not None) if s.nonrecoverable else None
    served = portable(t.model).eval()
    return UpdateResult(
        served, carry if unpruned_carry else (None if m.fresh else served),
        report.final_accuracy, count_parameters(served), cost, report,
        compact[0] if compact else None, compact[1] if compact else None,
        compact[2] if compact else None, pre_prune, tuple(growth), peak)


def _prune(t: Trainer, data: Samples, val: Samples, cfg: PruneConfig, base_lr: float,
           phase: str, progress: Progress | None,
           step: Callable[[float], int] | None = None) -> PruneReport:
    t.meter.phase = phase
    if progress:
        progress(phase, 0, 1)
    report = iterative_prune(t, data, val, cfg, base_lr, step=step)
    if progress:
        progress(phase, 1, 1)
    return report


def _export(t: Trainer, data: Samples, val: Samples, s: Schedule,
            progress: Progress | None, structured: bool = False) -> tuple[nn.Module, ParamCount, float]:
    """The non-recoverable export: a copy pruned on, with its own trainer and cost meter
    (whole units for cgap: within the tolerance, past the paired no-loss check)."""
    tc = Trainer(copy.deepcopy(t.model), t.device, s.train, CostMeter(str(t.device)), t.task,
                 should_stop=t.should_stop)
    tc.gen = t.gen  # continue the same shuffle stream
    units = UnitMasks(tc.model) if structured else None
    step = None if units is None else (lambda beta: unit_prune_step(units, tc.masks, beta, tc.opt))
    report = _prune(tc, data, val, s.nonrecoverable, s.train.lr, "prune-compact", progress, step)
    return portable(tc.model).eval(), count_parameters(tc.model), report.final_accuracy


def _fresh_model(model: nn.Module | None, build: Callable[[], nn.Module] | None,
                 seed: int) -> nn.Module:
    """`build()` (or a rebuild of `model.spec`), initialised from a local generator."""
    from gnp.models import build_model, init_parameters
    if build is not None:
        fresh = build()
        init_parameters(fresh, torch.Generator().manual_seed(seed))
        return fresh
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("a fresh model is needed: pass build=, or a model made by gnp.build_model")
    return build_model(spec.name, spec.input_shape, spec.num_classes, seed=seed)
