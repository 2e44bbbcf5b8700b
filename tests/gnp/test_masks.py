import torch
from torch import nn

import gnp
from gnp.masks import Masks, count_parameters


def _masked_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.01), nn.Linear(5, 3))
    masks = Masks.attach(model)
    masks.set({"0": torch.rand(5, 6) > 0.5, "2": torch.rand(3, 5) > 0.3})
    return model, masks


def test_dormant_weights_are_exact_zeros_and_forward_has_no_extra_work():
    model, masks = _masked_mlp()
    for layer in masks:
        assert torch.all(layer.weight[~layer.mask] == 0)
    # No hooks or reparametrisation: the forward pass is the plain module's.
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(not hasattr(m, "weight_orig") for m in model.modules())
    plain = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.01), nn.Linear(5, 3))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "mask" not in k})
    x = torch.randn(4, 6)
    assert torch.equal(model(x), plain(x))


def test_dense_gradient_reaches_dormant_weights_until_masked():
    model, masks = _masked_mlp()
    model(torch.randn(8, 6)).pow(2).sum().backward()
    first = masks.layers[0]
    assert first.weight.grad[~first.mask].abs().sum() > 0  # available for growth
    masks.mask_grads()
    for layer in masks:
        assert torch.all(layer.weight.grad[~layer.mask] == 0)


def test_training_step_keeps_dormant_weights_at_zero():
    model, masks = _masked_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        masks.mask_grads()
        opt.step()
        masks.apply()
    for layer in masks:
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_counts_and_in_place_mask_identity():
    model = gnp.build_model("lenet-300-100")
    masks = Masks(model)
    assert count_parameters(model) == gnp.ParamCount(266_610, 266_610)
    mask_before = masks.layers[0].mask
    new = torch.ones_like(mask_before)
    new[:, :100] = False  # 300 x 100 weights dormant
    masks.set({"fc1": new})
    assert masks.layers[0].mask is mask_before  # updated in place, never rebound
    assert Masks(model).layers[0].mask is mask_before
    assert count_parameters(model).active == 266_610 - 30_000
    assert masks.per_layer()["fc1"] == gnp.ParamCount(784 * 300 - 30_000, 784 * 300)
    assert "fc1.weight_mask" in model.state_dict()


def test_attach_is_idempotent_and_rejects_models_without_prunable_layers():
    model, masks = _masked_mlp()
    snapshot = masks.snapshot()
    again = Masks.attach(model)
    assert all(torch.equal(snapshot[layer.name], layer.mask) for layer in again)
    try:
        Masks.attach(nn.Sequential(nn.ReLU()))
    except ValueError as e:
        assert "no prunable layers" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_set_rejects_wrong_shape_and_unknown_layer():
    model, masks = _masked_mlp()
    for bad in ({"0": torch.ones(2, 2, dtype=torch.bool)}, {"nope": torch.ones(5, 6, dtype=torch.bool)}):
        try:
            masks.set(bad)
        except (ValueError, KeyError):
            continue
        raise AssertionError(f"accepted {bad}")
