"""Unit (structured) masks and CGaP's unit growth and pruning.

A *unit* is an output neuron of a Linear or a filter of a Conv2d (its producer),
together with its batch-norm channel (if any) and the matching input slice of the
layer that reads it (its consumer: a column of the next Linear, an input channel of
the next Conv2d, or the block of `repeat` columns a flattened channel becomes).
The model is built at its maximum width; each producer holds a bool `unit_mask`
buffer, one entry per unit. The connection masks of `gnp.masks` are *derived*
from the unit masks (a weight is active when its output unit and its input unit
both are), so the trainer, the optimiser-state masking, snapshots and parameter
counts work unchanged. A dormant unit also has its bias and its BN scale and shift
held at zero, so its output is exactly zero; its incoming row and outgoing column
are zero, so no gradient reaches it (the gradient at its output is W_next[:, j]^T g
= 0), and with zero momentum nothing moves it.

Which units form groups: a model may define `unit_layout()` returning
(producer, norm or None, consumers[, tied]) module names; otherwise the prunable
layers in module order form a chain, each layer's units read by the next layer
(the LeNets). The output layer's units (the classes) are never masked. `tied`
lists further (producer, norm) pairs whose outputs are *added* to the first
producer's, channel by channel (a residual stream: ResNet-18's stem or shortcut
projection and every block's second convolution in a stage). They share the
group's mask, held by the first producer: a dormant channel is zero in every
writer, so the sum is zero and stays zero through the identity shortcuts.

CGaP, in three separate pieces as for connection growth:

- Score. Growth: the norm of the epoch-mean gradient a dormant unit's *outgoing*
  weights would receive if it were switched on with fresh candidate incoming
  weights (default init, scaled to the active fan-in; BN scale 1, shift 0). Its
  outgoing weights are zero, so switching the candidates on does not change the
  loss, and one gradient epoch with updates paused (`Trainer.mean_gradients`, the
  same pass connection growth uses) scores every dormant unit at once: this is
  "the gradient norm the unit would receive", the unit analogue of the dormant
  connection gradient. Pruning: ||incoming|| x ||outgoing|| of an active unit,
  with |BN scale| in place of ||incoming|| after a batch norm (a tied group: the
  root of the sum of squares over its writers). Leaky ReLU is
  positively homogeneous, so scaling a unit's inputs by c and outputs by 1/c
  leaves the function and this score unchanged; an incoming norm alone would not.
- Select (pure): the `n` highest-scored dormant units; the `beta` percent
  lowest-scored active units, never a group's last unit (every layer stays
  non-empty, the structured form of the recoverable rule: an active unit is
  connected to every active unit of its neighbours).
- Schedule: how many units a growth step adds (`growth_count`).

Pruning reuses `gnp.prune.iterative_prune` (retraining, the paired accuracy check,
rollback, held-out verdict) through its `step` argument: `unit_prune_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gnp.masks import PRUNABLE, Masks

__all__ = ["UNIT_MASK", "UnitGroup", "UnitMasks", "unit_layout", "select_unit_growth",
           "select_unit_prune", "growth_count", "prune_scores", "growth_scores",
           "seed_units", "propose_candidates", "grow_units", "unit_prune_step", "UnitGrowthStep"]

UNIT_MASK = "unit_mask"


@dataclass(frozen=True)
class UnitGroup:
    """The units of one producer layer and the layers that read them."""

    name: str  # the producer's module name
    producer: nn.Module
    norm: nn.Module | None  # batch norm over the producer's outputs
    consumers: tuple[tuple[str, nn.Module, int], ...]  # (name, module, input columns per unit)
    mask: torch.Tensor  # bool (units,)
    tied: tuple[tuple[str, nn.Module, nn.Module | None], ...] = ()  # (name, producer, norm)

    @property
    def writers(self) -> tuple[tuple[str, nn.Module, nn.Module | None], ...]:
        """Every (name, producer, norm) whose outputs these units are: the producer, then
        the tied ones."""
        return ((self.name, self.producer, self.norm),) + self.tied

    @property
    def active(self) -> int:
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.mask.numel()


Layout = list[tuple[str, str | None, list[str], list[tuple[str, str | None]]]]


def unit_layout(model: nn.Module) -> Layout:
    """(producer, norm, consumers, tied) names: the model's `unit_layout()` (`tied` may be
    left out: none), or the chain of its prunable layers in module order (each read by the
    next; the last is the output)."""
    if hasattr(model, "unit_layout"):
        return [(e[0], e[1], list(e[2]), list(e[3]) if len(e) > 3 else []) for e in model.unit_layout()]
    names = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return [(a, None, [b], []) for a, b in zip(names, names[1:])]


def _units(m: nn.Module) -> int:
    return m.weight.shape[0]


def _inputs(m: nn.Module) -> int:
    return m.weight.shape[1]


class UnitMasks:
    """The unit groups of a model (attach first), and the derived connection masks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        mods = dict(model.named_modules())
        self.groups: list[UnitGroup] = []
        for prod, norm, cons, tied in unit_layout(model):
            p = mods[prod]
            if not isinstance(getattr(p, UNIT_MASK, None), torch.Tensor):
                raise ValueError(f"{prod!r} has no {UNIT_MASK}: call UnitMasks.attach first")
            consumers = []
            for c in cons:
                if _inputs(mods[c]) % _units(p):
                    raise ValueError(f"{c!r} reads {_inputs(mods[c])} inputs, not a multiple "
                                     f"of {prod!r}'s {_units(p)} units")
                consumers.append((c, mods[c], _inputs(mods[c]) // _units(p)))
            for t, _ in tied:
                if _units(mods[t]) != _units(p):
                    raise ValueError(f"{t!r} has {_units(mods[t])} units, tied to {prod!r}'s "
                                     f"{_units(p)}")
            self.groups.append(UnitGroup(
                prod, p, mods[norm] if norm else None, tuple(consumers), getattr(p, UNIT_MASK),
                tuple((t, mods[t], mods[tn] if tn else None) for t, tn in tied)))

    @classmethod
    def attach(cls, model: nn.Module) -> "UnitMasks":
        """Give every producer an all-ones unit mask (idempotent); the model needs its
        connection masks (`Masks.attach`, done by `build_model`)."""
        mods = dict(model.named_modules())
        for prod, *_ in unit_layout(model):
            p = mods[prod]
            if not hasattr(p, UNIT_MASK):
                p.register_buffer(UNIT_MASK, torch.ones(_units(p), dtype=torch.bool,
                                                        device=p.weight.device))
        units = cls(model)
        if not units.groups:
            raise ValueError(f"{type(model).__name__} has no unit groups")
        return units

    def __iter__(self):
        return iter(self.groups)

    def complete_unit_masks(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Add to a checkpoint's `state` (in place) an all-ones mask for each group it has
        none for, so that a model saved before a group existed (ResNet-18's residual
        stream became a unit group later) loads with those units whole, as it was
        trained. Returns the keys added."""
        added = []
        for g in self.groups:
            key = f"{g.name}.{UNIT_MASK}"
            if key not in state:
                state[key] = torch.ones(len(g), dtype=torch.bool)
                added.append(key)
        return added

    def counts(self) -> dict[str, tuple[int, int]]:
        """(active, total) units per group."""
        return {g.name: (g.active, len(g)) for g in self.groups}

    def connection_masks(self, masks: Masks) -> dict[str, torch.Tensor]:
        """Every masked layer's connection mask: its output unit and input unit both active."""
        rows = {w: g.mask for g in self.groups for w, _, _ in g.writers}
        cols = {c: g.mask.repeat_interleave(k) for g in self.groups for c, _, k in g.consumers}
        out = {}
        for layer in masks:
            w = layer.weight
            r = rows.get(layer.name, torch.ones(w.shape[0], dtype=torch.bool, device=w.device))
            c = cols.get(layer.name, torch.ones(w.shape[1], dtype=torch.bool, device=w.device))
            shape = (1,) * (w.dim() - 2)
            out[layer.name] = (r.view(-1, 1, *shape) & c.view(1, -1, *shape)).expand_as(w)
        return out

    @torch.no_grad()
    def sync(self, masks: Masks) -> None:
        """Set the connection masks from the unit masks and zero what dormant units own
        (bias, BN scale and shift): their outputs become exactly zero."""
        masks.set(self.connection_masks(masks))
        for g in self.groups:
            off = ~g.mask
            for _, prod, norm in g.writers:
                if getattr(prod, "bias", None) is not None:
                    prod.bias[off] = 0.0
                if norm is not None:
                    norm.weight[off] = 0.0
                    norm.bias[off] = 0.0

    @torch.no_grad()
    def mask_state(self, opt: torch.optim.Optimizer) -> None:
        """Zero the optimiser state (momentum) of everything a dormant unit owns: its
        incoming row, bias, BN scale and shift, and its columns in the consumers."""
        for g in self.groups:
            owned = []
            for _, prod, norm in g.writers:
                owned += [prod.weight, getattr(prod, "bias", None)]
                if norm is not None:
                    owned += [norm.weight, norm.bias]
            for p in owned:
                if p is not None:
                    _mul_state(opt, p, g.mask.view(-1, *(1,) * (p.dim() - 1)))
            for _, m, k in g.consumers:
                shape = (1, -1, *(1,) * (m.weight.dim() - 2))
                _mul_state(opt, m.weight, g.mask.repeat_interleave(k).view(shape))


def _mul_state(opt: torch.optim.Optimizer, p: torch.Tensor, keep: torch.Tensor) -> None:
    for buf in opt.state.get(p, {}).values():
        if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
            buf.mul_(keep)


# -- score (pure) ------------------------------------------------------------------


def _per_unit_columns(w: torch.Tensor, units: int) -> torch.Tensor:
    """(units, everything a unit feeds) view of a consumer's weight or gradient."""
    return w.detach().transpose(0, 1).reshape(units, -1)


def prune_scores(g: UnitGroup) -> torch.Tensor:
    """||incoming|| (or |BN scale|) x ||outgoing|| of each unit (dormant units score 0);
    a tied group's incoming: the root of the sum of squares over its writers."""
    incoming = sum((norm.weight.detach().abs() if norm is not None
                    else prod.weight.detach().flatten(1).norm(dim=1)).pow(2)
                   for _, prod, norm in g.writers).sqrt()
    outgoing = sum(_per_unit_columns(m.weight, len(g)).pow(2).sum(1) for _, m, _ in g.consumers)
    return incoming * outgoing.sqrt() * g.mask


def growth_scores(g: UnitGroup, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Norm of the mean gradient on each unit's outgoing weights (from `mean_gradients`
    taken with candidates proposed)."""
    sq = sum(_per_unit_columns(grads[c], len(g)).float().pow(2).sum(1) for c, _, _ in g.consumers)
    return sq.sqrt()


# -- select (pure) and schedule ----------------------------------------------------


def select_unit_growth(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` highest-scored dormant units (fewer if fewer are dormant)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n = min(n, int((~mask).sum()))
    add = torch.zeros_like(mask)
    if n:
        add[torch.topk(score.float().masked_fill(mask, -math.inf), n).indices] = True
    return add


def select_unit_prune(score: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """The new mask after removing the `beta` percent lowest-scored active units (rounded up:
    a small layer loses one unit a step rather than none), never the last one."""
    if not 0.0 < beta < 100.0:
        raise ValueError(f"beta must be a percent in (0, 100), got {beta}")
    active = int(mask.sum())
    n = min(math.ceil(active * beta / 100.0), active - 1)
    new = mask.clone()
    if n > 0:
        new[torch.topk(score.float().masked_fill(~mask, math.inf), n, largest=False).indices] = False
    return new


def growth_count(active: int, total: int, rate: float) -> int:
    """Units a growth step adds to a group: `rate` x its active units (at least one),
    capped by its dormant units."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return min(total - active, max(1, math.ceil(rate * active)))


# -- apply ------------------------------------------------------------------------


@torch.no_grad()
def seed_units(units: UnitMasks, masks: Masks, share: float, gen: torch.Generator) -> None:
    """Keep a random `share` of each group's units (at least one); scale consumers' weights
    by 1/sqrt(share of their inputs kept) to keep the init's signal scale."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    for g in units:
        n = max(1, round(share * len(g)))
        keep = torch.randperm(len(g), generator=gen)[:n].to(g.mask.device)
        g.mask.zero_()
        g.mask[keep] = True
        for _, m, _ in g.consumers:
            m.weight.mul_(1.0 / math.sqrt(n / len(g)))
    units.sync(masks)


@torch.no_grad()
def propose_candidates(units: UnitMasks, gen: torch.Generator) -> None:
    """Give dormant units fresh incoming weights (PyTorch's default init over the active
    fan-in) and BN scale 1; their outgoing weights stay zero, so the loss is unchanged.
    Call `sync` afterwards to put the ones not grown back to zero."""
    in_units = {c: g.mask.repeat_interleave(k) for g in units for c, _, k in g.consumers}
    for g in units:
        off = ~g.mask
        if not off.any():
            continue
        for name, prod, norm in g.writers:
            w = prod.weight
            cols = in_units.get(name, torch.ones(w.shape[1], dtype=torch.bool, device=w.device))
            fan_in = max(1, int(cols.sum()) * w[0, 0].numel())
            bound = 1.0 / math.sqrt(fan_in)
            cand = (torch.rand(w.shape, generator=gen) * 2 - 1).to(w.device, w.dtype) * bound
            shape = (1, -1, *(1,) * (w.dim() - 2))
            w[off] = (cand * cols.view(shape))[off]
            if getattr(prod, "bias", None) is not None:
                prod.bias[off] = ((torch.rand(len(g), generator=gen) * 2 - 1) * bound).to(
                    w.device, w.dtype)[off]
            if norm is not None:
                norm.weight[off] = 1.0
                norm.bias[off] = 0.0


@dataclass(frozen=True)
class UnitGrowthStep:
    phase: str
    grown: dict[str, int]  # units added per group
    active: dict[str, int]  # active units per group after the step
    lr: float


@torch.no_grad()
def grow_units(units: UnitMasks, masks: Masks, grads: dict[str, torch.Tensor], rate: float,
               lr: float, phase: str = "") -> UnitGrowthStep:
    """Activate the highest-scored dormant units of every group (after `propose_candidates`
    and `mean_gradients`): they keep their candidate incoming weights, and their outgoing
    weights start at -lr x mean gradient (one descent step from zero, as connection growth)."""
    grown = {}
    for g in units:
        add = select_unit_growth(growth_scores(g, grads), g.mask,
                                 growth_count(g.active, len(g), rate) if g.active < len(g) else 0)
        for c, m, k in g.consumers:
            cols = add.repeat_interleave(k)
            m.weight[:, cols] = -lr * grads[c][:, cols]
        g.mask.logical_or_(add)
        grown[g.name] = int(add.sum())
    units.sync(masks)  # candidates not grown go back to zero
    return UnitGrowthStep(phase, grown, {g.name: g.active for g in units}, lr)


@torch.no_grad()
def unit_prune_step(units: UnitMasks, masks: Masks, beta: float,
                    opt: torch.optim.Optimizer | None = None) -> int:
    """Prune `beta` percent of each group's active units (lowest `prune_scores`); returns the
    connections removed. A step hook for `gnp.prune.iterative_prune`."""
    before = masks.count().active
    for g in units:
        g.mask.copy_(select_unit_prune(prune_scores(g), g.mask, beta))
    units.sync(masks)
    if opt is not None:
        units.mask_state(opt)
    return before - masks.count().active
