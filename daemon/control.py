"""Which version is served and which one learning continues from: pin, unpin, roll back.

Two versions matter. The *head* is the newest version learning continues from (the
next update trains it and its lineage decides which chunks are pending). The *served*
version answers requests. Normally they are the same. A **pin** (``pin.json`` in the
model folder, so it survives restarts) serves version N until unpinned: updates still
train from the head, pass the gate and are saved, but are not swapped in; unpinning
serves the head. A **rollback** to version N saves a copy of N as a new version
(``restored_from = N``, parent = N's parent) and serves it; it becomes the head, so
learning continues from it and the chunks learnt after N are learnt again with the next
update. A rollback while an update runs makes that update's result void (it started
from the old head). Rolling back while pinned is refused: unpin first.

:class:`ModelControl` is shared by the update worker and the admin HTTP routes
(:mod:`daemon.admin`); every change happens under its lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

from torch import nn

from daemon.manifest import write_atomic
from daemon.metrics import Metrics
from daemon.registry import CheckpointError, ModelRegistry, ModelVersion, ServedModel, UpdateCost

__all__ = ["ControlError", "ModelControl", "record_served"]

log = logging.getLogger(__name__)

PIN_FILE = "pin.json"


class ControlError(Exception):
    """A pin or rollback that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def record_served(metrics: Metrics, version: ModelVersion,
                  served: dict[str, Any] | None = None) -> None:
    """Set the served-model gauges for ``version`` (and ``ServedModel.info()``)."""
    from gnp.models import SPEECH_MODELS

    if served:
        metrics.model_served_parameters.set(served["parameters"])
        if served["latency_seconds_batch1"] is not None:
            metrics.model_served_latency.set(served["latency_seconds_batch1"])
    metrics.model_accuracy.set(version.val_accuracy)
    # a speech model's validation metric is 1 - WER (gnp.tasks.CTC): chart it as a WER too
    speech = version.model_name in SPEECH_MODELS
    metrics.model_wer.set(1.0 - version.val_accuracy if speech else float("nan"))
    metrics.model_parameters.set(version.active_params)
    metrics.model_dense_parameters.set(version.dense_params)
    metrics.model_version.set(version.version)


