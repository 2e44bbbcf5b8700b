"""Affine distortions (LeCun et al. 1998) for image inputs, on the inputs' device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AffineConfig", "affine_distort"]


@dataclass(frozen=True)
class AffineConfig:
    """Largest random rotation, scale, shear and translation (fraction of the side)."""

    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_shear: float = 0.1
    max_translate: float = 0.1


def affine_distort(x: torch.Tensor, cfg: AffineConfig = AffineConfig(),
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """A random affine distortion per image. x: (B, C, H, W); other inputs are returned as is."""
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
