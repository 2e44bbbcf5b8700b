"""Unit masks, CGaP growth and pruning, and the cgap update policy."""

from dataclasses import replace

import pytest
import torch

import gnp
from gnp.compact import compact_model
from gnp.data import incremental_split
from gnp.masks import Masks
from gnp.policies import update
from gnp.train import CostMeter, TrainConfig, Trainer
from gnp.units import (UnitMasks, grow_units, growth_count, propose_candidates,
                       select_unit_growth, select_unit_prune, seed_units, unit_prune_step)


def _seeded(name, shape, share=0.3, seed=0):
    model = gnp.build_model(name, shape, 10, seed=seed)
    masks, units = Masks(model), UnitMasks.attach(model)
    seed_units(units, masks, share, torch.Generator().manual_seed(seed))
    return model, masks, units


def _consumer_inputs(model, units):
    """What each group's consumers read, per unit: (B, units, ...), via forward pre-hooks."""
    seen, hooks = {}, []
    for g in units:
        for name, m, k in g.consumers:
            def hook(_, args, key=(g.name, name), n=len(g), k=k):
                x = args[0]
                seen[key] = x.reshape(x.shape[0], n, -1) if k > 1 or x.dim() == 2 else x
            hooks.append(m.register_forward_pre_hook(hook))
    return seen, hooks


@pytest.mark.parametrize("name,shape", [("lenet-300-100", (1, 8, 8)), ("lenet-5", (1, 16, 16)),
                                        ("resnet-18", (3, 8, 8))])
def test_dormant_units_output_zero_and_get_no_gradient_while_training(name, shape):
    model, masks, units = _seeded(name, shape)
    x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
    t = Trainer(model, torch.device("cpu"), TrainConfig(lr=0.1, batch_size=8), CostMeter("cpu"))
    data = gnp.Data(x, y)
    t.train_epoch(data)  # 16 steps: momentum and weight decay have had a chance to move them
    seen, hooks = _consumer_inputs(model, units)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for g in units:
        off = ~g.mask
        assert off.any() and g.mask.any()
        for c, m, k in g.consumers:  # every reader (a residual stream: every block's) sees zeros
            x = seen[g.name, c]
            assert torch.equal(x[:, off], torch.zeros_like(x[:, off]))
            assert x[:, g.mask].abs().sum() > 0
            cols = off.repeat_interleave(k)
            assert not m.weight[:, cols].any() and not m.weight.grad[:, cols].any()
        for _, prod, norm in g.writers:  # every writer of a tied group
            assert torch.equal(prod.weight[off], torch.zeros_like(prod.weight[off]))
            assert not prod.weight.grad[off].any()  # no gradient leaks into dormant units
            if prod.bias is not None:
                assert not prod.bias[off].any() and not prod.bias.grad[off].any()
            if norm is not None:
                assert not norm.weight[off].any() and not norm.bias[off].any()
                assert not norm.weight.grad[off].any() and not norm.bias.grad[off].any()
    for h in hooks:
        h.remove()


def test_select_unit_growth_picks_the_highest_scored_dormant_units():
    score = torch.tensor([9.0, 1.0, 5.0, 7.0, 3.0, 8.0])
    mask = torch.tensor([True, False, False, False, False, False])
    add = select_unit_growth(score, mask, 2)
    assert add.tolist() == [False, False, False, True, False, True]  # 8 and 7; 9 is active
    assert select_unit_growth(score, mask, 10).sum() == 5  # capped at the dormant units
    assert growth_count(active=10, total=12, rate=0.25) == 2
    assert growth_count(active=1, total=12, rate=0.01) == 1


def test_grow_units_activates_the_units_with_the_largest_outgoing_gradient():
    model, masks, units = _seeded("lenet-300-100", (1, 8, 8), share=0.1)
    g = units.groups[0]  # fc1, read by fc2
    dormant = (~g.mask).nonzero().squeeze(1)
    favourites = dormant[[3, 7, 11]]
    grads = {layer.name: torch.zeros_like(layer.weight) for layer in masks}
    grads["fc2"][:, favourites] = torch.tensor([1.0, 2.0, 3.0])
    grads["fc3"][:, 0] = 1.0  # the other group: an active unit's gradient does not count
    before = g.mask.clone()
    step = grow_units(units, masks, grads, rate=0.1, lr=0.5)
    grown = (g.mask & ~before).nonzero().squeeze(1)
    assert step.grown["fc1"] == 3 == len(grown)  # ceil(0.1 x 30 active)
    assert set(grown.tolist()) == set(favourites.tolist())
    rows = units.groups[1].mask  # fc2's active units; the dormant ones' rows stay zero
    assert torch.allclose(model.fc2.weight[rows, favourites[2]], torch.full((int(rows.sum()),), -1.5))
    assert not model.fc2.weight[~rows, favourites[2]].any()


