"""Transcripts, CTC decoding and error rates, MFCC features, variable-length batches
(resident and chunked), the CTC task's scores and the FSDD loader (on WAVs the tests
write)."""

import dataclasses
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gnp.audio import FeatureConfig, mfcc, pcm16_to_float, read_wav
from gnp.data import load_dataset
from gnp.fsdd import DIGIT_WORDS, speaker_split
from gnp.sequences import ChunkedSequenceData, SequenceData, SpeechBatch
from gnp.tasks import CTC_TASK
from gnp.train import evaluate
from gnp.transcripts import (ALPHABET, BLANK, NUM_SYMBOLS, cer, decode, encode, greedy_decode,
                             valid_transcript, wer)

FSDD = Path("/work/shared/data/fsdd")


def _one_hot_path(symbols: list[int]) -> torch.Tensor:
    lp = torch.full((len(symbols), NUM_SYMBOLS), -10.0)
    lp[torch.arange(len(symbols)), torch.tensor(symbols)] = 0.0
    return lp


def test_alphabet_and_encoding():
    assert NUM_SYMBOLS == 28 and ALPHABET[0] == " "
    assert decode(encode("Seven  Two")) == "seven two"
    assert valid_transcript("three") is None
    assert "alphabet" in valid_transcript("thr3e")
    assert valid_transcript("  ") == "empty transcript"
    with pytest.raises(ValueError):
        encode("é")


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    s = lambda text: encode(text)  # noqa: E731
    t, h, r, e = s("t")[0], s("h")[0], s("r")[0], s("e")[0]
    path = [BLANK, t, t, h, r, BLANK, e, e, BLANK, e, BLANK, BLANK]  # "three" then padding
    lp = torch.stack([_one_hot_path(path), _one_hot_path([t] * 12)])
    assert greedy_decode(lp, torch.tensor([10, 3])) == ["three", "t"]


def test_wer_and_cer_on_known_strings():
    assert wer(["one two three"], ["one two three"]) == 0.0
    assert wer(["one two three"], ["one too three"]) == pytest.approx(1 / 3)
    assert wer(["one two three"], ["one three"]) == pytest.approx(1 / 3)  # a deletion
    assert wer(["one"], ["one one"]) == pytest.approx(1.0)  # an insertion
    assert wer(["one", "two three"], ["won", "two three"]) == pytest.approx(1 / 3)
    assert cer(["three"], ["tree"]) == pytest.approx(1 / 5)
    assert cer(["six"], ["sex"]) == pytest.approx(1 / 3)


