"""Characters of a transcript, CTC greedy decoding, and word / character error rates.

The alphabet is the CTC blank (index 0), the space (1) and the 26 lower-case letters
(2..27): 28 symbols. Transcripts are normalised to lower case with single spaces.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["BLANK", "ALPHABET", "NUM_SYMBOLS", "normalise", "valid_transcript", "encode",
           "decode", "greedy_decode", "edit_distance", "word_errors", "wer", "cer"]

BLANK = 0
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # symbol i + 1 is ALPHABET[i]; 0 is the blank
NUM_SYMBOLS = len(ALPHABET) + 1
_INDEX = {ch: i + 1 for i, ch in enumerate(ALPHABET)}


def normalise(text: str) -> str:
    """Lower case, words separated by one space, no leading or trailing space."""
    return " ".join(text.lower().split())


def valid_transcript(text: str) -> str | None:
    """None if `text` (normalised) is non-empty and uses only the alphabet, else the reason."""
    norm = normalise(text)
    if not norm:
        return "empty transcript"
    bad = sorted({ch for ch in norm if ch not in _INDEX})
    return f"characters outside the alphabet: {''.join(bad)!r}" if bad else None


def encode(text: str) -> list[int]:
    """Symbol indices of a transcript (ValueError for characters outside the alphabet)."""
    reason = valid_transcript(text)
    if reason is not None:
        raise ValueError(f"cannot encode {text!r}: {reason}")
    return [_INDEX[ch] for ch in normalise(text)]


def decode(symbols: Sequence[int]) -> str:
    """The text of symbol indices (blanks dropped, nothing collapsed)."""
    return "".join(ALPHABET[s - 1] for s in symbols if s != BLANK)


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best path of CTC outputs (B, T, symbols): argmax per frame, repeats collapsed, blanks
    dropped, within each sequence's length."""
    best = log_probs.argmax(-1).cpu()  # (B, T)
    out = []
    for row, n in zip(best.tolist(), lengths.cpu().tolist()):
        path = row[:n]
        kept = [s for i, s in enumerate(path) if s != BLANK and (i == 0 or s != path[i - 1])]
        out.append(normalise(decode(kept)))
    return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_errors(ref: str, hyp: str) -> int:
    """Word-level edit distance of a hypothesis from its reference."""
    return edit_distance(ref.split(), hyp.split())


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate: total word edits / total reference words."""
    words = sum(len(r.split()) for r in refs)
    return sum(word_errors(r, h) for r, h in zip(refs, hyps, strict=True)) / max(words, 1)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate: total character edits / total reference characters."""
    chars = sum(len(r) for r in refs)
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / max(chars, 1)
