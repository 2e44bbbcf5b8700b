"""A DeepSpeech2-style speech model with bidirectional H-LSTM layers, trained with CTC.

H-LSTM (the paper's hidden-layer LSTM): an LSTM whose four gates (forget, input, output,
cell update) are each a small MLP over [x_t, h_{t-1}]: Linear -> leaky ReLU (0.01) ->
dropout -> Linear. Every Linear is an ordinary `nn.Linear`, so the masks machinery
attaches to it like to any other layer, and growth and pruning need nothing special.
In module order a gate MLP is (fc1, fc2), so the recoverable constraint of gnp.prune
(rows of a layer: inputs of its units; columns of a layer after the first: outputs of
the previous layer's units) keeps every hidden unit of a gate MLP with an input (a row
of fc1) and an output (a column of fc2).

The model: 3 one-dimensional convolutions over MFCC frames (coefficients as channels;
the first with stride 2 in time), bidirectional H-LSTM layers, one fully connected
layer and an output layer of CTC symbols (log-probabilities).

Default widths, for 8 kHz spoken digits on a 2-core CPU (the paper's 800 is for AN4's
~1k-word vocabulary on a P100): ten one-word transcripts over 15 distinct letters
need far less capacity, and an H-LSTM step is a Python-level loop of small matrix
products, so the cost of an epoch grows with the sequence length times the widths.
Conv 32 channels, one bi-H-LSTM layer of 64 units per direction with gate MLPs of
32 hidden units, FC 64: about 65k parameters, a few seconds an epoch over FSDD's
1,800 training recordings on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gnp.models.init import LEAKY_SLOPE
from gnp.models.spec import ModelSpec

__all__ = ["SpeechConfig", "GateMLP", "HLSTMCell", "BiHLSTM", "DeepSpeech2", "GATES",
           "seeded_dropout"]

GATES = ("forget", "input", "output", "cell")


def seeded_dropout(a: torch.Tensor, p: float, training: bool,
                   gen: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout whose mask is drawn from `gen` (the global RNG only when None).

    gnp's trainer sets its own generator on every module with a `dropout_generator`
    (`gnp.train.set_dropout_generator`), so an update never touches the global RNG and
    the same seed gives the same weights.
    """
    if not training or p == 0.0:
        return a
    if gen is None:
        return F.dropout(a, p, True)
    keep = torch.rand(a.shape, generator=gen, device=a.device, dtype=a.dtype) >= p
    return a * keep / (1.0 - p)


@dataclass(frozen=True)
class SpeechConfig:
    conv_channels: int = 32
    conv_layers: int = 3
    kernel: int = 5
    hidden: int = 64  # H-LSTM state per direction
    gate_hidden: int = 32  # hidden units of each gate MLP
    rnn_layers: int = 1
    fc: int = 64
    dropout: float = 0.2


class GateMLP(nn.Module):
    """One gate of an H-LSTM: fc2(dropout(leaky_relu(fc1(z)))), z = [x_t, h_{t-1}]."""

    def __init__(self, n_in: int, hidden: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.dropout = dropout
        self.dropout_generator: torch.Generator | None = None  # see seeded_dropout

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.fc1(z), LEAKY_SLOPE)
        return self.fc2(seeded_dropout(a, self.dropout, self.training, self.dropout_generator))


