"""The training loop: one schedule per update that reaches its final rate, growth at the
current rate, local generators only, and pruning that goes on past a converged model's
first unlucky step."""

import copy

import pytest
import safetensors.torch
import torch

import gnp
from gnp.cost import CostMeter
from gnp.data import Data, incremental_split
from gnp.policies import Phase, Schedule, _run_phases, update
from gnp.prune import PruneConfig, iterative_prune
from gnp.train import CosineSchedule, TrainConfig, Trainer, uses_channels_last
from tests.gnp.trainers import assert_train_alike

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    ds = gnp.load_dataset("digits")
    chunks, val = incremental_split(ds.train, 2, 300, seed=0)
    return ds, chunks, val


def _trainer(model=None, **cfg):
    model = model or gnp.build_model("lenet-300-100", (1, 8, 8), 10)
    return Trainer(model, CPU, TrainConfig(batch_size=32, augment=False, **cfg), CostMeter("cpu"))


def test_cosine_schedule_runs_from_peak_to_floor():
    s = CosineSchedule(peak=0.1, floor=0.001, total=10)
    assert s.lr() == pytest.approx(0.1)
    s.taken = 5
    assert s.lr() == pytest.approx((0.1 + 0.001) / 2)
    s.taken = 10
    assert s.lr() == pytest.approx(0.001)


def test_an_update_with_growth_epochs_ends_at_the_final_lr(digits):
    """Growth epochs take no optimiser step: a schedule sized over all epochs (the old bug)
    ends at ~10x the final rate; one sized from the steps taken ends exactly there."""
    _, chunks, _ = digits
    t = _trainer(lr=0.05, final_lr=0.01)
    phases = [Phase("grow-new", "new", 6, grow_every=3), Phase("grow-all", "all", 5, grow_every=2)]
    data = {"new": chunks[1], "all": Data.concat(chunks)}
    _run_phases(t, phases, data, Schedule(), peak=0.05, progress=None)
    assert t.schedule.taken == t.schedule.total > 0
    assert t.lr == pytest.approx(0.05 * 0.01)
    # The last step ran at (almost) the final rate.
    assert t.opt.param_groups[0]["lr"] < 0.05 * 0.011


def test_growth_initialises_at_the_current_learning_rate(digits):
    _, chunks, _ = digits
    t = _trainer(lr=0.05)
    phases = [Phase("grow", "all", 5, grow_every=2)]  # grow, train, grow, train, grow
    growth = _run_phases(t, phases, {"all": chunks[0]}, Schedule(alpha=90), peak=0.05, progress=None)
    assert [g.lr for g in growth][0] == pytest.approx(0.05)
    steps = t.steps(len(chunks[0]))
    for i, g in enumerate(growth):
        expect = CosineSchedule(0.05, 0.05 * t.cfg.final_lr, 2 * steps, taken=i * steps).lr()
        assert g.lr == pytest.approx(expect)
    assert growth[-1].lr < growth[0].lr / 2


def test_update_uses_local_generators_only_and_is_reproducible(digits):
    _, chunks, val = digits
    s = Schedule(new_epochs=2, all_epochs=2, baseline_epochs=2, grow_every=2,
                 train=TrainConfig(batch_size=32), prune=PruneConfig(max_iterations=2, retrain_epochs=0.5))
    build = lambda: gnp.build_model("lenet-300-100", (1, 8, 8), 10)  # noqa: E731
    state = torch.random.get_rng_state()
    a = update("ours", None, new=chunks[0], all=chunks[0], val=val, schedule=s, build=build,
               device="cpu", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # never reseeded, never drawn from
    torch.manual_seed(123)  # whatever the global stream holds, the result is the same
    b = update("ours", None, new=chunks[0], all=chunks[0], val=val, schedule=s, build=build,
               device="cpu", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))


def test_a_converged_dense_model_prunes_past_a_few_steps(digits):
    """The old rule (retrain <= 2 epochs at 0.1x lr, stop at the first step not back at the
    reference accuracy) stopped a converged dense model after a few steps."""
    _, chunks, val = digits
    train = Data.concat(chunks)
    t = _trainer(lr=0.05)
    t.plan(30 * t.steps(len(train)))
    for _ in range(30):
        t.train_epoch(train)
    dense = t.masks.count().active
    report = iterative_prune(t, train, val, PruneConfig(), base_lr=0.05)
    assert report.iterations >= 15 and report.active_after < 0.5 * dense
    assert report.stopped_by in {"accuracy", "max_iterations"}


def test_compiled_training_matches_eager_and_keeps_dormant_weights_at_zero(digits):
    """TrainConfig.compile trains the same model as eager (to float tolerance), masks
    included: the compiled forward shares the model's parameters and mask buffers."""
    _, chunks, _ = digits
    base = gnp.build_model("lenet-300-100", (1, 8, 8), 10)
    ts = [_trainer(copy.deepcopy(base)), _trainer(copy.deepcopy(base), compile="default")]
    assert ts[0].forward is ts[0].model and ts[1].forward is not ts[1].model
    assert_train_alike(ts, chunks[0])


def test_an_unknown_compile_mode_is_refused_where_the_config_is_made():
    with pytest.raises(ValueError, match="reduce-overhead"):
        TrainConfig(compile="fast")


def test_channels_last_trains_the_same_model_as_contiguous_and_keeps_masks(digits):
    """memory_format: on the CPU a convolutional model trains channels-last by default
    ("auto"), to the same weights as in the contiguous layout (float tolerance), with
    dormant weights held at zero; a model without convolutions is left as it is."""
    _, chunks, _ = digits
    base = gnp.build_model("lenet-5", (1, 8, 8), 10)
    ts = [_trainer(copy.deepcopy(base), memory_format="contiguous"), _trainer(copy.deepcopy(base))]
    assert ts[0].model.conv2.weight.is_contiguous()
    assert not ts[1].model.conv2.weight.is_contiguous()
    assert ts[1].model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not uses_channels_last(TrainConfig(), gnp.build_model("lenet-300-100", (1, 8, 8), 10), CPU)
    assert_train_alike(ts, chunks[0])


@pytest.mark.parametrize("method", ["ours", "nft"])
def test_an_update_serves_and_carries_contiguous_models(digits, method, tmp_path):
    """Whatever layout it trained in, an update hands back contiguous weights: the served
    model, the carry and the non-recoverable export save with safetensors as they are."""
    _, chunks, val = digits
    s = Schedule(new_epochs=2, all_epochs=2, baseline_epochs=2, grow_every=2,
                 train=TrainConfig(batch_size=32), carry_unpruned=True,
                 prune=PruneConfig(max_iterations=2, retrain_epochs=0.5)).with_nonrecoverable()
    build = lambda: gnp.build_model("lenet-5", (1, 8, 8), 10)  # noqa: E731
    first = update(method, None, new=chunks[0], all=chunks[0], val=val, schedule=s, build=build,
                   device="cpu")
    r = update(method, first.carry, new=chunks[1], all=Data.concat(chunks), val=val, schedule=s,
               device="cpu")
    for model in (r.model, r.carry) + ((r.compact,) if r.compact is not None else ()):
        assert all(v.is_contiguous() for v in model.state_dict().values())
        safetensors.torch.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))


def test_an_unknown_memory_format_is_refused_where_the_config_is_made():
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig(memory_format="nhwc")
