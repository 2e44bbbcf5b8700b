"""A chunk store, model registry, served model and metrics in a temporary folder, with an
update-worker factory: the setting of the updater, trainproc and admin tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import gnp
from daemon.messages import Sample
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ServedModel
from daemon.store import ChunkStore
from daemon.updater import UpdatePolicy, UpdateWorker

SHAPE = (1, 8, 8)
FAKE = "tests.daemon.fake_updates:"  # stand-in updates, imported by the training child
TINY = gnp.Schedule(new_epochs=1, all_epochs=1, baseline_epochs=2, grow_every=1,
                    prune=gnp.PruneConfig(max_iterations=2, retrain_epochs=0.5))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits training set as flat feature rows and labels."""
    d = gnp.load_dataset("digits").train
    return d.x.numpy().reshape(len(d), -1), d.y.numpy()


class UpdateEnv:
    """`seal()` appends whole chunks of digits (cycling through them); `worker(**policy)`
    builds an UpdateWorker whose policy is `defaults` updated by `policy`."""

    def __init__(self, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray], chunk: int,
                 **defaults: Any) -> None:
        self.x, self.y = digits
        self.path, self.chunk = tmp_path, chunk
        self.store = ChunkStore(tmp_path / "store", chunk, SHAPE, val_fraction=0.2)
        self.registry = ModelRegistry(tmp_path / "models", "lenet-300-100", SHAPE, 10)
        self.served, self.metrics = ServedModel(SHAPE), Metrics()
        self.offset = 0
        self.defaults = {"device": "cpu", **defaults}

    def seal(self, chunks: int = 1) -> None:
        for _ in range(chunks):
            rows = range(self.offset, self.offset + self.chunk)
            self.store.append([Sample(self.x[i % len(self.x)], int(self.y[i % len(self.y)]),
                                      0, i) for i in rows])
            self.offset += self.chunk

    def worker(self, **policy: Any) -> UpdateWorker:
        return UpdateWorker(self.store, self.registry, self.served, self.metrics,
                            UpdatePolicy(**{**self.defaults, **policy}))

    def sample(self, name: str, labels: dict | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value
