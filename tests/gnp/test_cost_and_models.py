import pytest
import torch
from torch import nn

import gnp
from gnp.cost import CostMeter, epoch_equivalents
from gnp.models import LEAKY_SLOPE


def test_epoch_equivalents_arithmetic():
    # 15 epochs on a chunk one tenth the size of all data = 1.5 all-data epochs.
    assert epoch_equivalents(15 * 5_500, 55_000) == pytest.approx(1.5)
    assert epoch_equivalents(20 * 55_000, 55_000) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        epoch_equivalents(10, 0)


def test_meter_counts_passes_by_phase():
    meter = CostMeter("cpu")
    meter.phase = "grow-new"
    meter.add(100)
    meter.phase = "grow-all"
    meter.add(1000)
    meter.add_eval(50)
    cost = meter.finish(all_data_size=1000)
    assert cost.sample_passes == 1100 and cost.epochs == pytest.approx(1.1)
    assert dict(cost.phases) == {"grow-new": 100, "grow-all": 1000}
    assert cost.eval_passes == 50 and cost.device == "cpu"


# LeNet-5 is the paper's (6/16 filters, FC 120-84, conv1 padded by 2: LeCun's 32x32 layout);
# the Caffe 20/50/500 variant of the pruning literature keeps its own name.
@pytest.mark.parametrize("name,params", [("lenet-300-100", 266_610), ("lenet-5", 61_706),
                                         ("lenet-5-caffe", 431_080)])
def test_paper_models_have_the_paper_sizes(name, params):
    model = gnp.build_model(name, (1, 28, 28), 10)
    assert gnp.count_parameters(model).dense == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == LEAKY_SLOPE for a in acts)


def test_models_fit_small_inputs_and_reject_bad_arguments():
    assert gnp.build_model("lenet-5", (1, 8, 8), 10)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown model"):
        gnp.build_model("resnet-1000")
    with pytest.raises(ValueError, match="input_shape"):
        gnp.build_model("lenet-5", (784,))  # a convolutional model needs (C, H, W)
    assert gnp.build_model("lenet-300-100", (784,))(torch.zeros(2, 784)).shape == (2, 10)
    with pytest.raises(ValueError, match="num_classes"):
        gnp.build_model("lenet-300-100", (1, 28, 28), 1)


def test_the_paper_lenet5_has_its_layers():
    model = gnp.build_model("lenet-5", (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16] and all(c.kernel_size == (5, 5) for c in convs)
    assert [f.out_features for f in fcs] == [120, 84, 10]


def test_build_is_seeded_locally_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = (gnp.build_model("lenet-5", seed=3) for _ in range(2))
    c = gnp.build_model("lenet-5", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
