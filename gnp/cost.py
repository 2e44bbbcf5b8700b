"""Training cost, counted in sample passes and reported as all-data-epoch equivalents.

A sample pass is one sample through forward and backward (training, or the
gradient accumulation of growth). Forward-only validation passes are counted
apart and are not part of the training cost. Example: 15 epochs on a chunk one
tenth the size of all data = 15 * N/10 passes = 1.5 all-data epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Cost", "CostMeter", "epoch_equivalents"]


def epoch_equivalents(sample_passes: int, all_data_size: int) -> float:
    """Sample passes expressed as epochs over all data."""
    if all_data_size <= 0:
        raise ValueError(f"all_data_size must be positive, got {all_data_size}")
    return sample_passes / all_data_size


@dataclass(frozen=True)
class Cost:
    sample_passes: int
    epochs: float  # all-data-epoch equivalents
    wall_seconds: float
    device: str
    eval_passes: int = 0
    phases: tuple[tuple[str, int], ...] = ()  # (phase, sample passes), in order


@dataclass
class CostMeter:
    """Counts sample passes per phase while an update runs."""

    device: str
    phase: str = "train"
    sample_passes: int = 0
    eval_passes: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, n: int) -> None:
        self.sample_passes += n
        self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + n

    def add_eval(self, n: int) -> None:
        self.eval_passes += n

    def finish(self, all_data_size: int) -> Cost:
        return Cost(
            sample_passes=self.sample_passes,
            epochs=epoch_equivalents(self.sample_passes, all_data_size),
            wall_seconds=time.perf_counter() - self.started,
            device=self.device,
            eval_passes=self.eval_passes,
            phases=tuple(self.by_phase.items()),
        )
