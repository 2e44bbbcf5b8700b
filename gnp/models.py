"""The paper's models, with leaky ReLU (slope 0.01) throughout so no neuron dies.

A registry maps names to builders; `build_model` also attaches the masks, so the
state_dict of every model holds its weights and masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from gnp.masks import Masks

__all__ = ["ModelSpec", "MODELS", "build_model", "LeNet300100", "LeNet5", "LEAKY_SLOPE"]

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: registry name, input shape (C, H, W) and number of classes."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


class LeNet300100(nn.Module):
    """LeNet-300-100: two hidden fully connected layers (266,610 parameters on 28x28)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        n_in = math.prod(spec.input_shape)
        self.fc1 = nn.Linear(n_in, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, spec.num_classes)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 as in the pruning literature (Caffe variant: 20 and 50 filters, 500 hidden).

    On 28x28 inputs it has 431,080 parameters. Inputs smaller than 28x28 (the
    8x8 digits) get padding 2 so the two 5x5 convolutions still fit.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c, h, w = spec.input_shape
        pad = 0 if min(h, w) >= 28 else 2
        self.conv1 = nn.Conv2d(c, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        h2 = ((h + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
        w2 = ((w + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
        self.fc1 = nn.Linear(50 * h2 * w2, 500)
        self.fc2 = nn.Linear(500, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))  # (B, 20, H1, W1)
        x = self.pool(self.act(self.conv2(x)))  # (B, 50, H2, W2)
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
}


def build_model(name: str, input_shape: tuple[int, ...] | list[int] = (1, 28, 28),
                num_classes: int = 10) -> nn.Module:
    """Build a registered model with masks attached; `model.spec` records how it was built."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) of positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    spec = ModelSpec(name, input_shape, int(num_classes))
    model = MODELS[name](spec)
    model.spec = spec
    Masks.attach(model)
    return model
