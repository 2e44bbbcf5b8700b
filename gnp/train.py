"""Training with the data set resident on the device, batched by indexing.

No DataLoader: the whole tensor lives on the device, each epoch draws a random
permutation there and slices batches from it, and the affine-distortion
augmentation runs on the device too. The loop reads top to bottom:
forward, backward, mask gradients, step, re-apply masks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gnp.cost import CostMeter
from gnp.data import Data
from gnp.masks import Masks

__all__ = [
    "Abandoned", "TrainingDiverged", "TrainConfig", "Trainer", "affine_distort",
    "evaluate", "resolve_device",
]

Progress = Callable[[str, int, int], None]
MIN_STEPS_PER_EPOCH = 16


class Abandoned(RuntimeError):
    """The caller asked the update to stop (e.g. SIGTERM); nothing was produced."""


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return device


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    augment: bool = True
    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_shear: float = 0.1
    max_translate: float = 0.1  # fraction of the image size


def affine_distort(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random affine distortion (rotation, scale, shear, translation) per image, on x's device.

    x: (B, C, H, W). Non-image inputs (H or W of 1) are returned unchanged.
    """
    if x.dim() != 4 or min(x.shape[-2:]) < 4:
        return x
    b = x.shape[0]
    u = torch.rand(b, 5, device=x.device, generator=gen) * 2 - 1  # uniform in [-1, 1)
    angle = u[:, 0] * math.radians(cfg.max_rotation_deg)
    scale = 1 + u[:, 1] * cfg.max_scale
    shear = u[:, 2] * cfg.max_shear
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, u[:, 3] * 2 * cfg.max_translate], 1),
        torch.stack([sin, cos, u[:, 4] * 2 * cfg.max_translate], 1),
    ], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, device: str | torch.device | None = None,
             batch_size: int = 4096, meter: CostMeter | None = None) -> float:
    """Accuracy of `model` on `data` (0..1), on the model's device unless `device` is given
    (then on a copy of the model there; the model itself is not moved)."""
    here = next(model.parameters()).device
    device = here if device is None else resolve_device(device)
    if device.type != here.type:
        model = copy.deepcopy(model).to(device)
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.x[i:i + batch_size].to(device, non_blocking=True)
        y = data.y[i:i + batch_size].to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
    if meter is not None:
        meter.add_eval(len(data))
    model.train(was_training)
    return correct / max(len(data), 1)


class Trainer:
    """Trains one masked model on device-resident data; counts every sample pass."""

    def __init__(self, model: nn.Module, device: torch.device, cfg: TrainConfig,
                 meter: CostMeter, seed: int = 0, should_stop: Callable[[], bool] | None = None):
        self.model = model.to(device)
        self.masks = Masks(model)
        self.device = device
        self.cfg = cfg
        self.meter = meter
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.should_stop = should_stop

    def optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr if lr is None else lr,
                               momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def batch_size(self, n: int) -> int:
        """The configured batch size, cut so an epoch of n samples has at least 16 steps.

        Small data (a few hundred samples) would otherwise get 2-3 steps an epoch and
        barely move; data sets of 2,048+ samples at batch 128 are unaffected.
        """
        return max(1, min(self.cfg.batch_size, n // MIN_STEPS_PER_EPOCH))

    def _batches(self, data: Data, fraction: float = 1.0):
        n = len(data)
        order = torch.randperm(n, device=self.device, generator=self.gen)
        order = order[: max(1, int(round(n * fraction)))]
        bs = self.batch_size(n)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            x = data.x[idx]
            if self.cfg.augment:
                x = affine_distort(x, self.cfg, self.gen)
            yield x, data.y[idx]

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Abandoned("update abandoned on request")

    def train_epoch(self, data: Data, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
                    fraction: float = 1.0) -> float:
        """One pass (or `fraction` of one) over `data`; returns the mean loss."""
        self.check_stop()
        self.model.train()
        total, count = 0.0, 0
        for x, y in self._batches(data, fraction):
            loss = F.cross_entropy(self.model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.masks.mask_grads()
            opt.step()
            self.masks.apply()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            self.meter.add(len(y))
        mean = total / max(count, 1)
        if not math.isfinite(mean):
            raise TrainingDiverged(f"training loss became {mean}")
        return mean

    def mean_gradients(self, data: Data) -> dict[str, torch.Tensor]:
        """Mean dense gradient of every masked weight over one epoch, with updates paused."""
        self.check_stop()
        self.model.train()
        sums = {layer.name: torch.zeros_like(layer.weight) for layer in self.masks}
        batches = 0
        for x, y in self._batches(data):
            self.model.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            for layer in self.masks:
                sums[layer.name] += layer.weight.grad
            batches += 1
            self.meter.add(len(y))
        self.model.zero_grad(set_to_none=True)
        return {name: s / max(batches, 1) for name, s in sums.items()}

    def evaluate(self, data: Data) -> float:
        return evaluate(self.model, data, self.device, meter=self.meter)
