"""H-LSTM cell, bidirectional layer and the DeepSpeech2-style model: the step against a
hand computation, masks, growth and recoverable pruning on the gate MLPs."""

import math

import pytest
import torch

from gnp.cost import CostMeter
from gnp.grow import grow_by_gradient
from gnp.masks import Masks
from gnp.models import MODELS, build_model
from gnp.models.speech import GATES, BiHLSTM, HLSTMCell, reverse_padded
from gnp.policies import sparse_seed
from gnp.prune import prune_step
from gnp.sequences import SequenceData
from gnp.tasks import CTC_TASK
from gnp.train import TrainConfig, Trainer
from gnp.transcripts import NUM_SYMBOLS, encode


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def _lrelu(v):
    return v if v > 0 else 0.01 * v


@torch.no_grad()
def _set_scalar_cell(cell: HLSTMCell, values: dict) -> None:
    """A 1-input, 1-state cell with 1 hidden unit per gate: fc1 weights (w_x, w_h), b1;
    fc2 weight v, b2."""
    for g in GATES:
        (wx, wh, b1, v, b2) = values[g]
        cell.gates[g].fc1.weight.copy_(torch.tensor([[wx, wh]]))
        cell.gates[g].fc1.bias.fill_(b1)
        cell.gates[g].fc2.weight.fill_(v)
        cell.gates[g].fc2.bias.fill_(b2)


VALUES = {"forget": (0.5, -1.0, 0.1, 2.0, -0.3), "input": (-0.4, 0.7, 0.0, 1.5, 0.2),
          "output": (1.2, 0.3, -0.2, -0.8, 0.1), "cell": (0.9, -0.6, 0.05, 1.1, -0.1)}


def _hand_step(x, h, c):
    gate = {g: wx * x + wh * h + b1 for g, (wx, wh, b1, _, _) in VALUES.items()}
    out = {g: VALUES[g][3] * _lrelu(gate[g]) + VALUES[g][4] for g in GATES}
    f, i, o = _sig(out["forget"]), _sig(out["input"]), _sig(out["output"])
    c = f * c + i * math.tanh(out["cell"])
    return o * math.tanh(c), c


def test_hlstm_step_matches_a_hand_computation():
    cell = HLSTMCell(1, 1, 1).eval()
    _set_scalar_cell(cell, VALUES)
    h, c = torch.tensor([[0.25]]), torch.tensor([[-0.5]])
    h1, c1 = cell.step(torch.tensor([[0.8]]), h, c)
    eh, ec = _hand_step(0.8, 0.25, -0.5)
    assert h1.item() == pytest.approx(eh, abs=1e-6)
    assert c1.item() == pytest.approx(ec, abs=1e-6)


def test_fused_sequence_matches_hand_steps_from_zero_state():
    cell = HLSTMCell(1, 1, 1).eval()
    _set_scalar_cell(cell, VALUES)
    xs = [0.8, -1.3, 0.4]
    out = cell(torch.tensor(xs).view(1, 3, 1)).flatten().tolist()
    h, c, want = 0.0, 0.0, []
    for x in xs:
        h, c = _hand_step(x, h, c)
        want.append(h)
    assert out == pytest.approx(want, abs=1e-6)


def test_fused_forward_matches_the_gate_by_gate_step_with_masked_weights():
    torch.manual_seed(0)
    cell = HLSTMCell(5, 4, 3).eval()
    masks = Masks.attach(cell)
    assert len(masks) == 8  # fc1 and fc2 of four gates
    masks.set({layer.name: torch.rand(layer.mask.shape) > 0.4 for layer in masks})
    x = torch.randn(2, 6, 5)
    h = c = torch.zeros(2, 4)
    steps = []
    for t in range(6):
        h, c = cell.step(x[:, t], h, c)
        steps.append(h)
    torch.testing.assert_close(cell(x), torch.stack(steps, 1), rtol=1e-5, atol=1e-6)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    cell = HLSTMCell(3, 4, 8, dropout=0.2)
    x = torch.randn(2, 5, 3)
    assert not torch.equal(cell.train()(x), cell.train()(x))
    assert torch.equal(cell.eval()(x), cell.eval()(x))


def test_reverse_padded_reverses_within_each_length():
    x = torch.arange(8.0).view(2, 4, 1)
    r = reverse_padded(x, torch.tensor([4, 2]))
    assert r.flatten().tolist() == [3, 2, 1, 0, 5, 4, 6, 7]


def test_bidirectional_output_ignores_padding():
    torch.manual_seed(0)
    layer = BiHLSTM(3, 4, 5).eval()
    short = torch.randn(1, 3, 3)
    padded = torch.cat([short, torch.randn(1, 4, 3)], 1)  # 4 frames of junk after the end
    out_short = layer(short, torch.tensor([3]))
    out_padded = layer(padded, torch.tensor([3]))[:, :3]
    torch.testing.assert_close(out_padded, out_short)
    assert out_short.shape == (1, 3, 8)


def _tiny_model(seed=0):
    return build_model("deepspeech2-hlstm-tiny", (12,), NUM_SYMBOLS, seed=seed)


