"""Parameter initialisation from a local generator (never the global RNG).

Linear and convolution layers get PyTorch's default init (Kaiming-uniform with
a = sqrt(5), bias uniform in +-1/sqrt(fan_in)) drawn from the given generator;
norm layers their deterministic reset. A custom module that owns parameters of
its own defines ``init_parameters(gen)``; any other module with parameters is an
error, so no parameter is ever left uninitialised.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LEAKY_SLOPE", "init_parameters", "init_affine_"]

LEAKY_SLOPE = 0.01
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def init_affine_(m: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init of a Linear/Conv layer, drawn from `gen`."""
    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
    if getattr(m, "bias", None) is not None:
        fan_in = m.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(m.bias, -bound, bound, generator=gen)


@torch.no_grad()
def init_parameters(model: nn.Module, gen: torch.Generator) -> None:
    """Initialise every parameter (and norm buffer) of `model` from `gen`, in module order."""
    for m in model.modules():
        if isinstance(m, _AFFINE):
            init_affine_(m, gen)
        elif isinstance(m, _NORMS):
            m.reset_parameters()  # ones / zeros, running statistics reset
        elif hasattr(m, "init_parameters") and m is not model:
            m.init_parameters(gen)
        elif any(True for _ in m.parameters(recurse=False)):
            raise TypeError(f"cannot initialise {type(m).__name__}: give it an "
                            "init_parameters(gen) method")
