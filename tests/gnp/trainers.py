"""A check the training tests share: two trainers of one model train alike."""

import pytest
import torch

from gnp.data import Data
from gnp.train import Trainer


def assert_train_alike(ts: list[Trainer], data: Data, epochs: int = 2, rtol: float = 1e-4,
                       atol: float = 1e-5) -> None:
    """Two trainers of one model, given the same random masks, train `epochs` epochs on
    `data` (on the trainers' device) to the same losses and weights (float tolerance),
    and the second holds dormant weights at exactly zero."""
    gen = torch.Generator().manual_seed(0)
    keep = {layer.name: (torch.rand(layer.mask.shape, generator=gen) < 0.5).to(ts[0].device)
            for layer in ts[0].masks}
    losses = []
    for t in ts:
        t.masks.set(keep)
        t.plan(epochs * t.steps(len(data)))
        losses.append([t.train_epoch(data) for _ in range(epochs)])
    assert losses[1] == pytest.approx(losses[0], rel=rtol)
    for a, b in zip(ts[0].masks, ts[1].masks):
        assert torch.allclose(a.weight, b.weight, atol=atol)
        assert not b.weight[~b.mask].any()
        assert b.weight[b.mask].abs().sum() > 0
