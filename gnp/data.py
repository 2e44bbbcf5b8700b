"""Data sets and the paper's incremental split: MNIST, Fashion-MNIST, scikit-learn digits.

Images are float32 in [0, 1], shape (N, C, H, W); labels int64. Nothing is
downloaded: Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`,
MNIST (and Fashion-MNIST elsewhere) from a directory holding the four official IDX
.gz files that the user gives, digits ship with scikit-learn.

A data set the trainer reads is anything with the `Samples` interface: its length,
`batch_indices` (a shuffled epoch, split into batches) and `gather` (one batch on a
device). `Data` holds two tensors; `ChunkedData` holds several (e.g. memory-mapped
chunk files) and gathers batches from them without concatenating them in memory.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "Samples", "Data", "ChunkedData", "Dataset", "DATASETS", "FASHION_MNIST_DIR",
    "load_dataset", "fashion_mnist_available", "idx_files_available", "incremental_split",
    "place", "place_all", "random_subset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class Samples(Protocol):
    """What the trainer needs of a data set."""

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def batch_indices(self, batch_size: int, gen: torch.Generator,
                      fraction: float = 1.0) -> list[torch.Tensor]: ...

    def gather(self, index: torch.Tensor | slice, device: torch.device) -> Any: ...

    def to(self, device: torch.device | str) -> "Samples": ...


def _shuffled_batches(n: int, batch_size: int, gen: torch.Generator,
                      fraction: float) -> list[torch.Tensor]:
    order = torch.randperm(n, device=gen.device, generator=gen)
    return list(order[: max(1, int(round(n * fraction)))].split(batch_size))


@dataclass(frozen=True)
class Data:
    """Inputs x (N, *input_shape) float32 and labels y (N,) int64, on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> "Data":
        return Data(self.x.to(device), self.y.to(device))

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    @property
    def device(self) -> torch.device:
        return self.x.device

    def batch_indices(self, batch_size: int, gen: torch.Generator,
                      fraction: float = 1.0) -> list[torch.Tensor]:
        """A random order of (a `fraction` of) the samples, split into batches; the
        indices live on `gen`'s device."""
        return _shuffled_batches(len(self), batch_size, gen, fraction)

    def gather(self, index: torch.Tensor | slice,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch (x, y) at `index`, on `device`."""
        if isinstance(index, torch.Tensor) and index.device != self.x.device:
            index = index.to(self.x.device)
        x, y = self.x[index], self.y[index]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def subset(self, index: torch.Tensor | slice) -> "Data":
        return Data(self.x[index], self.y[index])

    @staticmethod
    def concat(parts: list["Data"]) -> "Data":
        if not parts:
            raise ValueError("cannot concatenate an empty list of Data")
        return Data(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))

    @staticmethod
    def from_numpy(x: np.ndarray, y: np.ndarray) -> "Data":
        return Data(torch.as_tensor(np.asarray(x, dtype=np.float32)),
                    torch.as_tensor(np.asarray(y, dtype=np.int64)))


class ChunkedData:
    """Several `Data` parts read as one, without concatenating them in memory.

    The parts stay where they are (CPU tensors, possibly views of memory-mapped
    files); each batch is gathered from them and moved to the training device.
    `rows[i]`, when given, selects the rows of part i that belong to this data set
    (e.g. the training rows of a chunk file that also holds validation rows).
    """

    def __init__(self, parts: list[Data], rows: list[torch.Tensor | None] | None = None) -> None:
        if not parts:
            raise ValueError("ChunkedData needs at least one part")
        self.parts = parts
        self.rows = list(rows) if rows is not None else [None] * len(parts)
        if len(self.rows) != len(parts):
            raise ValueError(f"{len(parts)} parts but {len(self.rows)} row selections")
        sizes = [len(p) if r is None else len(r) for p, r in zip(parts, self.rows)]
        self.starts = torch.tensor([0] + sizes).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the rows take once resident (what `to` allocates)."""
        first = self.parts[0]
        per_row = first.x[:1].nbytes + first.y[:1].nbytes
        return len(self) * per_row

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def batch_indices(self, batch_size: int, gen: torch.Generator,
                      fraction: float = 1.0) -> list[torch.Tensor]:
        return _shuffled_batches(len(self), batch_size, gen, fraction)

    def gather(self, index: torch.Tensor | slice,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = index.cpu()
        part = torch.searchsorted(self.starts[1:], index, right=True)
        first = self.parts[0]
        x = first.x.new_empty((len(index), *first.x.shape[1:]))
        y = first.y.new_empty((len(index),))
        for p in part.unique().tolist():
            at = (part == p).nonzero().squeeze(1)
            local = index[at] - self.starts[p]
            if self.rows[p] is not None:
                local = self.rows[p][local]
            x[at], y[at] = self.parts[p].x[local], self.parts[p].y[local]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def to(self, device: torch.device | str) -> Data:
        """All rows concatenated on `device` (resident): the one copy."""
        return Data(*self.gather(slice(None), torch.device(device)))


def place(data: Samples, device: torch.device, resident_bytes: int | None) -> Samples:
    """`data` resident on `device` when it fits the budget (None: no limit), else left
    where it is, to be streamed to the device batch by batch."""
    if resident_bytes is None or data.nbytes <= resident_bytes:
        return data.to(device)
    return data


def place_all(sets: dict[str, Samples], device: torch.device,
              resident_bytes: int | None) -> dict[str, Samples]:
    """`place` each data set in turn (in the order given) within ONE budget: what is made
    resident is subtracted before the next."""
    left, out = resident_bytes, {}
    for name, data in sets.items():
        out[name] = place(data, device, left)
        if left is not None and out[name] is not data:
            left -= data.nbytes
    return out


def random_subset(data, n: int, seed: int = 0):
    """A fixed random subset of `n` samples of `data` (reduced runs), the same for a seed.

    Raises:
        ValueError: n not in [1, len(data)].
    """
    if not 1 <= n <= len(data):
        raise ValueError(f"a subset needs 1..{len(data)} samples, got {n}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(keep[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Data
    test: Data
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or CTC symbols (blank included) for speech
    task: Any = None  # gnp.tasks.Task; None = classification


def _fmnist_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("GNP_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def idx_files_available(root: str | os.PathLike) -> bool:
    """True if `root` holds the four IDX .gz files of (Fashion-)MNIST."""
    return all((Path(root) / f).is_file() for pair in _IDX_FILES.values() for f in pair)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    return idx_files_available(_fmnist_root(root))


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): big-endian dims after a magic number."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {body.size} values, its header says {dims}")
    return body.reshape(dims)


def _load_idx_dataset(name: str, base: Path, hint: str) -> Dataset:
    if not idx_files_available(base):
        missing = [f for pair in _IDX_FILES.values() for f in pair if not (base / f).is_file()]
        raise FileNotFoundError(f"{name}: {base} lacks {', '.join(missing)} ({hint})")
    parts = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = _read_idx(base / images).astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
        y = _read_idx(base / labels)
        if len(x) != len(y):
            raise ValueError(f"{name} {split}: {len(x)} images but {len(y)} labels")
        parts[split] = Data.from_numpy(x, y)
    return Dataset(name, parts["train"], parts["test"], tuple(parts["train"].x.shape[1:]), 10)


def _load_fashion_mnist(root: str | os.PathLike | None) -> Dataset:
    return _load_idx_dataset("fashion-mnist", _fmnist_root(root),
                             "install the Debian package dataset-fashion-mnist or pass "
                             "the directory holding the four IDX .gz files")


def _load_mnist(root: str | os.PathLike | None) -> Dataset:
    if root is None:
        raise FileNotFoundError("mnist: pass --data-dir, a directory holding the four official "
                                "IDX .gz files (train-images-idx3-ubyte.gz, ...); nothing is "
                                "downloaded")
    return _load_idx_dataset("mnist", Path(root), "the four official MNIST IDX .gz files")


def _load_digits(root: str | os.PathLike | None = None) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", Data.from_numpy(x[train], y[train]),
                   Data.from_numpy(x[test], y[test]), (1, 8, 8), 10)


def _load_fsdd(root: str | os.PathLike | None = None, **options: Any) -> Dataset:
    from gnp.fsdd import load_fsdd  # torchaudio only for speech

    return load_fsdd(root, **options)


DATASETS = {"fashion-mnist": _load_fashion_mnist, "mnist": _load_mnist, "digits": _load_digits,
            "fsdd": _load_fsdd}


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load a data set by name ("mnist", "fashion-mnist", "digits" or "fsdd"); `root` is the
    directory of its files where it has some; `options` go to the loader (fsdd:
    test_speakers)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root, **options)


def incremental_split(train: Data, chunks: int, val_size: int,
                      seed: int = 0) -> tuple[list[Data], Data]:
    """Shuffle, hold out `val_size` samples for validation, split the rest into equal chunks.

    The paper's protocol for Fashion-MNIST: 5K of the 60K training images for
    validation, the other 55K arriving as 10 chunks of 5.5K.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if not 0 <= val_size < len(train):
        raise ValueError(f"val_size must be in [0, {len(train)}), got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val = train.subset(order[:val_size])
    rest = order[val_size:]
    return [train.subset(part) for part in torch.tensor_split(rest, chunks)], val
