"""The update worker: learns sealed chunks in a child process and swaps the result in.

One thread. On every seal (:meth:`UpdateWorker.notify`) and at start-up it takes the
*pending* chunks (stored, not in the head version's lineage, not left out) and runs ONE
update over them in a training child (:mod:`daemon.trainproc`, run by
:class:`daemon.supervisor.TrainingChild`), which reads the memory-mapped store itself
(data sets resident within ``replay_memory_bytes``, streamed from the memory maps beyond
it) and writes a candidate. This process verifies it (strict load, finite, gate),
saves it, and publishes it unless a version is pinned (:mod:`daemon.control`). A crash,
OOM kill or hang of training costs an update, never ingest or serving.

Gate: accuracy >= ``max(min_accuracy, best reference - max_accuracy_drop)``; references
are the served, head and ``gate_versions`` most recent versions, evaluated by the child
on the same validation set, so small drops cannot compound.

Outcomes: "failed" (training raised, non-finite, below the gate) is charged to the chunks
learnt; ``max_attempts`` charges quarantine a chunk. "infra_error" (OOM on host or device,
OSError such as a full disk, the child killed by a signal or past its time limit, a
candidate that does not load) and "abandoned" (stop, or a rollback meanwhile) are charged
to nobody. Counts, quarantine and corrupt chunks (failed checksum: reported, left out,
nobody blamed) persist in ``<store>/updates.json``. A failed update is not retried on its
own: the next seal or restart retries its chunks with the new ones.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daemon.control import ModelControl, record_served
from daemon.ledger import LEDGER, UpdateLedger
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ModelVersion, ServedModel, UpdateCost
from daemon.supervisor import ChildRun, TrainingChild
from daemon.trainproc import Job, schedule_to_json

# record_served lives in daemon.control; re-exported here for earlier callers.
__all__ = ["UpdatePolicy", "UpdateResult", "UpdateWorker", "record_served"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdatePolicy:
    """How updates run and when a result is accepted (built from settings.train).

    ``schedule`` is "paper", "quick" or a ready ``gnp.Schedule``. ``update_fn`` and
    ``evaluate_fn`` name (``module:function``) what the child calls; tests swap them.
    """

    device: str = "auto"
    schedule: Any = "paper"
    method: str = "ours"  # gnp.update's method: "ours" or "cgap"
    min_accuracy: float = 0.0
    max_accuracy_drop: float = 0.03
    gate_versions: int = 5
    stop_timeout: float = 30.0
    max_attempts: int = 2
    timeout: float = 6 * 3600.0
    replay_memory_bytes: int = 2 * 2**30
    child_memory_bytes: int = 0
    torch_threads: int = 0
    nice: int = 10  # added to the child's niceness: serving and ingestion go first
    keep_versions: int = 20
    augment: bool = False
    compile: str = "off"  # torch.compile mode of the training forward, or "off"
    update_fn: str = "gnp:update"
    evaluate_fn: str = "gnp:evaluate"

    @classmethod
    def from_settings(cls, settings: Any) -> UpdatePolicy:
        """The policy of ``settings.train``."""
        t = settings.train
        return cls(device=str(t.device), schedule=t.schedule, method=str(t.method),
                   min_accuracy=float(t.min_accuracy),
                   max_accuracy_drop=float(t.max_accuracy_drop),
                   gate_versions=int(t.gate_versions), stop_timeout=float(t.stop_timeout_seconds), max_attempts=t.max_attempts,
                   timeout=float(t.update_timeout_seconds),
                   replay_memory_bytes=int(t.replay_memory_bytes),
                   child_memory_bytes=int(t.child_memory_bytes),
                   torch_threads=int(t.torch_threads), nice=int(t.nice),
                   keep_versions=int(settings.model.keep_versions), augment=bool(t.augment),
                   compile=str(t.compile))


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of one update: "success" (with the new version), "failed", "infra_error",
    "abandoned", or "no_data" (every pending chunk was corrupt; nothing ran)."""

    outcome: str
    chunk_ids: tuple[str, ...]
    duration: float
    version: ModelVersion | None = None
    reason: str = ""
    quarantined: tuple[str, ...] = field(default=())
    corrupt: tuple[str, ...] = field(default=())
    samples: dict[str, int] = field(default_factory=dict)  # new / replay / val sample counts
    resident: dict[str, bool] = field(default_factory=dict)  # data set -> resident (else streamed)


def _non_finite(model: nn.Module) -> str | None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


@dataclass
class _Attempt:
    """What one update did, as the worker learns it."""

    outcome: str
    chunk_ids: tuple[str, ...]
    reason: str = ""
    version: ModelVersion | None = None
    result: dict[str, Any] = field(default_factory=dict)
    published: bool = False


