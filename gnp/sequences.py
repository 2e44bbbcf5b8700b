"""Variable-length sequence data (speech features with transcripts) for the trainer.

`SequenceData` has the `Samples` interface of gnp.data. Features are stored padded
to the longest sequence, with each sequence's length; a batch is cut to the longest
sequence *in the batch*. Training batches are length-bucketed: a random order is cut
into windows of `BUCKET_BATCHES` batches, each window sorted by length and split
into batches, and the batches shuffled, so a batch holds sequences of similar
length (little padding) while an epoch stays a random order.

`ChunkedSequenceData` reads several `SequenceData` parts (e.g. views of memory-mapped
feature files) as one, without concatenating them: only the lengths are held in memory,
and each batch is gathered from the parts. It draws the same batches as the
concatenation and gathers the same values, so a data set can stream or be resident
(`gnp.data.place`) without changing what is learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpeechBatch", "SequenceData", "ChunkedSequenceData", "BUCKET_BATCHES",
           "pad_sequences"]

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


def _bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator,
                      fraction: float) -> list[torch.Tensor]:
    """Length-bucketed batches of a random order of (a `fraction` of) len(lengths) samples;
    the indices live on `gen`'s device."""
    n = max(1, int(round(len(lengths) * fraction)))
    order = torch.randperm(len(lengths), device=gen.device, generator=gen)[:n]
    lengths = lengths.to(gen.device)
    batches: list[torch.Tensor] = []
    for window in order.split(batch_size * BUCKET_BATCHES):
        window = window[torch.argsort(lengths[window], stable=True)]
        batches += list(window.split(batch_size))
    shuffle = torch.randperm(len(batches), device=gen.device, generator=gen).tolist()
    return [batches[i] for i in shuffle]


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
        return _bucketed_batches(self.lengths, batch_size, gen, fraction)

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


class ChunkedSequenceData:
    """Several `SequenceData` parts read as one, without concatenating them in memory.

    The parts stay where they are (CPU tensors, possibly views of memory-mapped files,
    each padded to its own width); only the lengths (N,) are copied. Batches are drawn
    and gathered exactly as from `SequenceData.concat(parts)`: same indices for the same
    generator, same values, cut to the batch's longest sequence and target.
    """

    def __init__(self, parts: list[SequenceData]) -> None:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("ChunkedSequenceData needs at least one non-empty part")
        if len({p.feature_dim for p in parts}) != 1:
            raise ValueError(f"parts disagree on the feature dimension: "
                             f"{sorted({p.feature_dim for p in parts})}")
        self.parts = parts
        self.lengths = torch.cat([p.lengths.cpu() for p in parts])  # (N,)
        self.target_lengths = torch.cat([p.target_lengths.cpu() for p in parts])  # (N,)
        self.starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
        self.groups = sum((p.groups for p in parts), ()) if all(p.groups for p in parts) else ()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the samples take once resident (what `to` allocates: padded to the
        longest sequence and target of the whole set)."""
        frames, letters = int(self.lengths.max()), max(int(self.target_lengths.max()), 1)
        return len(self) * (4 * frames * self.feature_dim + 8 * letters + 16)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def feature_dim(self) -> int:
        return self.parts[0].feature_dim

    def batch_indices(self, batch_size: int, gen: torch.Generator,
                      fraction: float = 1.0) -> list[torch.Tensor]:
        """Length-bucketed batches, as `SequenceData.batch_indices` of the concatenation."""
        return _bucketed_batches(self.lengths, batch_size, gen, fraction)

    def _locate(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(global indices (B,), part of each (B,)) on the CPU."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = index.cpu()
        return index, torch.searchsorted(self.starts[1:], index, right=True)

    def gather(self, index: torch.Tensor | slice, device: torch.device) -> SpeechBatch:
        """The batch at `index` on `device`, cut to its longest sequence and target."""
        index, part = self._locate(index)
        lengths, t_len = self.lengths[index], self.target_lengths[index]
        t_max, l_max = int(lengths.max()), max(int(t_len.max()), 1)
        first = self.parts[0]
        x = first.x.new_zeros((len(index), t_max, self.feature_dim))  # (B, T, F)
        targets = first.targets.new_zeros((len(index), l_max))  # (B, L)
        for p in part.unique().tolist():
            at = (part == p).nonzero().squeeze(1)
            local, src = index[at] - self.starts[p], self.parts[p]
            # a part is padded to its own longest; rows past a sequence's end are zeros
            w, lw = min(t_max, src.x.shape[1]), min(l_max, src.targets.shape[1])
            x[at, :w] = src.x[local, :w]
            targets[at, :lw] = src.targets[local, :lw]
        return SpeechBatch(x.to(device, non_blocking=True), lengths.to(device),
                           targets.to(device), t_len.to(device))

    def to(self, device: torch.device | str) -> SequenceData:
        """All samples as one resident `SequenceData` on `device`: the one copy."""
        b = self.gather(slice(None), torch.device(device))
        return SequenceData(b.x, b.lengths, b.targets, b.target_lengths, self.groups)

    def subset(self, index: torch.Tensor | slice | list[int]) -> "ChunkedSequenceData":
        """The samples at `index`, in its order, copying nothing: each run of consecutive
        samples of one part becomes a view of it (a leading slice: one view per part)."""
        index, part = self._locate(torch.as_tensor(index, dtype=torch.int64)
                                    if isinstance(index, list) else index)
        if len(index) == 0:
            raise ValueError("a subset needs at least one sample")
        local = index - self.starts[part]
        # split where the part changes or the rows stop being consecutive
        cut = ((part[1:] != part[:-1]) | (local[1:] != local[:-1] + 1)).nonzero().squeeze(1) + 1
        parts = []
        for run, p in zip(local.tensor_split(cut), part[torch.cat([cut.new_zeros(1), cut])]):
            parts.append(self.parts[int(p)].subset(slice(int(run[0]), int(run[-1]) + 1)))
        return ChunkedSequenceData(parts)

    def transcripts(self) -> list[str]:
        return [t for p in self.parts for t in p.transcripts()]
