"""Transcribing raw audio with a speech model."""

import math

import pytest
import torch

from gnp.models import build_model
from gnp.transcribe import transcribe
from gnp.transcripts import NUM_SYMBOLS, encode


class _Says(torch.nn.Module):
    """Emits one word's symbols, each for one frame then a blank, with certainty p."""

    def __init__(self, word: str, p: float) -> None:
        super().__init__()
        self.word, self.p = word, p
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, lengths):
        path = [s for ch in encode(self.word) for s in (ch, 0)]
        lp = torch.full((x.shape[0], x.shape[1], NUM_SYMBOLS), math.log((1 - self.p) / (NUM_SYMBOLS - 1)))
        for t in range(x.shape[1]):
            lp[:, t, path[t] if t < len(path) else 0] = math.log(self.p)
        return lp, lengths


def test_transcribe_decodes_and_reports_confidence():
    audio = [0.1 * torch.randn(4000), 0.1 * torch.randn(3000)]
    out = transcribe(_Says("seven", 0.9), audio, 8000)
    assert [t.text for t in out] == ["seven", "seven"]
    assert all(t.confidence == pytest.approx(0.9, abs=1e-5) for t in out)


def test_transcribe_with_a_real_model_and_bad_input():
    model = build_model("deepspeech2-hlstm-tiny", (20,), NUM_SYMBOLS)
    out = transcribe(model, [0.1 * torch.randn(2000)], 8000)
    assert isinstance(out[0].text, str) and 0.0 < out[0].confidence <= 1.0
    assert model.training  # left as it was
    with pytest.raises(ValueError, match="sample rate"):
        transcribe(model, [torch.zeros(100)], 16000)
    with pytest.raises(ValueError):
        transcribe(model, [], 8000)