class UpdateWorker:
    """Background thread running one update at a time over the pending chunks.

    Args:
        store: the ChunkStore (``path``, ``store_id``, ``input_shape``, ``chunks()``, ``buffered``).
        registry: where accepted models are saved (and the child loads versions from).
        served: where accepted models are published.
        metrics: update, store and served-model metrics.
        policy: device, schedule, limits, acceptance thresholds, stop bound.
        on_result: called with every :class:`UpdateResult` (from the worker thread).
        control: the served/head/pin state shared with the admin routes (default: a new
            one whose head is the served version).
    """

    def __init__(self, store: Any, registry: ModelRegistry, served: ServedModel,
                 metrics: Metrics, policy: UpdatePolicy = UpdatePolicy(),
                 on_result: Callable[[UpdateResult], None] | None = None,
                 control: ModelControl | None = None) -> None:
        self.store, self.registry, self.served = store, registry, served
        self.metrics, self.policy, self.on_result = metrics, policy, on_result
        self.ledger = UpdateLedger(Path(store.path) / LEDGER, policy.max_attempts)
        self.control = control or ModelControl(served, registry, metrics,
                                               getattr(store, "store_id", ""))
        self._child = TrainingChild(policy.timeout, grace=min(10.0, policy.stop_timeout / 2))
        self._work = registry.path / ".work"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)
        metrics.store_buffered.set_function(self.buffered)
        metrics.update_quarantined.set_function(lambda: len(self.ledger.quarantined))
        metrics.update_pending.set_function(lambda: len(self.pending()))
        metrics.store_corrupt.set_function(lambda: len(self.ledger.corrupt))

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; it first learns any chunks stored but not yet trained on."""
        shutil.rmtree(self._work, ignore_errors=True)  # candidates of a killed daemon
        if self.ledger.quarantined:
            log.warning("chunk(s) %s stay quarantined (see %s)",
                        sorted(self.ledger.quarantined), self.ledger.path)
        self._wake.set()
        self._thread.start()

    def notify(self, chunks: Iterable[Any] = ()) -> None:
        """Chunks sealed (the Ingestor's ``on_sealed``): wake the worker; never blocks."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop a running update (SIGTERM, then SIGKILL to the child) and join the thread.

        Returns True when the thread ended within ``timeout`` (default: the policy's bound).
        """
        self._stop.set()
        self._child.stop()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.policy.stop_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning("update worker still running after the stop bound; leaving it behind")
            return False
        return True

    @property
    def busy(self) -> bool:
        """True while an update runs."""
        return self._busy.is_set()

    @property
    def child_pid(self) -> int | None:
        """Pid of the running training child, if any."""
        return self._child.pid

    @property
    def head(self) -> ModelVersion | None:
        """The version the next update starts from."""
        return self.control.head

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                result = self.update_pending()
            except Exception:  # noqa: BLE001 - the worker must outlive a bad store read
                log.exception("update worker error; waiting for the next sealed chunk")
                continue
            # Chunks sealed while the update ran, or pending ones that corrupt chunks held up:
            # go on at once. Not after a no_data that excluded nothing (no validation rows
            # yet): the same chunks would answer the same; the next seal wakes the loop.
            if result is not None and self.pending() and (
                    result.outcome == "success" or (result.outcome == "no_data" and result.corrupt)):
                self._wake.set()

    # -- state -----------------------------------------------------------------

    def pending(self, chunks: Sequence[Any] | None = None) -> list[Any]:
        """Stored chunks (or ``chunks``) not in the head's lineage nor left out."""
        head = self.control.head
        seen = set(head.seen_chunk_ids) if head else set()
        excluded = self.ledger.excluded()
        return [c for c in (self.store.chunks() if chunks is None else chunks)
                if str(c.id) not in seen and str(c.id) not in excluded]

    def buffered(self) -> float:
        """Samples not trained on yet: the store's open buffer plus pending chunks."""
        return float(self.store.buffered + sum(int(c.rows) for c in self.pending()))

    @property
    def quarantined(self) -> frozenset[str]:
        """Chunk ids left out after repeated failed updates (persistent)."""
        return self.ledger.quarantined

    # -- one update ------------------------------------------------------------

    def update_pending(self) -> UpdateResult | None:
        """Run one update over the pending chunks now (in the caller's thread).

        Returns None when nothing is pending, else the :class:`UpdateResult`.
        """
        stored = self.store.chunks()  # one snapshot: chunks sealing now join the next update
        pending = self.pending(stored)
        if not pending:
            return None
        self._busy.set()
        start = time.perf_counter()
        try:
            attempt = self._attempt(pending, stored)
        finally:
            self._busy.clear()
        result = self._conclude(attempt, time.perf_counter() - start)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _attempt(self, pending: Sequence[Any], stored: Sequence[Any]) -> _Attempt:
        excluded = self.ledger.excluded() | {str(c.id) for c in pending}
        older = [c for c in stored if str(c.id) not in excluded]
        ids = tuple(str(c.id) for c in pending)
        log.info("update starting: %d new chunk(s) %s, %d stored", len(pending), list(ids),
                 len(pending) + len(older))
        out = self._work / f"update-{time.time_ns()}"
        try:
            out.mkdir(parents=True)  # a full disk or an unusable models folder: infra_error
            with self.control.lock:
                job, generation = self._job(pending, older, out), self.control.generation
            (out / "job.json").write_text(job.to_json())
            run = self._child.run(out / "job.json", out / "result.json")
            attempt = self._verdict(run, ids)
            if attempt.outcome == "success":
                attempt = self._accept(attempt, out, pending, generation)
            return attempt
        except OSError as e:  # the work folder itself: a storage problem
            log.exception("update could not run")
            return _Attempt("infra_error", ids, f"{type(e).__name__}: {e}")
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _references(self) -> list[int]:
        """Versions the candidate is gated against: served, head, and recent ones."""
        recent = [v.version for v in self.registry.history()
                  if v.store_id in ("", self.control.store_id)]
        refs = recent[-self.policy.gate_versions:] if self.policy.gate_versions else []
        for v in (self.served.version, self.control.head):
            if v is not None:
                refs.append(v.version)
        return sorted(set(refs))

    def _job(self, pending: Sequence[Any], older: Sequence[Any], out: Path) -> Job:
        head = self.control.head
        refs = self._references()
        return Job(
            store=str(self.store.path), input_shape=tuple(self.store.input_shape),
            pending=tuple(int(c.id) for c in pending), older=tuple(int(c.id) for c in older),
            registry=str(self.registry.path), model_name=self.registry.model_name,
            num_classes=self.registry.num_classes,
            base_version=head.version if head is not None else None,
            reference_versions=tuple(refs), out_dir=str(out),
            schedule=schedule_to_json(self.policy.schedule), method=self.policy.method,
            device=self.policy.device,
            replay_memory_bytes=self.policy.replay_memory_bytes, augment=self.policy.augment,
            compile=self.policy.compile,
            memory_limit_bytes=self.policy.child_memory_bytes, parent_pid=os.getpid(),
            torch_threads=self.policy.torch_threads, nice=self.policy.nice,
            # each update draws its own shuffles and dropout; a retry of the same chunks the same
            seed=int(pending[0].id) if pending else 0,
            update_fn=self.policy.update_fn, evaluate_fn=self.policy.evaluate_fn)

    def _verdict(self, run: ChildRun, ids: tuple[str, ...]) -> _Attempt:
        result = run.result or {}
        outcome, reason = run.verdict(self.policy.timeout)
        return _Attempt(outcome, tuple(result.get("new_chunk_ids") or ids), reason,
                        result=result)

    def _accept(self, attempt: _Attempt, out: Path, pending: Sequence[Any],
                generation: int) -> _Attempt:
        """Verify the candidate, gate it, save it, publish it (unless pinned)."""
        import safetensors.torch

        result = attempt.result
        try:
            tensors = safetensors.torch.load_file(str(out / result["candidate"]))
            model = self.registry.build_for(tensors)
            model.load_state_dict(tensors, strict=True)
        except Exception as e:  # noqa: BLE001 - a candidate that does not load is not the data's fault
            return _Attempt("infra_error", attempt.chunk_ids,
                            f"candidate checkpoint does not load: {type(e).__name__}: {e}",
                            result=result)
        model.eval()
        reason = self._reject_reason(result, model)
        if reason:
            return _Attempt("failed", attempt.chunk_ids, reason, result=result)
        with self.control.lock:
            if self.control.generation != generation:
                return _Attempt("abandoned", attempt.chunk_ids, "the model was rolled back "
                                "while the update ran", result=result)
            try:
                version = self._save(model, result, pending, attempt.chunk_ids)
            except OSError as e:
                log.exception("could not save the new version")
                return _Attempt("infra_error", attempt.chunk_ids, f"checkpoint not saved: {e}",
                                result=result)
            published = self.control.advance(model, version)
        self.prune()
        return _Attempt("success", attempt.chunk_ids, version=version, result=result,
                        published=published)

    def _floor(self, result: dict[str, Any]) -> float:
        refs = [float(a) for a in dict(result.get("reference_accuracies") or {}).values()]
        floor = self.policy.min_accuracy
        if refs:
            floor = max(floor, max(refs) - self.policy.max_accuracy_drop)
        return floor

    def _reject_reason(self, result: dict[str, Any], model: nn.Module) -> str:
        acc = float(result.get("val_accuracy", math.nan))
        if not math.isfinite(acc):
            return f"non-finite validation accuracy {acc}"
        bad = _non_finite(model)
        if bad is not None:
            return f"non-finite values in {bad}"
        floor = self._floor(result)
        if acc < floor:
            return f"validation accuracy {acc:.4f} below the floor {floor:.4f}"
        return ""

    def _save(self, model: nn.Module, result: dict[str, Any], pending: Sequence[Any],
              ids: tuple[str, ...]) -> ModelVersion:
        parent = self.control.head
        seen = tuple(parent.seen_chunk_ids if parent else ()) + ids
        by_id = {str(c.id): c for c in pending}
        cost, params = dict(result["cost"]), dict(result["params"])
        meta = ModelVersion(
            version=0, parent=parent.version if parent else None, created=time.time(),
            model_name=self.registry.model_name, input_shape=self.registry.input_shape,
            num_classes=self.registry.num_classes, chunk_ids=ids, seen_chunk_ids=seen,
            offsets={i: _offsets(by_id[i].offsets) for i in ids if i in by_id},
            val_accuracy=float(result["val_accuracy"]), active_params=int(params["active"]),
            dense_params=int(params["dense"]), store_id=getattr(self.store, "store_id", ""),
            cost=UpdateCost(int(cost["sample_passes"]), float(cost["epochs"]),
                            float(cost["wall_seconds"]), str(cost["device"])))
        return self.registry.save(model, meta)

    def prune(self) -> None:
        """Keep the newest ``keep_versions`` checkpoints, and the served, head, pinned ones."""
        try:
            with self.control.lock:  # a pin between reading the protected set and deleting
                self.registry.prune(self.policy.keep_versions, self.control.protected())
        except OSError as e:  # never fail an update for a cleanup
            log.warning("could not delete old versions: %s", e)

    def _conclude(self, attempt: _Attempt, duration: float) -> UpdateResult:
        m, ids, result = self.metrics, attempt.chunk_ids, attempt.result
        corrupt = self.ledger.mark_corrupt(dict(result.get("corrupt") or {}))
        if corrupt:
            log.error("chunk(s) %s are corrupt (%s) and left out from now on; the other "
                      "chunks are not blamed", list(corrupt), self.ledger.path)
        samples = {k: int(v) for k, v in dict(result.get("samples") or {}).items()}
        resident = {k: bool(v) for k, v in dict(result.get("resident") or {}).items()}
        quarantined: tuple[str, ...] = ()
        version, outcome = attempt.version, attempt.outcome
        if outcome == "no_data":
            log.warning("update skipped: %s", attempt.reason)
            return UpdateResult(outcome, ids, duration, None, attempt.reason, (), corrupt, samples,
                                resident)
        m.updates.labels(outcome=outcome).inc()
        m.update_duration.observe(duration)
        if outcome == "success":
            assert version is not None
            self._succeeded(version, attempt.published, duration)
        elif outcome == "failed":
            quarantined = self.ledger.record_failure(ids)
            if quarantined:
                log.error("quarantined chunk(s) %s after %d failed updates; they are left "
                          "out (recorded in %s)", list(quarantined), self.policy.max_attempts,
                          self.ledger.path)
            log.warning("update failed after %.1fs (%s); serving stays on version %s",
                        duration, attempt.reason,
                        getattr(self.served.version, "version", None))
        elif outcome == "infra_error":
            log.error("update hit an infrastructure error after %.1fs (%s); no chunk is "
                      "blamed, they are retried with the next update", duration,
                      attempt.reason)
        else:
            log.info("update abandoned after %.1fs: %s", duration, attempt.reason)
        return UpdateResult(outcome, ids, duration, version, attempt.reason, quarantined,
                            corrupt, samples, resident)


    def _succeeded(self, version: ModelVersion, published: bool, duration: float) -> None:
        m = self.metrics
        self.ledger.record_success(version.chunk_ids)
        if published:
            m.model_swaps.inc()
            m.model_last_swap.set(version.created)
        m.update_epochs.set(version.cost.epochs)
        m.update_sample_passes.inc(version.cost.sample_passes)
        m.update_last_success.set(time.time())
        log.info("update succeeded in %.1fs: version %d, val accuracy %.4f, %d/%d params%s",
                 duration, version.version, version.val_accuracy, version.active_params,
                 version.dense_params, "" if published else " (saved; a pinned version is served)")


def _offsets(offsets: Any) -> dict[str, tuple[int, int]]:
    """A chunk's offsets as {partition: (first, last)}."""
    return {str(p): (int(r[0]), int(r[1])) for p, r in dict(offsets or {}).items()}