def test_speech_models_are_registered_and_map_lengths():
    assert "deepspeech2-hlstm" in MODELS
    m = build_model("deepspeech2-hlstm", (20,), NUM_SYMBOLS).eval()
    log_probs, lengths = m(torch.randn(3, 41, 20), torch.tensor([41, 30, 7]))
    assert log_probs.shape == (3, 21, NUM_SYMBOLS)
    assert lengths.tolist() == [21, 15, 4]
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 21), atol=1e-5)
    with pytest.raises(ValueError, match="n_mfcc"):
        build_model("deepspeech2-hlstm", (1, 28, 28), NUM_SYMBOLS)


def test_every_gate_linear_is_masked():
    masks = Masks(_tiny_model())
    names = [layer.name for layer in masks]
    for direction in ("fwd", "bwd"):
        for g in GATES:
            for fc in ("fc1", "fc2"):
                assert f"rnns.0.{direction}.gates.{g}.{fc}" in names


def _gate_units_connected(masks: Masks) -> bool:
    by = {layer.name: layer.mask for layer in masks}
    for name in by:
        if name.endswith(".fc1"):
            fc1, fc2 = by[name], by[name[:-1] + "2"]
            if not (fc1.any(1).all() and fc2.any(0).all()):
                return False
    return True


def test_recoverable_pruning_keeps_every_gate_hidden_unit_connected():
    model = _tiny_model()
    masks = Masks(model)
    for _ in range(60):
        prune_step(masks, 20.0, recoverable=True)
    assert masks.density() < 0.2  # pruned hard
    assert _gate_units_connected(masks)
    # ... which non-recoverable pruning does not guarantee (the check can fail)
    other = Masks(_tiny_model())
    for _ in range(60):
        prune_step(other, 20.0, recoverable=False)
    assert not _gate_units_connected(other)


def _toy_data(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    words = ["one", "two", "six"]
    feats = [torch.randn(int(torch.randint(14, 24, (), generator=gen)), 12, generator=gen)
             for _ in range(n)]
    return SequenceData.from_lists(feats, [encode(words[i % 3]) for i in range(n)])


def test_growth_activates_gate_connections_from_the_ctc_gradient():
    model = _tiny_model()
    t = Trainer(model, torch.device("cpu"), TrainConfig(batch_size=4), CostMeter("cpu"), CTC_TASK)
    sparse_seed(t.masks, 0.2, torch.Generator().manual_seed(1))
    before = {l.name: l.active for l in t.masks}
    grads = t.mean_gradients(_toy_data())
    step = grow_by_gradient(t.masks, grads, alpha=50.0, lr=0.05)
    assert step.grown > 0
    gates_grown = sum(l.active - before[l.name] for l in t.masks if ".gates." in l.name)
    assert gates_grown > 0
    assert _gate_units_connected(t.masks)


def test_training_the_speech_model_lowers_the_ctc_loss():
    data = _toy_data(16)
    t = Trainer(_tiny_model(), torch.device("cpu"), TrainConfig(lr=0.05, batch_size=4),
                CostMeter("cpu"), CTC_TASK)
    t.plan(10 * t.steps(len(data)))
    first = t.train_epoch(data)
    for _ in range(9):
        last = t.train_epoch(data)
    assert last < 0.8 * first
    assert t.meter.sample_passes == 10 * len(data)
    # masks hold: dormant weights stay zero after steps
    for layer in t.masks:
        assert not layer.weight[~layer.mask].any()


def test_dropout_draws_from_the_generator_it_is_given():
    from gnp.train import set_dropout_generator

    cell = HLSTMCell(3, 4, 8, dropout=0.2).train()
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    assert set_dropout_generator(cell, torch.Generator().manual_seed(7)) == 5  # cell + 4 gates
    state = torch.get_rng_state()
    first = cell(x)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not drawn from
    assert not torch.equal(first, cell(x))  # the stream moves on
    set_dropout_generator(cell, torch.Generator().manual_seed(7))
    assert torch.equal(cell(x), first)  # the same seed, the same masks


def _speech_update(seed):
    from gnp.policies import Schedule, update
    from gnp.prune import PruneConfig
    from gnp.speech_protocol import SPEECH_TRAIN

    data = _toy_data(16)
    schedule = Schedule(new_epochs=1, all_epochs=2, baseline_epochs=2, grow_every=2,
                        train=SPEECH_TRAIN, prune=PruneConfig(max_iterations=1, retrain_epochs=0.5))
    first = update("ours", None, new=data, all=data, val=_toy_data(6, seed=1),
                   schedule=schedule, build=_tiny_model, device="cpu", seed=seed, task=CTC_TASK)
    return update("ours", first.model, new=data, all=data, val=_toy_data(6, seed=1),
                  schedule=schedule, device="cpu", seed=seed + 1, task=CTC_TASK).model


def test_speech_updates_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _speech_update(5)
    assert torch.equal(torch.get_rng_state(), state)  # neither read nor reseeded
    torch.manual_seed(999)  # a different global state changes nothing
    b = _speech_update(5)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    c = _speech_update(6)
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(),
                                                          c.state_dict().values()))
