"""Training with the data resident on the device (or streamed to it), batched by indexing.

No DataLoader: each epoch draws a random permutation and gathers batches from the
data set, and augmentation runs on the device. The loop reads top to bottom:
forward and loss (the task's), backward, mask gradients, step, re-apply masks.
Nothing in a step waits for the device: the loss is summed on the device and
checked once per epoch.

One `Trainer` serves one update: one optimiser (its momentum carries across the
update's phases) and one cosine learning-rate schedule, sized from the optimiser
steps the update will actually take (growth epochs take none), so it ends at its
final rate whatever the mix of growth and training epochs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from gnp.augment import affine_distort
from gnp.cost import CostMeter
from gnp.data import Samples
from gnp.masks import Masks
from gnp.tasks import CLASSIFICATION, Task

__all__ = [
    "COMPILE_MODES", "MEMORY_FORMATS", "Abandoned", "CosineSchedule", "TrainingDiverged",
    "TrainConfig", "Trainer", "affine_distort", "evaluate", "portable",
    "resolve_device", "sample_scores", "set_dropout_generator", "uses_channels_last",
]

Progress = Callable[[str, int, int], None]
MIN_STEPS_PER_EPOCH = 16
# torch.compile's modes ("reduce-overhead" captures CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


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
    lr: float = 0.05  # peak learning rate of a schedule
    final_lr: float = 0.01  # a schedule ends at lr x this (cosine annealing)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    augment: bool = False  # the task's random distortions (off by default: choose per data set)
    resident_bytes: int | None = None  # larger data sets stream to the device per batch
    optimizer: str = "sgd"  # "sgd" (momentum), or "adam" (AdamW: CTC leaves its blank plateau
    # in a few epochs with it, where SGD takes tens; momentum is then beta1)
    grad_clip: float | None = None  # clip the gradient's global norm (recurrent models)
    # torch.compile mode of the training forward pass (one of COMPILE_MODES); None: eager.
    # Off by default: on the 2-core CPU it trains LeNet-300-100 at 0.82-0.83x of eager
    # (docs/results/train_throughput_cpu.md; `python -m gnp.bench` measures both).
    compile: str | None = None
    # Memory layout of convolution weights and activations while training (one of
    # MEMORY_FORMATS): "channels_last" (NHWC), "contiguous" (NCHW), or "auto": channels_last
    # on the CPU for models with 2-D convolutions, where it trains the paper's LeNet-5
    # 1.16-1.18x faster (docs/results/train_throughput_lenet-5_cpu.md, `python -m gnp.bench
    # --model lenet-5` measures both), contiguous elsewhere (unmeasured on CUDA).
    # Models leave an update contiguous (`portable`), whatever they trained in.
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {', '.join(COMPILE_MODES)}; "
                             f"got {self.compile!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}; "
                             f"got {self.memory_format!r}")


@dataclass
class CosineSchedule:
    """Cosine annealing from `peak` to `floor` over `total` optimiser steps."""

    peak: float
    floor: float
    total: int
    taken: int = 0

    def lr(self) -> float:
        if self.total <= 0:
            return self.floor
        t = min(self.taken, self.total) / self.total
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def uses_channels_last(cfg: TrainConfig, model: nn.Module, device: torch.device) -> bool:
    """Whether a trainer lays `model`'s 4-D weights out channels-last (cfg.memory_format)."""
    if cfg.memory_format != "auto":
        return cfg.memory_format == "channels_last"
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def portable(model: nn.Module) -> nn.Module:
    """`model` (in place) on the CPU in the standard contiguous layout, as every consumer
    expects: safetensors saves only contiguous tensors, and `view` needs them."""
    return model.cpu().to(memory_format=torch.contiguous_format)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