def test_resnet_stream_channels_grow_in_every_writer_by_the_gradient_of_every_reader():
    """A residual-stream group (stage 2: the projection and both blocks' conv2 write it;
    block 3's conv1, block 4's conv1 and projection read it): candidates leave the output
    unchanged, and the grown channels are the ones with the largest outgoing gradient,
    whichever reader it comes from."""
    model, masks, units = _seeded("resnet-18", (1, 8, 8), share=0.25)
    g = next(g for g in units if g.name == "blocks.2.shortcut.0")
    assert [w for w, _, _ in g.writers] == ["blocks.2.shortcut.0", "blocks.2.conv2", "blocks.3.conv2"]
    assert [c for c, _, _ in g.consumers] == ["blocks.3.conv1", "blocks.4.conv1", "blocks.4.shortcut.0"]
    x = torch.randn(16, 1, 8, 8)
    model.train()
    before = model(x)
    propose_candidates(units, torch.Generator().manual_seed(1))
    assert torch.equal(model(x), before)  # zero outgoing weights: the loss is unchanged
    dormant = (~g.mask).nonzero().squeeze(1)
    a, b, c = dormant[[2, 5, 9]].tolist()
    grads = {layer.name: torch.zeros_like(layer.weight) for layer in masks}
    grads["blocks.3.conv1"][:, a] = 1.0
    grads["blocks.4.shortcut.0"][:, b] = 2.0
    grads["blocks.4.conv1"][:, c] = 3.0
    old = g.mask.clone()
    step = grow_units(units, masks, grads, rate=0.08, lr=0.5)  # ceil(0.08 x 32) = 3
    grown = (g.mask & ~old).nonzero().squeeze(1).tolist()
    assert step.grown[g.name] == 3 and sorted(grown) == sorted([a, b, c])
    for _, prod, norm in g.writers:  # every writer keeps its candidate row and BN scale 1
        assert prod.weight[grown].flatten(1).abs().sum(1).gt(0).all()
        assert torch.equal(norm.weight[grown], torch.ones(3))
        assert not prod.weight[~g.mask].any()  # the candidates not grown are zero again
    reader = model.get_submodule("blocks.4.conv1")  # its own active filters read the channel
    rows = next(h for h in units if h.name == "blocks.4.conv1").mask
    assert torch.equal(reader.weight[rows, c], torch.full_like(reader.weight[rows, c], -1.5))
    assert not reader.weight[~rows].any()
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_select_unit_prune_removes_the_lowest_scored_and_never_the_last():
    score = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.0])
    mask = torch.tensor([True, True, True, True, False])
    assert select_unit_prune(score, mask, 50).tolist() == [True, False, True, False, False]
    assert select_unit_prune(score, mask, 1).tolist() == [True, False, True, True, False]
    one = torch.tensor([False, True, False, False, False])
    assert torch.equal(select_unit_prune(score, one, 99), one)


@pytest.mark.parametrize("name,shape", [("lenet-5", (1, 16, 16)), ("resnet-18", (1, 8, 8))])
def test_structured_pruning_keeps_every_layer_nonempty(name, shape):
    model, masks, units = _seeded(name, shape, share=1.0)
    for _ in range(30):
        if unit_prune_step(units, masks, 60.0) == 0:
            break
    counts = units.counts()
    assert all(active == 1 for active, _ in counts.values()), counts
    assert unit_prune_step(units, masks, 60.0) == 0  # nothing left to take
    model.eval()
    assert torch.isfinite(model(torch.randn(2, *shape))).all()


SMALL = replace(gnp.Schedule(new_epochs=3, all_epochs=3, baseline_epochs=9, grow_every=3),
                train=TrainConfig(batch_size=32),
                prune=gnp.PruneConfig(beta=10, retrain_epochs=0.5, max_iterations=8))


def test_cgap_update_grows_then_prunes_units_and_learns():
    ds = gnp.load_dataset("digits")
    chunks, val = incremental_split(ds.train, 2, 200, seed=0)
    build = lambda: gnp.build_model("lenet-300-100", (1, 8, 8), 10)  # noqa: E731
    carry, pre = None, {}
    for k in (1, 2):
        r = update("cgap", carry, new=chunks[k - 1], all=gnp.Data.concat(chunks[:k]), val=val,
                   schedule=SMALL, build=build, device="cpu", seed=k,
                   observe=lambda s, m: pre.__setitem__(k, UnitMasks(m).counts()))
        carry = r.carry
        assert r.growth and all(s.grown > 0 for s in r.growth)
    counts = UnitMasks(r.model).counts()
    assert counts["fc1"][0] < pre[2]["fc1"][0]  # pruning removed whole units
    assert gnp.evaluate(r.model, ds.test) > 0.8
    compact = compact_model(r.model)
    assert compact.fc1.out_features == counts["fc1"][0]
    assert gnp.evaluate(compact, ds.test) == gnp.evaluate(r.model, ds.test)
