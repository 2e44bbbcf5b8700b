"""The update worker: learns sealed chunks with gnp's ``ours`` update and swaps the result in.

One thread. Each time chunks seal (:meth:`UpdateWorker.notify`, the Ingestor's
``on_sealed``) and once at start-up, it computes the *pending* chunks (stored chunks
not in the served version's lineage) and runs ONE ``gnp.update("ours", ...)`` over all
of them together; chunks that seal meanwhile join the next update. New data = train
split of the pending chunks, replay = train split of every stored chunk, validation =
val split of every stored chunk.

A result is accepted only if it is finite and its validation accuracy is at least
``max(min_accuracy, served model's accuracy on the same validation set -
max_accuracy_drop)``. Accepted: saved to the registry, then published, then metrics.

Failure policy (exception, non-finite result, accuracy collapse): the served model
stays and the chunks stay pending, but the worker does not retry on its own: the next
seal retries them together with the new chunk. A chunk that has been part of
``max_attempts`` (default 2) failed updates is quarantined: left out of new data, replay
and validation until the daemon restarts (quarantine is kept in memory only, so a
restart gives poisoned chunks another two tries). An abandoned update (stop requested)
is not a failure: its chunks stay pending for the next run.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ModelVersion, ServedModel, UpdateCost

__all__ = ["UpdatePolicy", "UpdateResult", "UpdateWorker", "record_served"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class UpdatePolicy:
    """How updates run and when a result is accepted (built from settings.train).

    ``schedule`` is "paper", "quick" or a ready ``gnp.Schedule``.
    """

    device: str = "auto"
    schedule: Any = "paper"
    min_accuracy: float = 0.0
    max_accuracy_drop: float = 0.1
    stop_timeout: float = 30.0
    max_attempts: int = 2

    @classmethod
    def from_settings(cls, settings: Any) -> UpdatePolicy:
        """The policy of ``settings.train``."""
        t = settings.train
        return cls(device=str(t.device), schedule=t.schedule,
                   min_accuracy=float(t.min_accuracy),
                   max_accuracy_drop=float(t.max_accuracy_drop),
                   stop_timeout=float(t.stop_timeout_seconds))


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of one update: "success" (with the new version), "failed" or "abandoned"."""

    outcome: str
    chunk_ids: tuple[str, ...]
    duration: float
    version: ModelVersion | None = None
    reason: str = ""
    quarantined: tuple[str, ...] = field(default=())


def record_served(metrics: Metrics, version: ModelVersion) -> None:
    """Set the served-model gauges for ``version``."""
    metrics.model_accuracy.set(version.val_accuracy)
    metrics.model_parameters.set(version.active_params)
    metrics.model_dense_parameters.set(version.dense_params)
    metrics.model_version.set(version.version)


def _gnp() -> Any:
    import gnp  # lazily: the daemon's serving side and unit tests don't need it at import

    return gnp


def _schedule(schedule: Any) -> Any:
    if schedule == "paper":
        return _gnp().Schedule()
    if schedule == "quick":
        return _gnp().Schedule.quick()
    if isinstance(schedule, str):
        raise ValueError(f"schedule must be 'paper', 'quick' or a gnp.Schedule, got {schedule!r}")
    return schedule


