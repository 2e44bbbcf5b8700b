"""Physical compaction (gnp.compact) and ResNet-18."""

import pytest
import torch
from torch import nn

import gnp
from gnp.compact import compact_model, count_macs, kept_units, load_dense, save_dense
from gnp.masks import MASK, Masks
from gnp.units import UNIT_MASK, UnitMasks, seed_units

CASES = [("lenet-300-100", (1, 28, 28)), ("lenet-5", (1, 28, 28)), ("resnet-18", (3, 8, 8))]


def _random_bn_stats(model, gen):
    """Eval-mode batch norm that is not the identity, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.mul_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _no_masks(model):
    return not any(n.endswith((MASK, UNIT_MASK)) for n, _ in model.named_buffers())


@pytest.mark.parametrize("name,shape", CASES)
def test_compact_cgap_model_equals_masked_model_and_is_smaller(name, shape):
    gen = torch.Generator().manual_seed(1)
    model = gnp.build_model(name, shape, 10, seed=1)
    _random_bn_stats(model, gen)
    masks, units = Masks(model), UnitMasks.attach(model)
    seed_units(units, masks, 0.3, gen)
    _random_bn_stats(model, gen)  # dormant channels' BN is zero; their stats are not
    units.sync(masks)
    model.eval()
    small = compact_model(model)
    x = torch.randn(5, *shape, generator=gen)
    assert torch.allclose(small(x), model(x), atol=1e-5, rtol=1e-4)
    assert _no_masks(small)
    for g in units:  # every layer holds exactly its active units, every writer of a tied group
        for w, _, norm in g.writers:
            assert small.get_submodule(w).weight.shape[0] == g.active
        for c, m, k in g.consumers:
            assert small.get_submodule(c).weight.shape[1] == g.active * k
    dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.5 * dense
    assert count_macs(small, shape) < count_macs(gnp.build_model(name, shape, 10), shape)


@pytest.mark.parametrize("name,shape", CASES)
def test_compact_connection_masked_model_drops_disconnected_units_exactly(name, shape):
    """ours' models: units with no outputs go; units with no inputs go where their constant
    output folds into the next layer's bias (Linear, unpadded conv with a bias)."""
    gen = torch.Generator().manual_seed(2)
    model = gnp.build_model(name, shape, 10, seed=2)
    _random_bn_stats(model, gen)
    masks = Masks(model)
    new = {layer.name: torch.rand(layer.mask.shape, generator=gen) < 0.5 for layer in masks}
    mods = dict(model.named_modules())
    for prod, _, cons, tied in gnp.units.unit_layout(model):
        n = mods[prod].weight.shape[0]
        for w in [prod, *(t for t, _ in tied)]:
            new[w][: n // 4] = False  # no inputs
        for c in cons:
            k = mods[c].weight.shape[1] // n
            new[c][:, n // 4 * k: n // 2 * k] = False  # no outputs
    masks.set(new)
    model.eval()
    small = compact_model(model)
    x = torch.randn(5, *shape, generator=gen)
    assert torch.allclose(small(x), model(x), atol=1e-5, rtol=1e-4)
    assert _no_masks(small)
    keep = kept_units(model)
    for prod, _, cons, tied in gnp.units.unit_layout(model):
        n = mods[prod].weight.shape[0]
        assert not keep[prod][n // 4: n // 2].any()  # no outputs: always removed
        foldable = not tied and all(getattr(mods[c], "bias", None) is not None and
                                    getattr(mods[c], "padding", 0) in (0, (0, 0)) for c in cons)
        assert bool(keep[prod][: n // 4].any()) != foldable  # a residual stream never folds
        for w in [prod, *(t for t, _ in tied)]:
            assert small.get_submodule(w).weight.shape[0] == int(keep[prod].sum())


def test_save_and_load_a_compact_model(tmp_path):
    model = gnp.build_model("lenet-5", (1, 28, 28), 10)
    masks, units = Masks(model), UnitMasks.attach(model)
    seed_units(units, masks, 0.5, torch.Generator().manual_seed(0))
    small = compact_model(model)
    size = save_dense(small, tmp_path / "m.safetensors")
    assert size == (tmp_path / "m.safetensors").stat().st_size
    loaded = load_dense(gnp.build_model("lenet-5", (1, 28, 28), 10, seed=5), tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), small(x))


def _conv(c_in, c_out, k):
    return c_in * c_out * k * k


def test_resnet18_parameter_count_matches_the_architecture():
    """Stem 3x3 conv + BN, four stages of two BasicBlocks (64-128-256-512), 1x1 projections
    where a stage starts with stride 2, a Linear; convolutions have no bias; BN has 2 per
    channel."""
    def count(c, classes):
        total = _conv(c, 64, 3) + 2 * 64
        c_in = 64
        for stage, w in enumerate((64, 128, 256, 512)):
            for block in range(2):
                total += _conv(c_in, w, 3) + 2 * w + _conv(w, w, 3) + 2 * w
                if stage > 0 and block == 0:
                    total += _conv(c_in, w, 1) + 2 * w
                c_in = w
        return total + 512 * classes + classes

    for c, classes in ((3, 10), (1, 10), (3, 100)):
        model = gnp.build_model("resnet-18", (c, 32, 32), classes)
        assert sum(p.numel() for p in model.parameters()) == count(c, classes)
    assert count(3, 1000) - _conv(3, 64, 3) + _conv(3, 64, 7) == 11_689_512  # torchvision's


def test_resnet18_small_image_stem_keeps_resolution_until_stage_two():
    model = gnp.build_model("resnet-18", (1, 28, 28), 10)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.update(s1=o.shape))
    model.blocks[7].register_forward_hook(lambda m, i, o: seen.update(s4=o.shape))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen["s1"] == (2, 64, 28, 28) and seen["s4"] == (2, 512, 4, 4)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.slow  # 1-1.5 min each on the shared 2-core machine: run with -m slow
@pytest.mark.parametrize("method", ["ours", "cgap"])
def test_resnet18_grows_and_prunes_connections_and_units(method):
    """Both growth/pruning kinds run on ResNet-18 (tiny inputs, a token schedule), and the
    served model compacts to an equal plain model."""
    from dataclasses import replace
    from gnp.data import incremental_split
    from gnp.policies import update
    from gnp.train import TrainConfig
    ds = gnp.load_dataset("digits")
    chunks, val = incremental_split(ds.train.subset(slice(0, 160)), 1, 32, seed=0)
    s = replace(gnp.Schedule(baseline_epochs=2, grow_every=2, unit_seed=0.5),
                train=TrainConfig(batch_size=8),
                prune=gnp.PruneConfig(beta=20, retrain_epochs=0.25, retrain_slice=0.25,
                                      max_iterations=2, noise_z=100.0, holdout=0.0))
    r = update(method, None, new=chunks[0], all=chunks[0], val=val, schedule=s,
               build=lambda: gnp.build_model("resnet-18", (1, 8, 8), 10), device="cpu")
    assert r.growth and r.growth[0].grown > 0
    assert r.prune.iterations >= 1 and r.params.active < r.params.dense
    small = compact_model(r.model)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(small(x), r.model(x), atol=1e-4, rtol=1e-3)
    if method == "cgap":
        assert sum(p.numel() for p in small.parameters()) < r.params.dense