class _Fixed(nn.Module):
    """Emits given log-probabilities whatever the input (for the task's scores)."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.lp = log_probs
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, lengths):
        return self.lp, torch.full((len(self.lp),), self.lp.shape[1])


def test_ctc_scores_are_words_minus_errors_so_the_metric_is_one_minus_wer():
    refs = ["one", "two", "six"]
    hyps = ["one", "too", "six six"]
    paths = []
    for text in hyps:
        syms = []
        for ch in encode(text):
            syms += [ch, BLANK]
        paths.append(_one_hot_path((syms + [BLANK] * 16)[:16]))
    model = _Fixed(torch.stack(paths))
    data = SequenceData.from_lists([torch.zeros(16, 3)] * 3, [encode(r) for r in refs])
    scores, weights = CTC_TASK.scores(model, data.gather(slice(None), torch.device("cpu")))
    assert scores.tolist() == [1.0, 0.0, 0.0]  # "six six": 1 word, 1 insertion
    assert weights.tolist() == [1.0, 1.0, 1.0]
    assert evaluate(model, data, task=CTC_TASK) == pytest.approx(1.0 - wer(refs, hyps))


def test_mfcc_shape_and_per_utterance_normalisation():
    t = torch.arange(4000) / 8000.0
    audio = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.01 * torch.randn(4000)
    f = mfcc(audio, 8000)
    assert f.shape == (51, 20)  # 0.5 s every 10 ms, centred windows
    assert f.mean(0).abs().max() < 1e-4
    assert (f.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert mfcc(audio, 8000, FeatureConfig(n_mfcc=13)).shape == (51, 13)
    with pytest.raises(ValueError, match="sample rate"):
        mfcc(audio, 16000)
    with pytest.raises(ValueError, match="non-finite"):
        mfcc(torch.tensor([0.0, float("nan")] * 100), 8000)
    with pytest.raises(ValueError):
        mfcc(torch.zeros(0), 8000)


def test_pcm16_decoding():
    raw = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    assert pcm16_to_float(raw).tolist() == pytest.approx([0.0, 0.5, -1.0, 32767 / 32768])
    with pytest.raises(ValueError):
        pcm16_to_float(b"\x00")


def _lengths_data(lengths: list[int]) -> SequenceData:
    return SequenceData.from_lists([torch.randn(n, 2) for n in lengths],
                                   [encode("one")] * len(lengths))


def test_length_bucketed_batches_cover_each_sample_once_with_little_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (400,), generator=gen).tolist()
    data = _lengths_data(lengths)
    batches = data.batch_indices(16, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(400))

    def padding(bs):
        return sum(int(data.lengths[b].max()) * len(b) - int(data.lengths[b].sum()) for b in bs)

    random_batches = list(torch.randperm(400, generator=gen).split(16))
    assert padding(batches) < 0.25 * padding(random_batches)
    half = data.batch_indices(16, torch.Generator().manual_seed(1), fraction=0.5)
    assert len(torch.cat(half)) == 200


def test_gather_cuts_a_batch_to_its_longest_sequence():
    data = _lengths_data([3, 9, 5, 20])
    b = data.gather(torch.tensor([0, 2]), torch.device("cpu"))
    assert isinstance(b, SpeechBatch)
    assert b.x.shape == (2, 5, 2) and b.lengths.tolist() == [3, 5]
    assert b.targets.shape == (2, 3) and b.target_lengths.tolist() == [3, 3]
    both = SequenceData.concat([data, _lengths_data([30])])
    assert len(both) == 5 and both.x.shape[1] == 30
    assert both.transcripts() == ["one"] * 5


def _parts(widths_and_sizes, feature_dim=3, seed=0, shortest=2) -> list[SequenceData]:
    """Sequence data sets of random lengths, each padded to its own width (as a cache
    file per chunk is)."""
    gen = torch.Generator().manual_seed(seed)
    words = ["one", "seven", "two three"]
    parts = []
    for width, n in widths_and_sizes:
        lengths = torch.randint(shortest, width + 1, (n,), generator=gen).tolist()
        lengths[0] = width  # the part's widest sequence sets its padding
        parts.append(SequenceData.from_lists(
            [torch.randn(t, feature_dim, generator=gen) for t in lengths],
            [encode(words[(len(parts) + i) % 3]) for i in range(n)]))
    return parts


def _same_batch(a: SpeechBatch, b: SpeechBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("x", "lengths", "targets", "target_lengths"))


def test_chunked_sequences_draw_and_gather_the_batches_of_their_concatenation():
    from gnp.data import place

    parts = _parts([(40, 30), (9, 25), (23, 1), (31, 40)])
    chunked, whole = ChunkedSequenceData(parts), SequenceData.concat(parts)
    cpu = torch.device("cpu")
    assert len(chunked) == len(whole) == 96 and chunked.feature_dim == 3
    assert chunked.nbytes == whole.nbytes and chunked.device == cpu
    for fraction in (1.0, 0.5):
        ours = chunked.batch_indices(8, torch.Generator().manual_seed(4), fraction)
        theirs = whole.batch_indices(8, torch.Generator().manual_seed(4), fraction)
        assert len(ours) == len(theirs) > 1
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
            assert _same_batch(chunked.gather(a, cpu), whole.gather(b, cpu))
    assert _same_batch(chunked.gather(slice(50, 90), cpu), whole.gather(slice(50, 90), cpu))
    resident = chunked.to("cpu")
    assert isinstance(resident, SequenceData) and torch.equal(resident.x, whole.x)
    assert resident.transcripts() == whole.transcripts() == chunked.transcripts()
    assert place(chunked, cpu, resident_bytes=whole.nbytes - 1) is chunked  # streamed
    assert isinstance(place(chunked, cpu, resident_bytes=whole.nbytes), SequenceData)


def test_a_chunked_subset_is_a_view_of_the_parts_in_index_order():
    parts = _parts([(12, 5), (30, 7), (8, 4)])
    chunked, whole = ChunkedSequenceData(parts), SequenceData.concat(parts)
    lead = chunked.subset(slice(0, 9))  # the new chunks' rows: a leading slice
    assert len(lead) == 9 and len(lead.parts) == 2
    assert lead.parts[0].x.data_ptr() == parts[0].x.data_ptr()  # no copy
    assert lead.parts[1].x.data_ptr() == parts[1].x.data_ptr()
    assert torch.equal(lead.to("cpu").x, whole.subset(slice(0, 9)).x[:, :30])
    picked = [14, 2, 3, 4, 9, 0]
    sub = chunked.subset(picked)
    assert sub.transcripts() == [whole.transcripts()[i] for i in picked]
    assert sub.lengths.tolist() == whole.lengths[picked].tolist()
    assert _same_batch(sub.gather(slice(None), torch.device("cpu")),
                       whole.gather(torch.tensor(picked), torch.device("cpu")))
    with pytest.raises(ValueError, match="feature dimension"):
        ChunkedSequenceData([parts[0], _parts([(5, 2)], feature_dim=4)[0]])


def test_an_update_learns_the_same_from_streamed_and_resident_sequences():
    """Streaming changes where batches come from, not what is learnt: the same seed gives
    the same model, bit for bit."""
    from gnp.models import build_model
    from gnp.policies import Schedule, update
    from gnp.prune import PruneConfig
    from gnp.speech_protocol import SPEECH_TRAIN

    train = _parts([(24, 20), (16, 28)], 12, shortest=12)  # batches of 3 (16 steps an epoch)
    val = _parts([(18, 3), (22, 3)], 12, seed=1, shortest=12)
    build = lambda: build_model("deepspeech2-hlstm-tiny", (12,), NUM_SYMBOLS)  # noqa: E731
    models = []
    for streamed in (False, True):
        data = ChunkedSequenceData(train) if streamed else SequenceData.concat(train)
        valid = ChunkedSequenceData(val) if streamed else SequenceData.concat(val)
        schedule = Schedule(new_epochs=1, all_epochs=1, baseline_epochs=2, grow_every=1,
                            train=dataclasses.replace(SPEECH_TRAIN, resident_bytes=1 if streamed
                                                      else None),
                            prune=PruneConfig(max_iterations=1, retrain_epochs=0.5))
        models.append(update("ours", None, new=data.subset(slice(0, 20)), all=data, val=valid,
                             schedule=schedule, build=build, device="cpu", seed=3,
                             task=CTC_TASK).model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def _write_wav(path: Path, seconds: float, freq: float, rate: int = 8000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


@pytest.fixture
def tiny_fsdd(tmp_path):
    for speaker in ("ann", "bob", "cy"):
        for digit in (0, 3, 7):
            for n in range(7):
                _write_wav(tmp_path / f"{digit}_{speaker}_{n}.wav", 0.2 + 0.01 * n, 200 + 50 * digit)
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_read_wav_roundtrip(tiny_fsdd):
    samples, rate = read_wav(tiny_fsdd / "3_bob_2.wav")
    assert rate == 8000 and samples.shape == (int(0.22 * 8000),)
    assert samples.abs().max() == pytest.approx(0.3, abs=1e-3)


def test_fsdd_official_split_and_transcripts(tiny_fsdd):
    ds = load_dataset("fsdd", tiny_fsdd)
    assert len(ds.test) == 3 * 3 * 5 and len(ds.train) == 3 * 3 * 2  # recordings 0-4 test
    assert ds.input_shape == (20,) and ds.num_classes == NUM_SYMBOLS and ds.task is CTC_TASK
    assert set(ds.train.transcripts()) == {DIGIT_WORDS[d] for d in (0, 3, 7)}
    assert set(ds.train.groups) == {"ann", "bob", "cy"}


def test_fsdd_held_out_speakers(tiny_fsdd):
    ds = load_dataset("fsdd", tiny_fsdd, test_speakers=["cy"])
    assert set(ds.test.groups) == {"cy"} and set(ds.train.groups) == {"ann", "bob"}
    assert len(ds.test) == 21 and len(ds.train) == 42
    with pytest.raises(ValueError, match="test speakers"):
        load_dataset("fsdd", tiny_fsdd, test_speakers=["zed"])
    with pytest.raises(FileNotFoundError):
        load_dataset("fsdd", tiny_fsdd / "nothing-here")


def test_speaker_split_gives_each_speaker_a_chunk_and_a_validation_part(tiny_fsdd):
    ds = load_dataset("fsdd", tiny_fsdd)
    speakers, chunks, vals = speaker_split(ds.train, 0.5, order=["cy", "ann", "bob"])
    assert speakers == ["cy", "ann", "bob"]
    for s, c, v in zip(speakers, chunks, vals):
        assert set(c.groups) == {s} and set(v.groups) == {s}
        assert len(c) + len(v) == 6


@pytest.mark.skipif(not FSDD.is_dir(), reason="FSDD not on this machine")
def test_real_fsdd_official_split_sizes():
    ds = load_dataset("fsdd", FSDD)
    assert len(ds.test) == 200 and len(ds.train) == 1800
    assert ds.train.x.shape[2] == 20 and int(ds.train.lengths.max()) <= 140
