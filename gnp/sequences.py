"""Variable-length sequence data (speech features with transcripts) for the trainer.

`SequenceData` has the `Samples` interface of gnp.data. Features are stored padded
to the longest sequence, with each sequence's length; a batch is cut to the longest
sequence *in the batch*. Training batches are length-bucketed: a random order is cut
into windows of `BUCKET_BATCHES` batches, each window sorted by length and split
into batches, and the batches shuffled, so a batch holds sequences of similar
length (little padding) while an epoch stays a random order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpeechBatch", "SequenceData", "BUCKET_BATCHES", "pad_sequences"]

BUCKET_BATCHES = 8


@dataclass(frozen=True)
class SpeechBatch:
    """x (B, T, F) padded features, lengths (B,), targets (B, L) padded symbol indices,
    target_lengths (B,)."""

    x: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def pad_sequences(seqs: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors of shape (T_i, ...) into (N, max T_i, ...) padded with `value`, and
    their lengths (N,) int64."""
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out = seqs[0].new_full((len(seqs), int(lengths.max()), *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


@dataclass(frozen=True)
class SequenceData:
    """Padded features x (N, T, F) float32, lengths (N,), targets (N, L) int64 padded with
    the blank, target_lengths (N,), and a group label per sample (e.g. the speaker)."""

    x: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        sizes = {len(self.lengths), len(self.targets), len(self.target_lengths)}
        if sizes != {n} or (self.groups and len(self.groups) != n):
            raise ValueError(f"SequenceData parts disagree on the number of samples: x has {n}, "
                             f"lengths/targets/target_lengths {sorted(sizes)}, groups {len(self.groups)}")
        if n and int(self.lengths.min()) < 1:
            raise ValueError("every sequence needs at least one frame")

    @classmethod
    def from_lists(cls, features: list[torch.Tensor], targets: list[list[int]],
                   groups: list[str] | None = None) -> "SequenceData":
        x, lengths = pad_sequences([f.float() for f in features])
        t, t_len = pad_sequences([torch.tensor(s, dtype=torch.int64) for s in targets], 0)
        return cls(x, lengths, t.long(), t_len, tuple(groups or ()))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.x, self.lengths, self.targets, self.target_lengths))

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def feature_dim(self) -> int:
        return int(self.x.shape[2])

    def to(self, device: torch.device | str) -> "SequenceData":
        return SequenceData(self.x.to(device), self.lengths.to(device), self.targets.to(device),
                            self.target_lengths.to(device), self.groups)

    def batch_indices(self, batch_size: int, gen: torch.Generator,
                      fraction: float = 1.0) -> list[torch.Tensor]:
        """Length-bucketed batches of a random order of (a `fraction` of) the samples."""
        n = max(1, int(round(len(self) * fraction)))
        order = torch.randperm(len(self), device=gen.device, generator=gen)[:n]
        lengths = self.lengths.to(gen.device)
        batches: list[torch.Tensor] = []
        for window in order.split(batch_size * BUCKET_BATCHES):
            window = window[torch.argsort(lengths[window], stable=True)]
            batches += list(window.split(batch_size))
        shuffle = torch.randperm(len(batches), device=gen.device, generator=gen).tolist()
        return [batches[i] for i in shuffle]

    def gather(self, index: torch.Tensor | slice, device: torch.device) -> SpeechBatch:
        """The batch at `index` on `device`, cut to its longest sequence and target."""
        if isinstance(index, torch.Tensor) and index.device != self.x.device:
            index = index.to(self.x.device)
        lengths, t_len = self.lengths[index], self.target_lengths[index]
        t_max, l_max = int(lengths.max()), max(int(t_len.max()), 1)
        return SpeechBatch(self.x[index, :t_max].to(device, non_blocking=True),
                           lengths.to(device), self.targets[index, :l_max].to(device),
                           t_len.to(device))

    def subset(self, index: torch.Tensor | slice | list[int]) -> "SequenceData":
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.int64)
        idx = torch.arange(len(self))[index].tolist() if self.groups else []
        return SequenceData(self.x[index], self.lengths[index], self.targets[index],
                            self.target_lengths[index], tuple(self.groups[i] for i in idx))

    @staticmethod
    def concat(parts: list["SequenceData"]) -> "SequenceData":
        """One data set of several (padding widened to the longest)."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of SequenceData")
        t_max = max(p.x.shape[1] for p in parts)
        l_max = max(p.targets.shape[1] for p in parts)
        x = torch.cat([torch.nn.functional.pad(p.x, (0, 0, 0, t_max - p.x.shape[1])) for p in parts])
        t = torch.cat([torch.nn.functional.pad(p.targets, (0, l_max - p.targets.shape[1]))
                       for p in parts])
        groups = sum((p.groups for p in parts), ()) if all(p.groups for p in parts) else ()
        return SequenceData(x, torch.cat([p.lengths for p in parts]), t,
                            torch.cat([p.target_lengths for p in parts]), groups)

    def transcripts(self) -> list[str]:
        from gnp.transcripts import decode
        return [decode(row[:n]) for row, n in zip(self.targets.tolist(), self.target_lengths.tolist())]
