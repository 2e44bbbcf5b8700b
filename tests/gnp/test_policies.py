"""A short end-to-end protocol on the scikit-learn digits, and the update contract."""

from dataclasses import replace

import pytest
import torch

import gnp
from gnp.data import incremental_split
from gnp.policies import update
from gnp.prune import recovered
from gnp.train import TrainConfig, sample_scores

SMALL = replace(gnp.Schedule(new_epochs=3, all_epochs=6, baseline_epochs=18, grow_every=3),
                train=TrainConfig(batch_size=32),
                prune=gnp.PruneConfig(beta=5, retrain_epochs=1.0, max_iterations=40))


@pytest.fixture(scope="module")
def digits():
    ds = gnp.load_dataset("digits")
    chunks, val = incremental_split(ds.train, 3, 200, seed=0)
    return ds, chunks, val


def _build():
    return gnp.build_model("lenet-300-100", (1, 8, 8), 10)


@pytest.fixture(scope="module")
def protocol(digits):
    ds, chunks, val = digits
    carry, results = {"ours": None, "tfs": None}, []
    for k in range(1, len(chunks) + 1):
        all_data = gnp.Data.concat(chunks[:k])
        for method in carry:
            r = update(method, carry[method], new=chunks[k - 1], all=all_data, val=val,
                       schedule=SMALL, build=_build, device="cpu", seed=k)
            carry[method] = r.carry
            results.append((k, method, r, gnp.evaluate(r.model, ds.test)))
    return results


def test_protocol_learns_and_ours_costs_less_than_training_from_scratch(protocol):
    last = {m: (r, acc) for k, m, r, acc in protocol if k == 3}
    ours, ours_acc = last["ours"]
    tfs, tfs_acc = last["tfs"]
    assert ours_acc > 0.85 and tfs_acc > 0.85
    assert ours.params.active < ours.params.dense  # pruned
    # 3 new-chunk epochs on 1/3 of the data + 6 all-data epochs vs 18: about half.
    assert ours.cost.epochs < 0.7 * tfs.cost.epochs


def test_cost_counts_every_training_and_growth_pass(protocol, digits):
    _, chunks, _ = digits
    k, method, r, _ = next(p for p in protocol if p[0] == 2 and p[1] == "ours")
    n_new, n_all = len(chunks[1]), len(chunks[0]) + len(chunks[1])
    phases = dict(r.cost.phases)
    # Every epoch of a growth phase is one full pass, growth epochs included.
    assert phases["grow-new"] == SMALL.new_epochs * n_new
    assert phases["grow-all"] == SMALL.all_epochs * n_all
    assert r.cost.sample_passes == sum(phases.values())
    assert r.cost.epochs == pytest.approx(r.cost.sample_passes / n_all)
    assert r.cost.wall_seconds > 0 and r.cost.device == "cpu"


