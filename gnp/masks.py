"""Binary masks on the prunable weights of any nn.Module.

Each prunable module (Linear, Conv1d/2d, including the Linear gates inside an
H-LSTM) gets a `weight_mask` buffer of the weight's shape. Dormant weights are
held at exactly zero (no reparametrisation, so the forward pass costs nothing
extra), and their gradients are masked before each optimiser step; the dense
gradient, dormant entries included, stays readable between backward() and
mask_grads() for gradient-based growth. Masks are updated in place
(`mask.copy_`), never rebound, so references and optimiser state survive, and
they travel in `model.state_dict()` with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["PRUNABLE", "MaskedLayer", "Masks", "ParamCount", "count_parameters"]

PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
MASK = "weight_mask"


@dataclass(frozen=True)
class ParamCount:
    """Active (unpruned) and dense parameter counts; biases count as always active."""

    active: int
    dense: int

    @property
    def compression(self) -> float:
        return self.dense / max(self.active, 1)


@dataclass(frozen=True)
class MaskedLayer:
    name: str
    module: nn.Module
    weight: nn.Parameter
    mask: torch.Tensor  # bool, same shape as weight

    @property
    def active(self) -> int:
        return int(self.mask.sum())


class Masks:
    """The masked layers of a model, in module order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[MaskedLayer] = [
            MaskedLayer(name, m, m.weight, getattr(m, MASK))
            for name, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)
        ]
        self._factors: list[torch.Tensor] = []
        self._versions: list[int] = []

    def factors(self) -> list[torch.Tensor]:
        """The masks as 0/1 tensors of the weights' dtype (multiplying by a bool mask costs a
        type conversion per step). Cached, and rebuilt when any mask was changed in place
        (a tensor's `_version` counts its in-place changes, `load_state_dict` included)."""
        versions = [layer.mask._version for layer in self.layers]
        if versions != self._versions or not self._factors:
            self._factors = [layer.mask.to(layer.weight.dtype) for layer in self.layers]
            self._versions = versions
        return self._factors

    @classmethod
    def attach(cls, model: nn.Module, kinds: tuple[type[nn.Module], ...] = PRUNABLE) -> "Masks":
        """Give every module of `kinds` an all-ones mask (idempotent), and return the Masks."""
        for m in model.modules():
            if isinstance(m, kinds) and not hasattr(m, MASK):
                m.register_buffer(MASK, torch.ones_like(m.weight, dtype=torch.bool))
        masks = cls(model)
        if not masks.layers:
            raise ValueError(f"{type(model).__name__} has no prunable layers of kinds {kinds}")
        return masks

    def __iter__(self) -> Iterator[MaskedLayer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def apply(self) -> None:
        """Hold dormant weights at exactly zero (one fused multi-tensor op)."""
        torch._foreach_mul_([layer.weight for layer in self.layers], self.factors())

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of dormant weights (call between backward and step)."""
        pairs = [(layer.weight.grad, f) for layer, f in zip(self.layers, self.factors())
                 if layer.weight.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def mask_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimiser state (momentum) of dormant weights after masks change, so a
        connection that grows back later starts without a stale velocity."""
        for layer in self.layers:
            for buf in optimizer.state.get(layer.weight, {}).values():
                if isinstance(buf, torch.Tensor) and buf.shape == layer.mask.shape:
                    buf.mul_(layer.mask)

    @torch.no_grad()
    def set(self, new_masks: dict[str, torch.Tensor]) -> None:
        """Copy new masks in place (by layer name) and zero the newly dormant weights."""
        by_name = {layer.name: layer for layer in self.layers}
        for name, new in new_masks.items():
            if name not in by_name:
                raise KeyError(f"no masked layer named {name!r}")
            if new.shape != by_name[name].mask.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(new.shape)}, "
                                 f"expected {tuple(by_name[name].mask.shape)}")
            by_name[name].mask.copy_(new)
        self.apply()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {layer.name: layer.mask.clone() for layer in self.layers}

    def count(self) -> ParamCount:
        return count_parameters(self.model)

    def per_layer(self) -> dict[str, ParamCount]:
        return {layer.name: ParamCount(layer.active, layer.mask.numel()) for layer in self.layers}

    def density(self) -> float:
        """Share of the masked weights that are active (0..1)."""
        total = sum(layer.mask.numel() for layer in self.layers)
        return sum(layer.active for layer in self.layers) / total

    def layer_density(self) -> dict[str, float]:
        """Share of each masked layer's weights that are active."""
        return {layer.name: layer.active / layer.mask.numel() for layer in self.layers}


def count_parameters(model: nn.Module) -> ParamCount:
    """Active and dense parameter counts of a model; unmasked parameters count as active."""
    dense = sum(p.numel() for p in model.parameters())
    dormant = sum(int((~m).sum()) for name, m in model.named_buffers() if name.endswith(MASK))
    return ParamCount(active=dense - dormant, dense=dense)
