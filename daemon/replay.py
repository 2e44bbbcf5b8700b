"""Training data for one update, read from memory-mapped chunk files within a memory bound.

Used by the training child (:mod:`daemon.trainproc`). Each chunk file is opened with
``pa.memory_map`` + ``ipc.open_file``; its ``features`` column (a fixed-size list of
float32) is viewed without a copy as an ``(rows, *input_shape)`` numpy array and wrapped
by ``torch.from_numpy`` -- one tensor per record batch, backed by the page cache, costing
no private memory. :func:`chunked` hands gnp one ``gnp.ChunkedData`` per role (new data,
replay, validation) over those tensors, with the rows of the role's split selected by
index. gnp makes a data set resident on the training device only while it fits the replay
budget (``GNPD_TRAIN__REPLAY_MEMORY_BYTES``, one budget for all three, validation first);
the rest streams from the memory maps batch by batch. Nothing is left out for memory.

Speech chunks hold raw audio, not features: their MFCCs are cached per chunk in the
store and read back the same way, memory-mapped and zero-copy, as the parts of a
``gnp.sequences.ChunkedSequenceData`` (:func:`daemon.speech_store.speech_sets`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch

__all__ = ["ChunkView", "chunked", "row_bytes"]

log = logging.getLogger(__name__)


def row_bytes(input_size: int) -> int:
    """Resident bytes of one sample: float32 features plus an int64 label."""
    return 4 * int(input_size) + 8


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


def chunked(views: Sequence[ChunkView], split: Literal["train", "val"]):
    """The ``split`` rows of ``views``, in order, as one ``gnp.ChunkedData`` over the
    memory maps (no copy), or None when there is none."""
    import gnp

    parts, rows = [], []
    for view in views:
        for (xs, ys), is_val in zip(view.tensors(), view.is_val, strict=True):
            idx = np.flatnonzero(is_val if split == "val" else ~is_val)
            if len(idx):
                parts.append(gnp.Data(xs, ys))
                rows.append(torch.from_numpy(idx))
    return gnp.ChunkedData(parts, rows) if parts else None
