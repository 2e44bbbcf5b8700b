import pytest
import torch
from torch import nn

from gnp.cost import CostMeter
from gnp.data import Data
from gnp.grow import grow_by_gradient, select_growth
from gnp.masks import Masks
from gnp.train import TrainConfig, Trainer


def test_select_growth_takes_dormant_at_or_above_layer_percentile():
    grad = torch.tensor([[0.1, -0.9, 0.5, 0.2], [0.0, 0.7, -0.3, 0.05]])
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    # 50th percentile over all 8 |g| = the 4th smallest = 0.2.
    add = select_growth(grad, mask, alpha=50)
    assert add.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert not (add & mask).any()  # only dormant connections grow


def test_select_growth_alpha_bounds_and_extremes():
    grad, mask = torch.randn(10, 10), torch.zeros(10, 10, dtype=torch.bool)
    assert select_growth(grad, mask, 100).sum() == 1  # only the largest
    assert select_growth(grad, mask, 0).sum() == 100
    with pytest.raises(ValueError, match="alpha"):
        select_growth(grad, mask, 101)


def test_grow_initialises_new_weights_to_lr_times_gradient_and_keeps_old():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    masks = Masks.attach(model)
    masks.set({"0": torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)})
    old = model[0].weight.detach().clone()
    grad = torch.arange(12, dtype=torch.float32).view(3, 4) - 6  # |g| distinct, largest at ends
    expected = select_growth(grad, masks.layers[0].mask.clone(), 75)
    step = grow_by_gradient(masks, {"0": grad}, alpha=75, lr=0.1)
    w, m = model[0].weight.detach(), masks.layers[0].mask
    assert step.grown == int(expected.sum()) > 0
    assert step.density_before == pytest.approx(3 / 12)
    assert step.density_after == pytest.approx((3 + step.grown) / 12)
    assert torch.allclose(w[expected], -0.1 * grad[expected])  # lr x gradient, descent direction
    was_active = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(w[was_active], old[was_active])
    assert torch.equal(m, was_active | expected)


def test_mean_gradients_pause_updates_and_average_over_the_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    Masks.attach(model)
    data = Data(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meter = CostMeter("cpu")
    t = Trainer(model, torch.device("cpu"), TrainConfig(batch_size=16, augment=False), meter)
    grads = t.mean_gradients(data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert meter.sample_passes == 64  # a full epoch, counted as training cost
    model.zero_grad()
    nn.functional.cross_entropy(model(data.x), data.y).backward()
    # Equal batches: the mean of batch-mean gradients is the full-batch gradient.
    assert torch.allclose(grads["1"], model[1].weight.grad, atol=1e-6)
