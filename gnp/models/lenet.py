"""The LeNets of the paper: LeNet-300-100 and LeNet-5, plus the Caffe LeNet-5 variant."""

from __future__ import annotations

import math

import torch
from torch import nn

from gnp.models.init import LEAKY_SLOPE
from gnp.models.spec import ModelSpec

__all__ = ["LeNet300100", "LeNet5", "LeNet5Caffe"]


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


def _conv_out(size: int, pad: int) -> int:
    """Side of a 5x5 convolution (stride 1) followed by 2x2 max-pooling."""
    return (size + 2 * pad - 4) // 2


class _ConvNet(nn.Module):
    """conv5x5 -> pool -> conv5x5 -> pool -> fully connected layers, leaky ReLU between."""

    def __init__(self, spec: ModelSpec, filters: tuple[int, int], hidden: tuple[int, ...],
                 pad1: int) -> None:
        super().__init__()
        c, h, w = spec.image()
        pad2 = 0 if min(_conv_out(h, pad1), _conv_out(w, pad1)) >= 10 else 2  # small inputs
        self.conv1 = nn.Conv2d(c, filters[0], 5, padding=pad1)
        self.conv2 = nn.Conv2d(filters[0], filters[1], 5, padding=pad2)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        h2, w2 = _conv_out(_conv_out(h, pad1), pad2), _conv_out(_conv_out(w, pad1), pad2)
        widths = (filters[1] * h2 * w2, *hidden, spec.num_classes)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))  # (B, F1, H1, W1)
        x = self.pool(self.act(self.conv2(x)))  # (B, F2, H2, W2)
        x = x.flatten(1)
        for fc in self.fcs[:-1]:
            x = self.act(fc(x))
        return self.fcs[-1](x)


class LeNet5(_ConvNet):
    """The paper's LeNet-5: conv 5x5 x6, conv 5x5 x16, FC 120, FC 84, FC 10.

    The first convolution pads by 2, which is LeCun's LeNet-5 on 32x32 inputs
    (MNIST's 28x28 images padded to 32): 61,706 parameters on 28x28, the closest
    layout to the paper's "59K" (without padding it would have 44,426).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, filters=(6, 16), hidden=(120, 84), pad1=2)


class LeNet5Caffe(_ConvNet):
    """The Caffe LeNet-5 of the pruning literature: 20 and 50 filters, FC 500 (431,080
    parameters on 28x28). Not the paper's model; kept under its own name."""

    def __init__(self, spec: ModelSpec) -> None:
        pad1 = 0 if min(spec.image()[1:]) >= 28 else 2
        super().__init__(spec, filters=(20, 50), hidden=(500,), pad1=pad1)
