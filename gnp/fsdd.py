"""The Free Spoken Digit Dataset: `{digit}_{speaker}_{index}.wav`, transcripts the digit words.

Test split: FSDD's official one (recordings 0-4 of every speaker and digit), or, with
`test_speakers`, every recording of those speakers (the others' are all training data).
Features: per-utterance normalised MFCCs (gnp.audio); targets: CTC symbols
(gnp.transcripts). Each sample's group is its speaker.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from gnp.audio import FeatureConfig, mfcc, read_wav
from gnp.sequences import SequenceData
from gnp.transcripts import NUM_SYMBOLS, encode

__all__ = ["DIGIT_WORDS", "FSDD_NAME", "fsdd_files", "load_fsdd", "speaker_split"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
OFFICIAL_TEST = range(5)  # recordings 0-4 of each speaker and digit


def fsdd_files(root: str | os.PathLike) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, index) of every FSDD WAV in `root` (or `root`/recordings),
    sorted by speaker, digit, index."""
    base = Path(root)
    if not any(base.glob("*.wav")) and (base / "recordings").is_dir():
        base = base / "recordings"
    found = []
    for p in base.glob("*.wav"):
        m = FSDD_NAME.match(p.name)
        if m:
            found.append((p, int(m.group(1)), m.group(2), int(m.group(3))))
    if not found:
        raise FileNotFoundError(f"fsdd: no {{digit}}_{{speaker}}_{{index}}.wav files in {root}")
    return sorted(found, key=lambda f: (f[2], f[1], f[3]))


def _data(files: list[tuple[Path, int, str, int]], cfg: FeatureConfig) -> SequenceData:
    feats, targets, groups = [], [], []
    for path, digit, speaker, _ in files:
        samples, rate = read_wav(path)
        feats.append(mfcc(samples, rate, cfg))
        targets.append(encode(DIGIT_WORDS[digit]))
        groups.append(speaker)
    return SequenceData.from_lists(feats, targets, groups)


def load_fsdd(root: str | os.PathLike | None, test_speakers: list[str] | None = None,
              cfg: FeatureConfig = FeatureConfig()):
    """FSDD as a gnp.data.Dataset of SequenceData with the CTC task."""
    from gnp.data import Dataset
    from gnp.tasks import CTC_TASK

    if root is None:
        raise FileNotFoundError("fsdd: pass --data-dir, the directory of the FSDD WAV files")
    files = fsdd_files(root)
    speakers = sorted({f[2] for f in files})
    if test_speakers:
        unknown = sorted(set(test_speakers) - set(speakers))
        if unknown or set(test_speakers) == set(speakers):
            raise ValueError(f"test speakers {test_speakers} must be some (not all) of {speakers}")
        is_test = [f[2] in test_speakers for f in files]
    else:
        is_test = [f[3] in OFFICIAL_TEST for f in files]
    train = _data([f for f, t in zip(files, is_test) if not t], cfg)
    test = _data([f for f, t in zip(files, is_test) if t], cfg)
    return Dataset("fsdd", train, test, (cfg.n_mfcc,), NUM_SYMBOLS, CTC_TASK)


def speaker_split(train: SequenceData, val_share: float, seed: int = 0,
                  order: list[str] | None = None) -> tuple[list[str], list[SequenceData], list[SequenceData]]:
    """Speakers in arrival order, and per speaker a training chunk and a validation part
    (a random `val_share` of that speaker's recordings)."""
    speakers = order or sorted(set(train.groups))
    gen = torch.Generator().manual_seed(seed)
    chunks, vals = [], []
    for s in speakers:
        idx = torch.tensor([i for i, g in enumerate(train.groups) if g == s])
        if len(idx) == 0:
            raise ValueError(f"no training recordings of speaker {s!r}")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = max(1, int(round(val_share * len(idx))))
        vals.append(train.subset(idx[:n_val]))
        chunks.append(train.subset(idx[n_val:]))
    return speakers, chunks, vals
