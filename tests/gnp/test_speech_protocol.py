"""The speech protocols end to end on a few WAVs the test writes (tiny model)."""

import json

import numpy as np
import pytest

from gnp import experiments
from gnp.speech_protocol import first_chunks, speech_schedule
from tests.gnp.test_speech_data import _write_wav


@pytest.fixture
def wavs(tmp_path):
    d = tmp_path / "fsdd"
    d.mkdir()
    for speaker in ("ann", "bob"):
        for digit in (1, 6):
            for n in range(9):
                _write_wav(d / f"{digit}_{speaker}_{n}.wav", 0.25, 300 + 200 * digit)
    return d


def test_first_model_learns_forty_percent_for_speech():
    args = experiments.parse_args(["--dataset", "digits", "--out", "x"])
    assert first_chunks(args) == 1
    args.dataset, args.chunks = "fsdd", 10
    assert first_chunks(args) == 4


def test_paper_speech_schedule():
    s = speech_schedule()
    assert (s.new_epochs, s.all_epochs, s.baseline_epochs) == (20, 30, 120)
    assert speech_schedule(quick=True).baseline_epochs < 120


def test_speech_needs_a_speech_model():
    with pytest.raises(SystemExit):
        experiments.parse_args(["--dataset", "fsdd", "--model", "lenet-5", "--data-dir", "d", "--out", "x"])
    with pytest.raises(SystemExit):
        experiments.parse_args(["--dataset", "fsdd", "--model", "deepspeech2-hlstm", "--out", "x"])
    with pytest.raises(SystemExit):
        experiments.parse_args(["--dataset", "digits", "--split", "speakers", "--out", "x"])


def test_random_split_protocol_reports_wer(wavs, tmp_path):
    out = tmp_path / "out"
    assert experiments.main(["--model", "deepspeech2-hlstm-tiny", "--dataset", "fsdd",
                             "--data-dir", str(wavs), "--chunks", "5", "--first-fraction", "0.6",
                             "--methods", "ours,tfs", "--quick", "--stop-after", "4",
                             "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["metric"] == "WER"
    assert [(r["chunk"], r["method"]) for r in doc["rows"]] == [
        (3, "ours"), (3, "tfs"), (4, "ours"), (4, "tfs")]
    assert all(0.0 <= r["test_error_pct"] <= 100.0 for r in doc["rows"])
    assert "WER %" in (out / "results.md").read_text()


def test_speaker_split_reports_seen_and_unseen(wavs, tmp_path):
    out = tmp_path / "out"
    experiments.main(["--model", "deepspeech2-hlstm-tiny", "--dataset", "fsdd",
                      "--data-dir", str(wavs), "--split", "speakers", "--methods", "ours,nft",
                      "--quick", "--out", str(out), "--no-progress"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["speakers"], r["method"]) for r in rows] == [
        ("ann", "ours"), ("ann", "nft"), ("ann+bob", "ours"), ("ann+bob", "nft")]
    assert all(r["unseen_error_pct"] is not None for r in rows[:2])
    assert all(r["unseen_error_pct"] is None for r in rows[2:])
    md = (out / "results.md").read_text()
    assert "WER seen %" in md and (out / "results-speakers.png").is_file()


def test_a_stopped_speaker_run_resumes_with_the_same_results(wavs, tmp_path, capsys):
    common = ["--model", "deepspeech2-hlstm-tiny", "--dataset", "fsdd", "--data-dir", str(wavs),
              "--split", "speakers", "--methods", "ours,nft", "--quick", "--no-progress"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert experiments.main([*common, "--out", str(whole)]) == 0
    assert experiments.main([*common, "--out", str(parts), "--stop-after", "1"]) == 0
    assert (parts / "checkpoints" / "seed0.pt").exists()
    assert experiments.main([*common, "--out", str(parts), "--resume"]) == 0
    assert "seed 0 goes on after chunk 1" in capsys.readouterr().out

    def rows(folder):
        return [{k: v for k, v in r.items() if k != "wall_seconds"}
                for r in json.loads((folder / "results.json").read_text())["rows"]]
    assert [(r["speakers"], r["method"]) for r in rows(parts)] == [
        ("ann", "ours"), ("ann", "nft"), ("ann+bob", "ours"), ("ann+bob", "nft")]
    assert rows(parts) == rows(whole)
