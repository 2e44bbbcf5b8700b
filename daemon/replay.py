"""Training data for one update, read from memory-mapped chunk files within a memory bound.

Used by the training child (:mod:`daemon.trainproc`). Each chunk file is opened with
``pa.memory_map`` + ``ipc.open_file``; its ``features`` column (a fixed-size list of
float32) is viewed without a copy as an ``(rows, *input_shape)`` numpy array and wrapped
by ``torch.from_numpy`` -- one tensor per chunk, backed by the page cache, costing no
private memory. gnp trains on one ``gnp.Data`` per role today, so the rows of a split
are gathered ONCE into a resident buffer (:func:`gather`, the only copy); new data is a
prefix view of the replay buffer, never a second copy.

The bound: :func:`plan_resident` is the one place that decides what becomes resident,
within ``budget_bytes`` (``GNPD_TRAIN__REPLAY_MEMORY_BYTES``). When gnp accepts
memory-mapped data with its own resident budget, hand it :class:`ChunkView` tensors and
the budget instead of the gathered buffers (see the note in :func:`gather`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch

__all__ = ["ChunkView", "ResidentPlan", "gather", "plan_resident", "row_bytes"]

log = logging.getLogger(__name__)


def row_bytes(input_size: int) -> int:
    """Resident bytes of one sample: float32 features plus an int64 label."""
    return 4 * int(input_size) + 8


@dataclass(frozen=True)
class ResidentPlan:
    """Which chunks an update holds in memory: ``new`` first, then older ``replay`` ones."""

    new: tuple[Any, ...]
    old: tuple[Any, ...]
    deferred: tuple[Any, ...]  # pending chunks left for the next update (over the budget)
    dropped: tuple[Any, ...]  # older chunks not replayed this time (over the budget)
    nbytes: int

    @property
    def chunks(self) -> tuple[Any, ...]:
        """Every resident chunk, in buffer order: new ones, then older ones."""
        return self.new + self.old


def plan_resident(pending: Sequence[Any], older: Sequence[Any], budget_bytes: int,
                  input_size: int) -> ResidentPlan:
    """Choose the chunks (objects with ``rows``) an update keeps resident within a budget.

    Pending chunks are learnt oldest first, within half the budget (always at least
    one: a chunk is the unit of learning); the rest wait for the next update. Older
    chunks are replayed newest first while the whole (train and validation rows of
    every resident chunk) fits the budget.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    per_row = row_bytes(input_size)
    new, used = [], 0
    for c in pending:
        cost = int(c.rows) * per_row
        if new and used + cost > budget_bytes // 2:
            break
        new.append(c)
        used += cost
    old, dropped = [], []
    for c in reversed(list(older)):
        cost = int(c.rows) * per_row
        if used + cost <= budget_bytes:
            old.append(c)
            used += cost
        else:
            dropped.append(c)
    old.sort(key=lambda c: c.id)
    return ResidentPlan(tuple(new), tuple(old), tuple(pending[len(new):]),
                        tuple(sorted(dropped, key=lambda c: c.id)), used)


class ChunkView:
    """A chunk file memory-mapped read-only: zero-copy features, labels and split mask.

    Raises OSError / pyarrow errors when the file cannot be read (the caller has
    verified its checksum first).
    """

    def __init__(self, path: Path, input_shape: Sequence[int]) -> None:
        self.path = path
        self.input_shape = tuple(int(d) for d in input_shape)
        size = int(np.prod(self.input_shape))
        self._source = pa.memory_map(str(path), "r")
        table = ipc.open_file(self._source).read_all()  # buffers point into the map
        self.features: list[np.ndarray] = []  # one (rows, *input_shape) view per batch
        self.labels: list[np.ndarray] = []
        self.is_val: list[np.ndarray] = []
        for batch in table.to_batches():
            flat = batch.column("features").flatten().to_numpy(zero_copy_only=True)
            self.features.append(flat.reshape(-1, *self.input_shape))
            assert flat.size == batch.num_rows * size
            self.labels.append(batch.column("label").to_numpy(zero_copy_only=True))
            self.is_val.append(pc.equal(batch.column("split"), "val")
                               .to_numpy(zero_copy_only=False))

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` torch tensors wrapping the memory map, one pair per record batch."""
        with warnings.catch_warnings():  # read-only map: torch warns; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return [(torch.from_numpy(x), torch.from_numpy(y))
                    for x, y in zip(self.features, self.labels, strict=True)]

    def rows(self, split: Literal["train", "val"]) -> int:
        """Samples of ``split`` in this chunk."""
        return int(sum((m if split == "val" else ~m).sum() for m in self.is_val))

    def close(self) -> None:
        self._source.close()


def gather(views: Sequence[ChunkView], split: Literal["train", "val"],
           input_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` rows of ``views``, in order, as one resident (x, y) pair.

    This is where the one copy of the data happens: gnp.Data holds one tensor per
    role, so the chosen rows of each chunk's memory-mapped tensor are index-selected
    straight into a preallocated buffer (no intermediate per-chunk copy). Replace this
    with a lazy concatenation of ``view.tensors()`` once gnp takes memory-mapped data.
    """
    n = sum(v.rows(split) for v in views)
    x = torch.empty((n, *input_shape), dtype=torch.float32)
    y = torch.empty(n, dtype=torch.int64)
    at = 0
    for view in views:
        for (xs, ys), is_val in zip(view.tensors(), view.is_val, strict=True):
            idx = torch.from_numpy(np.flatnonzero(is_val if split == "val" else ~is_val))
            k = len(idx)
            torch.index_select(xs, 0, idx, out=x[at:at + k])
            torch.index_select(ys, 0, idx, out=y[at:at + k])
            at += k
    return x, y