class HLSTMCell(nn.Module):
    """An LSTM cell whose gates are MLPs (see the module docstring)."""

    def __init__(self, n_in: int, hidden: int, gate_hidden: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.n_in, self.hidden = n_in, hidden
        self.gates = nn.ModuleDict({g: GateMLP(n_in + hidden, gate_hidden, hidden, dropout)
                                    for g in GATES})
        self.dropout_generator: torch.Generator | None = None  # see seeded_dropout

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step, gate by gate (the reference the fused `forward` must match)."""
        z = torch.cat([x, h], 1)
        f, i, o = (torch.sigmoid(self.gates[g](z)) for g in ("forget", "input", "output"))
        c = f * c + i * torch.tanh(self.gates["cell"](z))
        return o * torch.tanh(c), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, H) of a sequence (B, T, I) from zero state.

        The four gates are fused: their first layers run as one matrix product (the x_t
        part for all steps at once), their second layers as one batched product.
        """
        b, t_len, _ = x.shape
        gates = [self.gates[g] for g in GATES]
        w1 = torch.cat([g.fc1.weight for g in gates])  # (4G, I + H)
        b1 = torch.cat([g.fc1.bias for g in gates])
        w2 = torch.stack([g.fc2.weight for g in gates]).transpose(1, 2)  # (4, G, H)
        b2 = torch.stack([g.fc2.bias for g in gates]).unsqueeze(1)  # (4, 1, H)
        pre = F.linear(x, w1[:, : self.n_in], b1)  # (B, T, 4G)
        w_h = w1[:, self.n_in:].t()  # (H, 4G)
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        p = gates[0].dropout if self.training else 0.0
        out = []
        for pre_t in pre.unbind(1):  # unbind, not pre[:, t]: its backward is one stack
            a = F.leaky_relu(torch.addmm(pre_t, h, w_h), LEAKY_SLOPE)
            a = seeded_dropout(a, p, self.training, self.dropout_generator)
            a = a.view(b, 4, -1).transpose(0, 1)  # (4, B, G)
            z = torch.baddbmm(b2, a, w2)  # (4, B, H): forget, input, output, cell
            f, i, o = torch.sigmoid(z[:3]).unbind(0)
            c = f * c + i * torch.tanh(z[3])
            h = o * torch.tanh(c)
            out.append(h)
        return torch.stack(out, 1)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of (B, T, ...) within its length; padding stays in place."""
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    idx = torch.where(t < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - t, t)  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand_as(x))


class BiHLSTM(nn.Module):
    """Two H-LSTM cells, one reading forward and one backward; outputs concatenated."""

    def __init__(self, n_in: int, hidden: int, gate_hidden: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.fwd = HLSTMCell(n_in, hidden, gate_hidden, dropout)
        self.bwd = HLSTMCell(n_in, hidden, gate_hidden, dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, I) -> (B, T, 2H); the backward cell starts at each sequence's own end."""
        back = reverse_padded(self.bwd(reverse_padded(x, lengths)), lengths)
        return torch.cat([self.fwd(x), back], 2)


def conv_lengths(lengths: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    pad = kernel // 2
    return (lengths + 2 * pad - kernel) // stride + 1


class DeepSpeech2(nn.Module):
    """Conv front-end -> bi-H-LSTM layers -> FC -> CTC symbol log-probabilities.

    input_shape = (n_mfcc,), num_classes = CTC symbols (blank included).
    forward(x (B, T, n_mfcc), lengths (B,)) -> (log_probs (B, T', symbols), lengths (B,)).
    """

    def __init__(self, spec: ModelSpec, cfg: SpeechConfig = SpeechConfig()) -> None:
        super().__init__()
        if len(spec.input_shape) != 1:
            raise ValueError(f"{spec.name} needs input_shape (n_mfcc,), got {spec.input_shape}")
        self.cfg = cfg
        widths = [spec.input_shape[0]] + [cfg.conv_channels] * cfg.conv_layers
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, cfg.kernel, stride=2 if i == 0 else 1, padding=cfg.kernel // 2)
            for i, (a, b) in enumerate(zip(widths, widths[1:])))
        self.norms = nn.ModuleList(nn.BatchNorm1d(cfg.conv_channels) for _ in self.convs)
        n_in = cfg.conv_channels
        self.rnns = nn.ModuleList()
        for _ in range(cfg.rnn_layers):
            self.rnns.append(BiHLSTM(n_in, cfg.hidden, cfg.gate_hidden, cfg.dropout))
            n_in = 2 * cfg.hidden
        self.fc = nn.Linear(n_in, cfg.fc)
        self.out = nn.Linear(cfg.fc, spec.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)  # (B, F, T)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            lengths = conv_lengths(lengths, conv.kernel_size[0], conv.stride[0])
            x = F.leaky_relu(norm(conv(x)), LEAKY_SLOPE)
            # zero the padding, so it reads like the zero padding at a sequence's end
            keep = torch.arange(x.shape[2], device=x.device) < lengths.unsqueeze(1)
            x = x * keep.unsqueeze(1)
        x = x.transpose(1, 2)  # (B, T', C)
        for rnn in self.rnns:
            x = rnn(x, lengths)
        x = F.leaky_relu(self.fc(x), LEAKY_SLOPE)
        return F.log_softmax(self.out(x), -1), lengths


def deepspeech2_hlstm(spec: ModelSpec) -> DeepSpeech2:
    return DeepSpeech2(spec)


def deepspeech2_hlstm_tiny(spec: ModelSpec) -> DeepSpeech2:
    """A tiny variant for tests and the daemon's quick demo."""
    return DeepSpeech2(spec, SpeechConfig(conv_channels=16, hidden=16, gate_hidden=8, fc=16))