def _non_finite(model: nn.Module) -> str | None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class UpdateWorker:
    """Background thread running one update at a time over the pending chunks.

    Args:
        store: the ChunkStore (``chunks()``, ``buffered``, ``dataset(ids, split)``).
        registry: where accepted models are saved.
        served: where accepted models are published.
        metrics: update and served-model metrics.
        policy: device, schedule, acceptance thresholds, stop bound.
        on_result: called with every :class:`UpdateResult` (from the worker thread).
        update_fn, evaluate_fn: default to ``gnp.update`` and ``gnp.evaluate`` (tests inject).
    """

    def __init__(self, store: Any, registry: ModelRegistry, served: ServedModel,
                 metrics: Metrics, policy: UpdatePolicy = UpdatePolicy(),
                 on_result: Callable[[UpdateResult], None] | None = None,
                 update_fn: Callable[..., Any] | None = None,
                 evaluate_fn: Callable[..., float] | None = None) -> None:
        self.store, self.registry, self.served = store, registry, served
        self.metrics, self.policy, self.on_result = metrics, policy, on_result
        self._update_fn = update_fn
        self._evaluate_fn = evaluate_fn
        self._failures: dict[str, int] = {}
        self._quarantined: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)
        self._last_log = (0.0, "")
        metrics.store_buffered.set_function(self.buffered)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; it first learns any chunks stored but not yet trained on."""
        version = self.served.version
        stored = {str(c.id) for c in self.store.chunks()}
        seen = set(version.seen_chunk_ids) if version else set()
        missing = sorted(seen - stored, key=lambda i: (len(i), i))
        if missing:
            log.warning("the served version %d has seen chunk(s) %s that the store does not "
                        "hold: are the store and model folders from the same deployment?",
                        version.version, missing[:10])
        self._wake.set()
        self._thread.start()

    def notify(self, chunks: Iterable[Any] = ()) -> None:
        """Chunks sealed (the Ingestor's ``on_sealed``): wake the worker; never blocks."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask a running update to stop (gnp abandons it between epochs) and join.

        Returns True when the thread ended within ``timeout`` (default: the policy's bound).
        """
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.policy.stop_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning("update still running after the stop bound; leaving it behind")
            return False
        return True

    @property
    def busy(self) -> bool:
        """True while an update runs."""
        return self._busy.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.update_pending()
            except Exception:  # noqa: BLE001 - the worker must outlive a bad store read
                log.exception("update worker error; waiting for the next sealed chunk")

    # -- state -----------------------------------------------------------------

    def pending(self, chunks: Sequence[Any] | None = None) -> list[Any]:
        """Stored chunks (or ``chunks``) not in the served lineage and not quarantined."""
        version = self.served.version
        seen = set(version.seen_chunk_ids) if version else set()
        return [c for c in (self.store.chunks() if chunks is None else chunks)
                if str(c.id) not in seen and str(c.id) not in self._quarantined]

    def buffered(self) -> float:
        """Samples not trained on yet: the store's open buffer plus pending chunks."""
        return float(self.store.buffered + sum(int(c.rows) for c in self.pending()))

    @property
    def quarantined(self) -> frozenset[str]:
        """Chunk ids left out after repeated failed updates (until restart)."""
        return frozenset(self._quarantined)

    # -- one update ------------------------------------------------------------

    def update_pending(self) -> UpdateResult | None:
        """Run one update over the pending chunks now (in the caller's thread).

        Returns None when nothing is pending, else the :class:`UpdateResult`.
        """
        stored = self.store.chunks()  # one snapshot: chunks sealing now join the next update
        pending = self.pending(stored)
        if not pending:
            return None
        ids = tuple(str(c.id) for c in pending)
        self._busy.set()
        start = time.perf_counter()
        try:
            outcome, version, reason = self._attempt(pending, stored)
        finally:
            self._busy.clear()
        result = self._conclude(outcome, ids, time.perf_counter() - start, version, reason)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _attempt(self, pending: Sequence[Any],
                 stored: Sequence[Any]) -> tuple[str, ModelVersion | None, str]:
        gnp = _gnp()
        current = self.served.current()
        usable = [c for c in stored if str(c.id) not in self._quarantined]
        new_ids = [c.id for c in pending]
        all_ids = [c.id for c in usable]
        log.info("update starting: %d new chunk(s) %s, %d stored", len(new_ids),
                 [str(i) for i in new_ids], len(all_ids))
        try:
            new = gnp.Data.from_numpy(*self.store.dataset(new_ids, split="train"))
            replay = gnp.Data.from_numpy(*self.store.dataset(all_ids, split="train"))
            val = gnp.Data.from_numpy(*self.store.dataset(all_ids, split="val"))
            floor = self._accuracy_floor(current, val)
            update = self._update_fn or gnp.update
            res = update("ours", copy.deepcopy(current[0]) if current else None,
                         new=new, all=replay, val=val, schedule=_schedule(self.policy.schedule),
                         build=self.registry.build, device=self.policy.device,
                         progress=self._progress,
                         should_stop=self._stop.is_set)
        except gnp.Abandoned:
            return "abandoned", None, "stop requested"
        except Exception as e:  # noqa: BLE001 - any training error leaves serving intact
            log.exception("update raised")
            return "failed", None, f"{type(e).__name__}: {e}"
        reason = self._reject_reason(res, floor)
        if reason:
            return "failed", None, reason
        try:
            return "success", self._save_and_publish(res, current, pending), ""
        except OSError as e:
            log.exception("could not save the new version")
            return "failed", None, f"checkpoint not saved: {e}"

    def _accuracy_floor(self, current: tuple[nn.Module, ModelVersion] | None, val: Any) -> float:
        floor = self.policy.min_accuracy
        if current is not None and len(val):
            evaluate = self._evaluate_fn or _gnp().evaluate
            served_acc = float(evaluate(current[0], val))
            floor = max(floor, served_acc - self.policy.max_accuracy_drop)
        return floor

    @staticmethod
    def _reject_reason(res: Any, floor: float) -> str:
        acc = float(res.val_accuracy)
        if not math.isfinite(acc):
            return f"non-finite validation accuracy {acc}"
        bad = _non_finite(res.model)
        if bad is not None:
            return f"non-finite values in {bad}"
        if acc < floor:
            return f"validation accuracy {acc:.4f} below the floor {floor:.4f}"
        return ""

    def _save_and_publish(self, res: Any, current: tuple[nn.Module, ModelVersion] | None,
                          pending: Sequence[Any]) -> ModelVersion:
        parent = current[1] if current else None
        ids = tuple(str(c.id) for c in pending)
        seen = tuple(parent.seen_chunk_ids if parent else ()) + ids
        meta = ModelVersion(
            version=0, parent=parent.version if parent else None, created=time.time(),
            model_name=self.registry.model_name, input_shape=self.registry.input_shape,
            num_classes=self.registry.num_classes, chunk_ids=ids, seen_chunk_ids=seen,
            offsets={str(c.id): _offsets(c.offsets) for c in pending},
            val_accuracy=float(res.val_accuracy), active_params=int(res.params.active),
            dense_params=int(res.params.dense), store_id=getattr(self.store, "store_id", ""),
            cost=UpdateCost(int(res.cost.sample_passes), float(res.cost.epochs),
                            float(res.cost.wall_seconds), str(res.cost.device)))
        model = res.model.to("cpu").eval()
        version = self.registry.save(model, meta)
        self.served.publish(model, version)
        return version

    def _conclude(self, outcome: str, ids: tuple[str, ...], duration: float,
                  version: ModelVersion | None, reason: str) -> UpdateResult:
        m = self.metrics
        m.updates.labels(outcome=outcome).inc()
        m.update_duration.observe(duration)
        quarantined: tuple[str, ...] = ()
        if outcome == "success":
            for i in ids:
                self._failures.pop(i, None)
            record_served(m, version)
            m.model_swaps.inc()
            m.model_last_swap.set(version.created)
            m.update_epochs.set(version.cost.epochs)
            m.update_sample_passes.inc(version.cost.sample_passes)
            m.update_last_success.set(time.time())
            log.info("update succeeded in %.1fs: version %d, val accuracy %.4f, %d/%d params",
                     duration, version.version, version.val_accuracy,
                     version.active_params, version.dense_params)
        elif outcome == "failed":
            quarantined = self._count_failure(ids)
            log.warning("update failed after %.1fs (%s); serving stays on version %s",
                        duration, reason, getattr(self.served.version, "version", None))
        else:
            log.info("update abandoned after %.1fs: %s", duration, reason)
        return UpdateResult(outcome, ids, duration, version, reason, quarantined)

    def _count_failure(self, ids: Iterable[str]) -> tuple[str, ...]:
        out = []
        for i in ids:
            self._failures[i] = self._failures.get(i, 0) + 1
            if self._failures[i] >= self.policy.max_attempts:
                self._quarantined.add(i)
                out.append(i)
        if out:
            log.error("quarantined chunk(s) %s after %d failed updates; they are left out "
                      "until restart", out, self.policy.max_attempts)
        return tuple(out)

    def _progress(self, phase: str, step: int, total: int) -> None:
        now = time.monotonic()
        last_t, last_phase = self._last_log
        if phase != last_phase or now - last_t >= _PROGRESS_EVERY_S:
            self._last_log = (now, phase)
            log.info("update progress: %s %d/%d", phase, step, total)


def _offsets(offsets: Any) -> dict[str, tuple[int, int]]:
    """A chunk's offsets as {partition: (first, last)}."""
    return {str(p): (int(r[0]), int(r[1])) for p, r in dict(offsets or {}).items()}
