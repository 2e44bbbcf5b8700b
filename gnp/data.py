"""Data sets and the paper's incremental split: Fashion-MNIST, scikit-learn digits.

Images are float32 in [0, 1], shape (N, C, H, W); labels int64. Nothing is
downloaded: Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`
(or a directory of the four IDX .gz files given by the user), digits ship with
scikit-learn.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Data", "Dataset", "DATASETS", "FASHION_MNIST_DIR", "load_dataset",
    "fashion_mnist_available", "incremental_split",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


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


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Data
    test: Data
    input_shape: tuple[int, ...]
    num_classes: int


def _fmnist_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("GNP_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    base = _fmnist_root(root)
    return all((base / f).is_file() for pair in _FMNIST_FILES.values() for f in pair)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): big-endian dims after a magic number."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _load_fashion_mnist(root: str | os.PathLike | None) -> Dataset:
    base = _fmnist_root(root)
    if not fashion_mnist_available(base):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {base}: install the Debian package "
            "dataset-fashion-mnist or pass the directory holding the four IDX .gz files")
    parts = {}
    for split, (images, labels) in _FMNIST_FILES.items():
        x = _read_idx(base / images).astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
        parts[split] = Data.from_numpy(x, _read_idx(base / labels))
    return Dataset("fashion-mnist", parts["train"], parts["test"], (1, 28, 28), 10)


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


DATASETS = {"fashion-mnist": _load_fashion_mnist, "digits": _load_digits}


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by name ("fashion-mnist" or "digits")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root)


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
