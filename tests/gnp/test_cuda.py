"""The engine on a GPU: every model and update kind runs on CUDA with its data, masks and
generators there, and compiled training (CUDA graphs included) equals eager.

Skipped without CUDA (CI has none; `bash tools/gpu_checks.sh tests` runs them on a lent
GPU). GNP_TEST_DEVICE=cpu runs the same checks on the CPU, to check the checks.
"""

import copy
import os
from dataclasses import replace

import pytest
import torch

import gnp
from gnp.compact import compact_model
from gnp.cost import CostMeter
from gnp.data import Data, incremental_split
from gnp.policies import update
from gnp.prune import PruneConfig
from gnp.train import TrainConfig, Trainer
from tests.gnp.test_speech_data import _write_wav
from tests.gnp.trainers import assert_train_alike

DEVICE = torch.device(os.environ.get("GNP_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device (GNP_TEST_DEVICE=cpu runs these on the CPU)")

TINY = gnp.Schedule(new_epochs=2, all_epochs=2, baseline_epochs=3, grow_every=2, unit_seed=0.5,
                    train=TrainConfig(batch_size=16),
                    prune=PruneConfig(max_iterations=2, retrain_epochs=0.5))


@pytest.fixture(scope="module")
def digits():
    ds = gnp.load_dataset("digits")
    chunks, val = incremental_split(ds.train.subset(slice(0, 600)), 2, 100, seed=0)
    return ds, chunks, val


def _on_device(model):
    return all(t.device.type == DEVICE.type for t in [*model.parameters(), *model.buffers()])


def _dormant_are_zero(model):
    from gnp.masks import Masks
    return all(not layer.weight[~layer.mask].any() for layer in Masks(model))


@pytest.mark.parametrize("name,method", [("lenet-300-100", "ours"), ("lenet-300-100", "nft"),
                                         ("lenet-5", "ours"), ("lenet-5", "cgap"),
                                         ("resnet-18", "ours"), ("resnet-18", "cgap")])
def test_two_updates_run_on_the_device(digits, name, method):
    ds, chunks, val = digits
    build = lambda: gnp.build_model(name, (1, 8, 8), 10)  # noqa: E731
    carry, all_data = None, chunks[0]
    for k, new in enumerate(chunks, 1):
        all_data = Data.concat(chunks[:k])
        seen = []
        r = update(method, carry, new=new, all=all_data, val=val, schedule=TINY, build=build,
                   device=DEVICE, seed=k, observe=lambda stage, m: seen.append(_on_device(m)))
        carry = r.carry
        assert seen == [True] and r.cost.device == str(DEVICE)  # trained there
        assert _dormant_are_zero(r.model)  # served from the CPU, masks held
        assert r.cost.sample_passes > 0 and r.params.active <= r.params.dense
    acc = gnp.evaluate(r.model, ds.test, DEVICE)  # on a copy on the device
    assert 0.0 <= acc <= 1.0
    x = ds.test.x[:8]
    small = compact_model(r.model)
    assert torch.allclose(small(x), r.model.eval()(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_equals_eager_on_the_device(digits, mode):
    _, chunks, _ = digits
    base = gnp.build_model("lenet-300-100", (1, 8, 8), 10)
    cfg = TrainConfig(batch_size=32)
    ts = [Trainer(copy.deepcopy(base), DEVICE, c, CostMeter(str(DEVICE)))
          for c in (cfg, replace(cfg, compile=mode))]
    assert_train_alike(ts, chunks[0].to(DEVICE), epochs=3, rtol=1e-3, atol=1e-4)


def test_a_speech_update_runs_on_the_device(tmp_path):
    for speaker in ("ann", "bob"):
        for digit in (1, 6):
            for n in range(9):
                _write_wav(tmp_path / f"{digit}_{speaker}_{n}.wav", 0.25, 300 + 200 * digit)
    ds = gnp.load_dataset("fsdd", tmp_path)
    chunks, val = incremental_split(ds.train, 2, 4, seed=0)
    from gnp.speech_protocol import speech_schedule
    s = replace(speech_schedule(quick=True), new_epochs=1, all_epochs=2, baseline_epochs=2,
                prune=replace(speech_schedule(quick=True).prune, max_iterations=1))
    build = lambda: gnp.build_model("deepspeech2-hlstm-tiny", ds.input_shape, ds.num_classes)  # noqa: E731
    carry = None
    for k, new in enumerate(chunks, 1):
        seen = []
        r = update("ours", carry, new=new, all=type(new).concat(chunks[:k]), val=val, schedule=s,
                   build=build, device=DEVICE, seed=k, task=ds.task,
                   observe=lambda stage, m: seen.append(_on_device(m)))
        carry = r.carry
        assert seen == [True] and _dormant_are_zero(r.model)
    wer = 1.0 - gnp.evaluate(r.model, ds.test, DEVICE, task=ds.task)
    assert 0.0 <= wer <= 1.0 + 1e-9
