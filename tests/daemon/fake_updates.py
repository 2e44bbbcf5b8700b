"""Stand-ins for ``gnp.update`` / ``gnp.evaluate`` that run INSIDE the training child.

The update worker names them in its policy (``update_fn="tests.daemon.fake_updates:raises"``);
the child imports them from the repository root. Everything else (process, store, files,
checkpoint, verification, gate) is real.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch

import gnp

SCRIPT_ENV = "GNPD_TEST_UPDATE_SCRIPT"


def fake_result(model, accuracy: float = 0.9, poison: bool = False, **kw):
    model = copy.deepcopy(model) if model is not None else kw["build"]()
    if poison:
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
    return SimpleNamespace(
        model=model, val_accuracy=accuracy, params=gnp.count_parameters(model),
        cost=SimpleNamespace(sample_passes=10, epochs=0.1, wall_seconds=0.01, device="cpu"))


def ok(method, model, **kw):
    return fake_result(model, **kw)


def raises(method, model, **kw):
    raise RuntimeError("boom")


def diverged(method, model, **kw):
    raise gnp.TrainingDiverged("nan loss")


def nan_weights(method, model, **kw):
    return fake_result(model, poison=True, **kw)


def nan_accuracy(method, model, **kw):
    return fake_result(model, accuracy=math.nan, **kw)


def collapse(method, model, **kw):
    return fake_result(model, accuracy=0.01, **kw)


def accuracy_075(method, model, **kw):
    return fake_result(model, accuracy=0.75, **kw)


def evaluate_09(model, data):
    return 0.9


def scripted(method, model, **kw):
    """Pops the first line of the file named by $GNPD_TEST_UPDATE_SCRIPT: ok | fail."""
    path = Path(os.environ[SCRIPT_ENV])
    first, *rest = path.read_text().split()
    path.write_text("\n".join(rest))
    if first == "fail":
        raise RuntimeError("poisoned")
    return fake_result(model, **kw)


ACCURACY_ENV = "GNPD_TEST_ACCURACY"


def marker(model) -> float:
    """A version's "accuracy" for the gate tests: the first bias of its last layer."""
    return float(list(model.parameters())[-1].detach()[0])


def set_marker(model, value: float) -> None:
    with torch.no_grad():
        list(model.parameters())[-1][0] = value


def marked(method, model, **kw):
    """A candidate whose accuracy (and marker) is $GNPD_TEST_ACCURACY."""
    accuracy = float(os.environ[ACCURACY_ENV])
    result = fake_result(model, accuracy=accuracy, **kw)
    set_marker(result.model, accuracy)
    return result


def evaluate_marker(model, data):
    return marker(model)


PRIORITY_ENV = "GNPD_TEST_PRIORITY_FILE"


def records_priority(method, model, **kw):
    """Writes the niceness of every thread of the child, once torch's threads run."""
    a = torch.ones(512, 512)
    for _ in range(4):
        a = (a @ a).clamp_(max=1.0)  # a parallel op: torch's intra-op threads start
    nice = [int(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[16])
            for t in Path("/proc/self/task").iterdir()]
    Path(os.environ[PRIORITY_ENV]).write_text(
        f"{torch.get_num_threads()} {' '.join(map(str, nice))}")
    return fake_result(model, **kw)


SEED_ENV = "GNPD_TEST_SEED_FILE"


def records_seed(method, model, **kw):
    """Appends the seed the update was given to the file named by $GNPD_TEST_SEED_FILE."""
    with open(os.environ[SEED_ENV], "a") as f:
        f.write(f"{kw['seed']}\n")
    return fake_result(model, **kw)


TRAIN_ENV = "GNPD_TEST_TRAIN_FILE"


def records_train_config(method, model, **kw):
    """Writes the schedule's TrainConfig the update was given to $GNPD_TEST_TRAIN_FILE."""
    import dataclasses
    import json

    with open(os.environ[TRAIN_ENV], "w") as f:
        json.dump(dataclasses.asdict(kw["schedule"].train), f)
    return fake_result(model, **kw)


def sleepy(method, model, **kw):
    """Takes a few seconds, like a real update (for races with a rollback)."""
    import time

    time.sleep(4)
    return fake_result(model, **kw)
