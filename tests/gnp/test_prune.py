import pytest
import torch
from torch import nn

from gnp.cost import CostMeter
from gnp.data import Data
from gnp.masks import Masks
from gnp.prune import (PruneConfig, _Checks, _snapshot, _verdict, iterative_prune, keep_connected,
                       prune_step, select_prune)
from gnp.train import TrainConfig, Trainer


def test_select_prune_removes_the_smallest_active_magnitudes():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [-0.05, 0.3, 1.0, -0.2]])
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    new = select_prune(w, mask, beta=30)  # 7 active -> remove 2: -0.05 and -0.1
    assert new.tolist() == [[True, False, False, True], [False, True, True, True]]
    with pytest.raises(ValueError, match="beta"):
        select_prune(w, mask, beta=0)


def _hidden_units_connected(masks: Masks) -> bool:
    layers = list(masks)
    for i, layer in enumerate(layers):
        if not layer.mask.flatten(1).any(1).all():  # every unit keeps an input
            return False
        if i > 0 and not layer.mask.transpose(0, 1).flatten(1).any(1).all():  # and an output
            return False
    return True


@pytest.mark.parametrize("conv", [False, True])
def test_recoverable_pruning_never_disconnects_a_neuron(conv):
    torch.manual_seed(1)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    else:
        model = nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 8), nn.Linear(8, 3))
    masks = Masks.attach(model)
    for _ in range(60):  # far past where unconstrained pruning empties rows and columns
        prune_step(masks, beta=40, recoverable=True)
        assert _hidden_units_connected(masks)
    # Unconstrained pruning does disconnect them, so the check above can fail.
    prune_step(masks, beta=90, recoverable=False)
    for _ in range(5):
        prune_step(masks, beta=90, recoverable=False)
    assert not _hidden_units_connected(masks)


def test_keep_connected_only_re_adds_the_largest_connection():
    w = torch.tensor([[0.1, -0.9, 0.2], [0.3, 0.1, 0.05]])
    old = torch.ones(2, 3, dtype=torch.bool)
    new = torch.tensor([[False, False, False], [True, False, False]])
    kept = keep_connected(old, new, w, first_layer=True)
    assert kept.tolist() == [[False, True, False], [True, False, False]]
    kept = keep_connected(old, new, w, first_layer=False)  # column 2 also needs an output
    assert kept.tolist() == [[False, True, True], [True, False, False]]


def test_iterative_prune_keeps_accuracy_at_reference_and_rolls_back():
    torch.manual_seed(0)
    x = torch.randn(400, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    train, val = Data(x[:300], y[:300]), Data(x[300:], y[300:])
    model = nn.Sequential(nn.Linear(10, 32), nn.LeakyReLU(0.01), nn.Linear(32, 2))
    Masks.attach(model)
    t = Trainer(model, torch.device("cpu"), TrainConfig(batch_size=32, augment=False), CostMeter("cpu"))
    t.plan(20 * t.steps(len(train)))
    for _ in range(20):
        t.train_epoch(train)
    reference = t.evaluate(val)
    before = t.masks.count().active
    report = iterative_prune(t, train, val, PruneConfig(beta=20, retrain_epochs=0.5, noise_z=0.0,
                                                                   correction=0.0),
                             base_lr=0.05)
    assert report.reference_accuracy == reference
    assert t.evaluate(val) >= reference  # z = 0: never below the pre-pruning model
    assert report.final_accuracy == t.evaluate(val)
    assert report.active_after < before
    assert report.stopped_by in {"accuracy", "no_progress", "max_iterations"}
    assert _hidden_units_connected(t.masks)
    assert report.iterations <= report.iterations_tried


def _trained(seed: int = 0) -> tuple[Trainer, Data, Data]:
    torch.manual_seed(seed)
    x = torch.randn(400, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.LeakyReLU(0.01), nn.Linear(32, 2))
    Masks.attach(model)
    t = Trainer(model, torch.device("cpu"), TrainConfig(batch_size=32, augment=False), CostMeter("cpu"))
    train = Data(x[:300], y[:300])
    t.plan(10 * t.steps(len(train)))
    for _ in range(10):
        t.train_epoch(train)
    return t, train, Data(x[300:], y[300:])


def test_held_out_samples_are_disjoint_from_the_checking_ones():
    ref = torch.ones(101)
    checks = _Checks(ref, torch.ones(101), PruneConfig(holdout=0.5))
    assert int(checks.hold.sum()) == 50 or int(checks.hold.sum()) == 51
    assert not bool(_Checks(ref, torch.ones(101), PruneConfig(holdout=0.0)).hold.any())


def test_verdict_serves_the_sparsest_snapshot_that_passes_on_held_out_samples():
    t, _, val = _trained()
    ref, w = t.scores(val)
    checks = _Checks(ref, w, PruneConfig(noise_z=0.0, correction=0.0))
    good = _snapshot(t, 0)
    with torch.no_grad():  # a sparser model that has lost its accuracy
        for layer in t.masks:
            layer.mask[:] = False
            layer.mask[0, 0] = True
            layer.weight.mul_(layer.mask)
    broken = _snapshot(t, 7)
    assert not checks.held_out(t.scores(val)[0])
    assert _verdict(t, val, [good, broken], checks) is good
    assert t.masks.count().active == good.active  # the served model is the snapshot's
    assert t.evaluate(val) == float(ref.sum() / w.sum())
    t.model.load_state_dict(broken.state)
    same = _snapshot(t, 7)
    t.model.load_state_dict(good.state)
    assert _verdict(t, val, [good, _snapshot(t, 3)], checks).iteration == 3  # passes: kept
    assert same.active < good.active
