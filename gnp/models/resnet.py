"""ResNet-18 for small images: the standard BasicBlock layout with a CIFAR-style stem.

Stem: 3x3 convolution (stride 1) + BN, no max-pool, for 28x28 / 32x32 inputs with any
number of channels; four stages of two BasicBlocks (64, 128, 256, 512 filters; stride 2
at the first block of stages 2-4, with a 1x1 convolution + BN shortcut where the shape
changes); global average pooling; one Linear. Leaky ReLU (slope 0.01) as everywhere.
Convolutions have no bias (BN follows each).

Units (gnp.units), two kinds of group:
- each block's internal channels: the filters of its first convolution (with their BN
  channels), read by its second convolution;
- each stage's residual stream: a channel of it is the sum of what the stage's writers
  put there (the stem, or the stage's 1x1 shortcut projection, and the second
  convolution of each of its blocks, each through its BN) plus the identity shortcuts,
  and it is read by every block's first convolution, the next stage's projection, and
  the classifier. The writers are tied (one mask): a dormant stream channel is zero in
  every writer, hence zero in the sum and through every identity shortcut, so growth
  and pruning act per channel on whole skip paths and a pruned channel leaves every
  block at once (compaction slices it out of every writer and reader).
"""

from __future__ import annotations

import torch
from torch import nn

from gnp.models.init import LEAKY_SLOPE
from gnp.models.spec import ModelSpec

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the (projected) input, then act."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))  # (B, C_mid, H', W'): the block's units
        return self.act(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with a 3x3 stem and no max-pool."""

    widths = (64, 128, 256, 512)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c = spec.image()[0]
        self.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        blocks, c_in = [], 64
        for i, w in enumerate(self.widths):
            for j in range(2):
                blocks.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))  # (B, 64, H, W)
        x = self.blocks(x)  # (B, 512, H/8, W/8)
        return self.fc(x.mean((2, 3)))

    def unit_layout(self) -> list[tuple[str, str | None, list[str], list[tuple[str, str]]]]:
        """Each block's internal channels, (conv1, bn1) read by conv2; then each stage's
        residual stream, written by the stem or the stage's projection, tied with every
        block's (conv2, bn2), read by the blocks' conv1, the next projection, and fc."""
        inner = [(f"blocks.{i}.conv1", f"blocks.{i}.bn1", [f"blocks.{i}.conv2"], [])
                 for i in range(len(self.blocks))]
        streams = [["conv1", "bn1", [], []]]
        for i, block in enumerate(self.blocks):
            b = f"blocks.{i}"
            reads = streams[-1]  # the stream this block reads
            reads[2].append(f"{b}.conv1")
            if len(block.shortcut):  # a projection: the block writes a new stream
                reads[2].append(f"{b}.shortcut.0")
                streams.append([f"{b}.shortcut.0", f"{b}.shortcut.1", [], []])
            streams[-1][3].append((f"{b}.conv2", f"{b}.bn2"))
        streams[-1][2].append("fc")
        return inner + [tuple(s) for s in streams]