@torch.no_grad()
def sample_scores(model: nn.Module, data: Samples, device: torch.device | None = None,
                  task: Task = CLASSIFICATION,
                  batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (score, weight) of `model` on `data`, in eval mode, on `device`."""
    device = next(model.parameters()).device if device is None else device
    was_training = model.training
    model.eval()
    scores, weights = [], []
    for i in range(0, len(data), batch_size):
        s, w = task.scores(model, data.gather(slice(i, i + batch_size), device))
        scores.append(s)
        weights.append(w)
    model.train(was_training)
    return torch.cat(scores), torch.cat(weights)


def evaluate(model: nn.Module, data: Samples, device: str | torch.device | None = None,
             task: Task = CLASSIFICATION, meter: CostMeter | None = None) -> float:
    """The task's metric (accuracy for classification, 0..1) of `model` on `data`, on the
    model's device unless `device` is given (then on a copy there; `model` is not moved)."""
    here = next(model.parameters()).device
    device = here if device is None else resolve_device(device)
    if device != here:
        model = copy.deepcopy(model).to(device)
    scores, weights = sample_scores(model, data, device, task)
    if meter is not None:
        meter.add_eval(len(data))
    return float(scores.sum() / weights.sum().clamp(min=1e-12))


def set_dropout_generator(model: nn.Module, gen: torch.Generator | None) -> int:
    """Make every module of `model` with a `dropout_generator` attribute (the H-LSTM's
    gates) draw its dropout masks from `gen`; returns how many it set. A generator is
    not state: it is neither saved nor loaded with the weights."""
    mods = [m for m in model.modules() if hasattr(m, "dropout_generator")]
    for m in mods:
        m.dropout_generator = gen
    return len(mods)


class Trainer:
    """Trains one masked model for one update; counts every sample pass.

    Random draws (shuffling, augmentation, dropout) come from generators seeded by
    `seed`, never from the global RNG.
    """

    def __init__(self, model: nn.Module, device: torch.device, cfg: TrainConfig,
                 meter: CostMeter, task: Task = CLASSIFICATION, seed: int = 0,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.model = model.to(device)
        if uses_channels_last(cfg, self.model, device):
            # before the masks are gathered: converting replaces buffers (the masks)
            self.model.to(memory_format=torch.channels_last)
        self.masks = Masks(self.model)
        self.device, self.cfg, self.meter, self.task = device, cfg, meter, task
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.cpu_gen = torch.Generator().manual_seed(seed) if device.type != "cpu" else self.gen
        # dropout has its own stream, so adding dropout to a model leaves shuffling alone
        self.dropout_gen = torch.Generator(device=device).manual_seed(seed + 1)
        set_dropout_generator(self.model, self.dropout_gen)
        self.should_stop = should_stop
        self.opt = _optimizer(self.model, cfg)
        # the forward of training steps and gradient epochs (evaluation stays eager); the
        # compiled module shares the model's parameters, so masks and optimiser act on both
        self.forward = (self.model if cfg.compile is None
                        else torch.compile(self.model, mode=cfg.compile))
        self.schedule = CosineSchedule(cfg.lr, cfg.lr * cfg.final_lr, 0)

    # -- schedule ---------------------------------------------------------------

    def batch_size(self, n: int) -> int:
        """The configured batch size, cut so an epoch of n samples has at least 16 steps
        (a few hundred samples would otherwise get 2-3 steps an epoch)."""
        return max(1, min(self.cfg.batch_size, n // MIN_STEPS_PER_EPOCH))

    def steps(self, n: int, fraction: float = 1.0) -> int:
        """Optimiser steps of one pass over `fraction` of `n` samples."""
        return math.ceil(max(1, int(round(n * fraction))) / self.batch_size(n))

    def plan(self, steps: int, peak: float | None = None) -> None:
        """Start one cosine schedule over the next `steps` optimiser steps."""
        peak = self.cfg.lr if peak is None else peak
        self.schedule = CosineSchedule(peak, peak * self.cfg.final_lr, int(steps))

    @property
    def lr(self) -> float:
        """The learning rate of the next scheduled step."""
        return self.schedule.lr()

    # -- passes -----------------------------------------------------------------

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Abandoned("update abandoned on request")

    def _batches(self, data: Samples, fraction: float = 1.0):
        gen = self.gen if data.device.type == self.device.type else self.cpu_gen
        for idx in data.batch_indices(self.batch_size(len(data)), gen, fraction):
            batch = data.gather(idx, self.device)
            yield self.task.augment(batch, self.gen) if self.cfg.augment else batch, len(idx)

    def train_epoch(self, data: Samples, fraction: float = 1.0,
                    lr: float | None = None) -> float:
        """One pass (or `fraction` of one) over `data`; returns the mean loss.

        Steps follow the schedule, or run at the constant rate `lr` when given
        (pruning's retraining), which leaves the schedule where it is.
        """
        self.check_stop()
        self.model.train()
        total, count = torch.zeros((), device=self.device), 0
        for batch, n in self._batches(data, fraction):
            rate = self.schedule.lr() if lr is None else lr
            for group in self.opt.param_groups:
                group["lr"] = rate
            loss = self.task.loss(self.forward, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.masks.mask_grads()
            if self.cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.masks.apply()
            if lr is None:
                self.schedule.taken += 1
            total += loss.detach() * n
            count += n
            self.meter.add(n)
        mean = float(total) / max(count, 1)  # the one host sync of the epoch
        if not math.isfinite(mean):
            raise TrainingDiverged(f"training loss became {mean}")
        return mean

    def mean_gradients(self, data: Samples) -> dict[str, torch.Tensor]:
        """Mean dense gradient of every masked weight over one epoch, with updates paused."""
        self.check_stop()
        self.model.train()
        sums = [torch.zeros_like(layer.weight) for layer in self.masks]
        batches = 0
        for batch, n in self._batches(data):
            self.model.zero_grad(set_to_none=True)
            self.task.loss(self.forward, batch).backward()
            torch._foreach_add_(sums, [layer.weight.grad for layer in self.masks])
            batches += 1
            self.meter.add(n)
        self.model.zero_grad(set_to_none=True)
        torch._foreach_div_(sums, float(max(batches, 1)))
        return {layer.name: s for layer, s in zip(self.masks, sums)}

    def scores(self, data: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (score, weight) on `data` (forward passes, counted apart)."""
        self.meter.add_eval(len(data))
        return sample_scores(self.model, data, self.device, self.task)

    def evaluate(self, data: Samples) -> float:
        s, w = self.scores(data)
        return float(s.sum() / w.sum().clamp(min=1e-12))

    # -- state ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A copy of the model's and the optimiser's state (for rolling a step back)."""
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "opt": copy.deepcopy(self.opt.state_dict())}

    def restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