def test_update_does_not_modify_its_input_and_validates_arguments(digits):
    ds, chunks, val = digits
    model = _build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update("ours", model, new=chunks[0], all=chunks[0], val=val,
           schedule=replace(SMALL, new_epochs=1, all_epochs=1), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown method"):
        update("sgd", model, new=chunks[0], all=chunks[0], val=val)
    with pytest.raises(ValueError, match="build="):
        update("tfs", None, new=chunks[0], all=chunks[0], val=val)


def test_should_stop_abandons_the_update(digits):
    _, chunks, val = digits
    with pytest.raises(gnp.Abandoned):
        update("ours", None, new=chunks[0], all=chunks[0], val=val, schedule=SMALL,
               build=_build, device="cpu", should_stop=lambda: True)


def test_non_finite_loss_is_reported(digits):
    _, chunks, val = digits
    bad = gnp.Data(chunks[0].x.clone(), chunks[0].y)
    bad.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(gnp.TrainingDiverged):
        update("tfs", None, new=bad, all=bad, val=val, build=_build, device="cpu",
               schedule=replace(SMALL, train=TrainConfig(batch_size=2048, augment=False)))


def test_nonrecoverable_export_is_smaller_and_separate(digits):
    ds, chunks, val = digits
    r = update("ours", None, new=chunks[0], all=chunks[0], val=val, build=_build, device="cpu",
               schedule=SMALL.with_nonrecoverable(tolerance=0.02))
    assert r.compact is not None and r.compact is not r.model
    assert r.compact_params.active < r.params.active
    assert r.compact_val_accuracy == pytest.approx(gnp.evaluate(r.compact, val))
    # Within the tolerance, beyond the paired-noise allowance, of the recoverable model.
    ref, w = sample_scores(r.model, val)
    new, _ = sample_scores(r.compact, val)
    assert recovered(ref, new, w, tolerance=0.02, z=SMALL.prune.noise_z)


def test_shrink_perturb_scales_weights_and_perturbs_only_active_connections():
    from gnp.masks import Masks
    from gnp.policies import shrink_perturb

    model = _build()
    masks = Masks.attach(model)
    layer = next(iter(masks))
    layer.mask[:, ::2] = False
    with torch.no_grad():
        layer.weight.mul_(layer.mask)  # a pruned model: masked weights at zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shrink_perturb(model, 0.5, 0.0, torch.Generator().manual_seed(0))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n] * 0.5)
    shrink_perturb(model, 1.0, 0.01, torch.Generator().manual_seed(0))
    delta = layer.weight - before[f"{layer.name}.weight"] * 0.5
    assert torch.all(delta[~layer.mask] == 0) and torch.all(layer.weight[~layer.mask] == 0)
    assert 0.005 < delta[layer.mask].std() < 0.02
    biases = [n for n in before if n.endswith("bias")]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n] * 0.5) for n in biases)
    with pytest.raises(ValueError):
        shrink_perturb(model, 0.0, 0.01, torch.Generator())


ONE_EPOCH = replace(SMALL, new_epochs=0, all_epochs=0, baseline_epochs=1,
                    prune=gnp.PruneConfig(max_iterations=0))


def _nft_first_and_two_updates(digits, **variant):
    """A one-epoch first NFT model, then its next update with ONE_EPOCH and with `variant`."""
    _, chunks, val = digits
    first = update("nft", None, new=chunks[0], all=chunks[0], val=val, schedule=ONE_EPOCH,
                   build=_build, device="cpu", seed=1)
    plain, varied = (update("nft", first.carry, new=chunks[1], all=chunks[1], val=val,
                            schedule=replace(ONE_EPOCH, **v), device="cpu", seed=2)
                     for v in ({}, variant))
    return first, plain, varied


def test_shrink_applies_to_updates_of_a_trained_model_only(digits):
    _, chunks, val = digits
    first, plain, shrunk = _nft_first_and_two_updates(digits, shrink=0.5)
    fresh = update("nft", None, new=chunks[0], all=chunks[0], val=val, build=_build,
                   schedule=replace(ONE_EPOCH, shrink=0.5), device="cpu", seed=1)
    w = lambda r: r.model.fc1.weight  # noqa: E731
    assert torch.equal(w(fresh), w(first))  # training from scratch: nothing to shrink
    assert not torch.allclose(w(plain), w(shrunk))


def test_an_update_of_a_trained_model_peaks_at_the_training_lr_unless_told(digits):
    first, default, pinned = _nft_first_and_two_updates(digits, incremental_lr=0.01)
    assert first.peak_lr == default.peak_lr == ONE_EPOCH.train.lr
    assert pinned.peak_lr == 0.01
    assert not torch.allclose(default.model.fc1.weight, pinned.model.fc1.weight)


def test_carry_unpruned_carries_the_grown_model_and_serves_a_pruned_copy(digits):
    ds, chunks, val = digits
    small = replace(SMALL, new_epochs=1, all_epochs=2, baseline_epochs=2, grow_every=1,
                    prune=gnp.PruneConfig(beta=5, retrain_epochs=0.5, max_iterations=3))
    first = update("ours", None, new=chunks[0], all=chunks[0], val=val, schedule=small,
                   build=_build, device="cpu", seed=1)
    assert first.carry is first.model  # the paper's: the pruned model carries on
    r = update("ours", first.carry, new=chunks[1], all=gnp.Data.concat(chunks[:2]), val=val,
               schedule=replace(small, carry_unpruned=True), device="cpu", seed=2)
    assert r.carry is not r.model
    assert count_active(r.carry) > count_active(r.model), r.prune  # pruning took the copy down


def count_active(model):
    return gnp.count_parameters(model).active