class ModelControl:
    """The served and head versions, the pin, and rollbacks (see the module docstring).

    Args:
        served, registry, metrics: the daemon's.
        store_id: versions of other stores can be neither pinned nor restored.
        head: the version learning continues from (default: the served one).
    """

    def __init__(self, served: ServedModel, registry: ModelRegistry, metrics: Metrics,
                 store_id: str = "", head: ModelVersion | None = None) -> None:
        self.served, self.registry, self.metrics = served, registry, metrics
        self.store_id = store_id
        self.head = head if head is not None else served.version
        self.lock = threading.RLock()
        self.generation = 0  # bumped by a rollback: updates started before it are void
        self._pin_path = registry.path / PIN_FILE
        metrics.model_pinned.set_function(lambda: float(self.pinned() or 0))

    # -- state -------------------------------------------------------------------------------

    def pinned(self) -> int | None:
        """The pinned version number, None when not pinned."""
        try:
            return int(json.loads(self._pin_path.read_text())["version"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("ignoring unreadable %s: %s", self._pin_path, e)
            return None

    def status(self) -> dict[str, Any]:
        """Pin and head, for ``GET /v1/model``."""
        served = self.served.version
        return {"pinned": self.pinned(), "head_version": getattr(self.head, "version", None),
                "restored_from": getattr(served, "restored_from", None)}

    def protected(self) -> set[int]:
        """Versions that must never be deleted: served, head, pinned."""
        keep = {v.version for v in (self.served.version, self.head) if v is not None}
        pin = self.pinned()
        return keep | ({pin} if pin else set())

    def start(self, head: tuple[nn.Module, ModelVersion] | None = None) -> None:
        """At start-up: serve the pinned version if there is one, else ``head`` (loaded)."""
        if head is not None:
            self.head = head[1]
        pin = self.pinned()
        if pin is not None:
            try:
                model, version = self._load(pin)
                self._publish(model, version, swap=False)
                log.warning("serving pinned version %d (DELETE /v1/model/pin to serve the "
                            "newest)", pin)
                return
            except ControlError as e:
                log.error("cannot serve the pinned version %d (%s): unpinning, serving the "
                          "newest version", pin, e)
                self._pin_path.unlink(missing_ok=True)
        if head is not None:
            self._publish(*head, swap=False)

    # -- changes -----------------------------------------------------------------------------

    def advance(self, model: nn.Module, version: ModelVersion) -> bool:
        """A new version was saved by an update: it is the head; serve it unless pinned.

        Returns True when it was published. Call under :attr:`lock`.
        """
        with self.lock:
            self.head = version
            if self.pinned() is not None:
                log.info("version %d saved; not served while version %d is pinned",
                         version.version, self.pinned())
                return False
            self._publish(model, version, swap=False)
            return True

    def pin(self, number: int) -> ModelVersion:
        """Serve version ``number`` until unpinned (persisted); raises ControlError."""
        with self.lock:
            model, version = self._load(number)
            write_atomic(self._pin_path, lambda f: f.write(
                json.dumps({"version": number, "since": time.time()}).encode()))
            self._publish(model, version)
            log.warning("pinned version %d: updates go on being saved but are not served",
                        number)
            return version

    def unpin(self) -> ModelVersion | None:
        """Remove the pin and serve the head; returns the served version."""
        with self.lock:
            head = None  # loaded before the pin goes: a head that does not load keeps the pin
            if self.head is not None and getattr(self.served.version, "version", None) \
                    != self.head.version:
                head = self._load(self.head.version)
            self._pin_path.unlink(missing_ok=True)
            if head is not None:
                self._publish(*head)
            log.info("unpinned: serving version %s", getattr(self.served.version, "version", None))
            return self.served.version

    def rollback(self, number: int | None = None) -> ModelVersion:
        """Serve (a copy of) version ``number``, default the served one's parent."""
        with self.lock:
            pin, served = self.pinned(), self.served.version
            if pin is not None:
                raise ControlError(409, f"version {pin} is pinned: unpin it first "
                                        "(DELETE /v1/model/pin)")
            if served is None:
                raise ControlError(409, "no model is served yet")
            if number is None:
                number = served.parent
                if number is None:
                    raise ControlError(409, f"the served version {served.version} has no "
                                            "previous version to roll back to")
            if number == served.version:
                raise ControlError(409, f"version {number} is already served")
            model, target = self._load(number)
            copy = dataclasses.replace(
                target, version=0, parent=target.parent, created=time.time(), chunk_ids=(),
                offsets={}, cost=UpdateCost(), restored_from=number)
            saved = self.registry.save(model, copy)
            self.head = saved
            self.generation += 1
            self._publish(model, saved)
            self.metrics.model_rollbacks.inc()
            log.warning("rolled back to version %d (saved as version %d); learning continues "
                        "from it", number, saved.version)
            return saved

    # -- helpers -----------------------------------------------------------------------------

    def _load(self, number: int) -> tuple[nn.Module, ModelVersion]:
        try:
            meta = self.registry.meta(number)
        except CheckpointError as e:
            raise ControlError(404, f"version {number} does not exist or is unreadable "
                                    f"({e})") from None
        if meta.store_id and self.store_id and meta.store_id != self.store_id:
            raise ControlError(409, f"version {number} learnt from another store "
                                    f"({meta.store_id}, this one is {self.store_id})")
        try:
            return self.registry.load(number)
        except CheckpointError as e:
            raise ControlError(404, f"version {number} cannot be loaded: {e}") from None

    def _publish(self, model: nn.Module, version: ModelVersion, swap: bool = True) -> None:
        """Serve ``model``; ``swap`` counts it as a swap (updates count their own)."""
        self.served.publish(model, version)
        record_served(self.metrics, version, self.served.info())
        if swap:
            self.metrics.model_swaps.inc()
            self.metrics.model_last_swap.set(time.time())
