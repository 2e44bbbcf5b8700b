"""Model checkpoints on disk and the model being served.

A version is two files in the registry folder: ``v000007.safetensors`` (the model's
state dict: weights and masks, plus string metadata in the safetensors header) and
``v000007.json`` (a :class:`ModelVersion`, including the SHA-256 of the weights file).
Both are written to a temp file, fsynced and renamed, the JSON last: a version exists
only once both are complete. Loading builds a fresh model and loads the tensors
strictly; nothing is ever unpickled. Every version records the id of the store whose
chunks it learnt (``store_id``). Temp files left by a crash or a failed save are
removed (:meth:`ModelRegistry.clean`, and by ``save`` itself when it fails), and
:meth:`ModelRegistry.prune` keeps the newest N versions plus any it is told to protect.

:class:`ServedModel` holds the published ``(model, version)`` pair as one immutable
object that is replaced by a single reference assignment, so a request reads the pair
once and is answered wholly by one model, even while a swap happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import nn

from daemon.manifest import TMP_SUFFIX, write_atomic

__all__ = [
    "CheckpointError",
    "ModelRegistry",
    "ModelVersion",
    "NoModelError",
    "Prediction",
    "ServedModel",
    "UpdateCost",
]

log = logging.getLogger(__name__)

FORMAT = "gnpd-checkpoint/1"
_TMP = TMP_SUFFIX
_NAME = re.compile(r"^v(\d{6,})\.(json|safetensors)$")

Builder = Callable[[str, tuple[int, ...], int], nn.Module]


class CheckpointError(Exception):
    """A checkpoint that is incomplete, corrupt or does not fit the configured model."""


class NoModelError(RuntimeError):
    """Raised by :meth:`ServedModel.predict` before any model has been published."""


@dataclass(frozen=True)
class UpdateCost:
    """Training cost of the update that produced a version (see gnp.Cost)."""

    sample_passes: int = 0
    epochs: float = 0.0
    wall_seconds: float = 0.0
    device: str = "cpu"


@dataclass(frozen=True)
class ModelVersion:
    """Metadata of one checkpoint: lineage, the data it saw, its quality and cost.

    ``chunk_ids`` are the chunks this update learnt as new data; ``seen_chunk_ids`` is
    the lineage: every chunk this model or one of its ancestors learnt as new data.
    ``offsets`` maps each new chunk id to ``{partition: [first, last]}`` offsets.
    """

    version: int
    parent: int | None
    created: float
    model_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    chunk_ids: tuple[str, ...] = ()
    seen_chunk_ids: tuple[str, ...] = ()
    offsets: Mapping[str, Mapping[str, tuple[int, int]]] = field(default_factory=dict)
    val_accuracy: float = 0.0
    active_params: int = 0
    dense_params: int = 0
    cost: UpdateCost = UpdateCost()
    weights_sha256: str = ""
    store_id: str = ""
    restored_from: int | None = None  # a rollback: a copy of this version's weights

    @property
    def compression(self) -> float:
        """Dense parameters per active parameter (1.0 = dense)."""
        return self.dense_params / self.active_params if self.active_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["chunk_ids"] = list(self.chunk_ids)
        d["seen_chunk_ids"] = list(self.seen_chunk_ids)
        d["offsets"] = {c: {p: list(r) for p, r in parts.items()}
                        for c, parts in self.offsets.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelVersion:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError if malformed."""
        offsets = {str(c): {str(p): (int(r[0]), int(r[1])) for p, r in parts.items()}
                   for c, parts in dict(d.get("offsets", {})).items()}
        parent = d["parent"]
        return cls(
            version=int(d["version"]),
            parent=None if parent is None else int(parent),
            created=float(d["created"]),
            model_name=str(d["model_name"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            chunk_ids=tuple(str(c) for c in d.get("chunk_ids", ())),
            seen_chunk_ids=tuple(str(c) for c in d.get("seen_chunk_ids", ())),
            offsets=offsets,
            val_accuracy=float(d.get("val_accuracy", 0.0)),
            active_params=int(d.get("active_params", 0)),
            dense_params=int(d.get("dense_params", 0)),
            cost=UpdateCost(**dict(d.get("cost", {}))),
            weights_sha256=str(d.get("weights_sha256", "")),
            store_id=str(d.get("store_id") or ""),
            restored_from=None if d.get("restored_from") is None else int(d["restored_from"]),
        )


def _default_builder(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    import gnp  # imported lazily: serving and unit tests can run without training code

    return gnp.build_model(name, input_shape=input_shape, num_classes=num_classes)


class ModelRegistry:
    """Versioned checkpoints of one model architecture in one folder.

    Args:
        path: the folder (created if missing).
        model_name, input_shape, num_classes: the architecture every version must have.
        builder: builds a fresh model to load into; defaults to ``gnp.build_model``.
    """

    def __init__(self, path: str | os.PathLike[str], model_name: str,
                 input_shape: Sequence[int], num_classes: int,
                 builder: Builder | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self._build = builder or _default_builder
        self._lock = threading.Lock()
        self._meta_cache: dict[int, ModelVersion] = {}  # metadata files never change once written

    def build(self) -> nn.Module:
        """A fresh, untrained model of the registry's architecture."""
        return self._build(self.model_name, self.input_shape, self.num_classes)

    def build_for(self, tensors: dict[str, Any]) -> nn.Module:
        """A fresh model that a checkpoint's tensors load into: with unit masks
        (gnp.units) when the checkpoint has them (a cgap model), else as ``build()``.
        A cgap checkpoint saved before a unit group existed (ResNet-18's residual
        stream) gets that group's mask added to ``tensors``, all ones: those units whole."""
        model = self.build()
        if any(k.endswith(".unit_mask") for k in tensors):
            from gnp.units import UnitMasks  # lazily, as the default builder

            UnitMasks.attach(model).complete_unit_masks(tensors)
        return model

    def save(self, model: nn.Module, meta: ModelVersion) -> ModelVersion:
        """Write ``model`` as a new version; returns ``meta`` with version, sha and created set.

        The version number is one above every number already on disk (complete or not),
        so a corrupt file is never overwritten; ``meta.parent`` is kept as given.
        """
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        with self._lock:
            number = self._next_number()
            header = {"format": FORMAT, "version": str(number), "model_name": self.model_name,
                      "input_shape": json.dumps(list(self.input_shape)),
                      "num_classes": str(self.num_classes), "store_id": meta.store_id}
            blob = safetensors.torch.save(tensors, metadata=header)
            version = dataclasses.replace(
                meta, version=number, created=meta.created or time.time(),
                model_name=self.model_name, input_shape=self.input_shape,
                num_classes=self.num_classes, weights_sha256=hashlib.sha256(blob).hexdigest())
            try:
                # weights first, durable, then the metadata that makes the version exist
                write_atomic(self._file(number, "safetensors"), lambda f: f.write(blob))
                text = json.dumps(version.to_dict(), indent=2, sort_keys=True) + "\n"
                write_atomic(self._file(number, "json"), lambda f: f.write(text.encode()))
            except BaseException:  # e.g. ENOSPC: leave no half version behind
                self._file(number, "safetensors").unlink(missing_ok=True)
                raise
        log.info("saved model version %d (parent %s, val accuracy %.4f)",
                 number, version.parent, version.val_accuracy)
        return version

    def history(self) -> list[ModelVersion]:
        """Every version whose metadata is readable, oldest first (weights not verified)."""
        out = []
        for number in self._numbers("json"):
            try:
                out.append(self.meta(number))
            except CheckpointError as e:
                log.debug("skipping version %d in history: %s", number, e)
        return out

    def load(self, number: int) -> tuple[nn.Module, ModelVersion]:
        """Load one version strictly into a fresh model (eval mode); raises CheckpointError."""
        meta = self._read_meta(number)
        try:
            blob = self._file(number, "safetensors").read_bytes()
        except OSError as e:
            raise CheckpointError(f"version {number}: cannot read weights: {e}") from e
        if hashlib.sha256(blob).hexdigest() != meta.weights_sha256:
            raise CheckpointError(f"version {number}: weights file does not match its SHA-256")
        try:
            tensors = safetensors.torch.load(blob)
            model = self.build_for(tensors)
            model.load_state_dict(tensors, strict=True)
        except Exception as e:  # safetensors and torch raise several types
            raise CheckpointError(f"version {number}: cannot load weights: {e}") from e
        model.eval()
        return model, meta

    def latest(self, accept: Callable[[ModelVersion], bool] | None = None,
               ) -> tuple[nn.Module, ModelVersion] | None:
        """The newest version that loads (and that ``accept`` accepts); None if none.

        Incomplete or corrupt versions are skipped with a warning.
        """
        for number in reversed(self._numbers("json")):
            try:
                if accept is not None and not accept(self.meta(number)):
                    continue
                return self.load(number)
            except CheckpointError as e:
                log.warning("ignoring checkpoint: %s", e)
        return None

    def meta(self, number: int) -> ModelVersion:
        """The metadata of one version (cached); raises CheckpointError."""
        meta = self._meta_cache.get(number)
        if meta is None:
            meta = self._meta_cache[number] = self._read_meta(number)
        return meta

    def file(self, number: int) -> Path:
        """The metadata file of a version (for messages)."""
        return self._file(number, "json")

    def clean(self) -> list[Path]:
        """Remove temp files left by a crash or a failed save; returns what was removed."""
        removed = []
        for p in self.path.iterdir():
            if p.is_file() and p.name.endswith(_TMP):
                p.unlink(missing_ok=True)
                removed.append(p)
        if removed:
            log.info("removed %d temp file(s) from %s", len(removed), self.path)
        return removed

    def prune(self, keep: int, protect: Collection[int] = ()) -> list[int]:
        """Delete all but the newest ``keep`` versions, never one in ``protect``.

        The metadata file goes first, so a version interrupted half way is incomplete
        (and skipped), never a metadata file without weights. Returns the numbers deleted.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        numbers = self._numbers()
        doomed = [n for n in numbers[:-keep] if n not in set(protect)]
        for number in doomed:
            with self._lock:
                self._file(number, "json").unlink(missing_ok=True)
                self._file(number, "safetensors").unlink(missing_ok=True)
                self._meta_cache.pop(number, None)
        if doomed:
            log.info("deleted %d old version(s) %s (keeping the newest %d)",
                     len(doomed), doomed, keep)
        return doomed

    # -- helpers --------------------------------------------------------------

    def _file(self, number: int, ext: str) -> Path:
        return self.path / f"v{number:06d}.{ext}"

    def _numbers(self, ext: str | None = None) -> list[int]:
        found = set()
        for p in self.path.iterdir():
            m = _NAME.match(p.name.removesuffix(_TMP))
            if m and (ext is None or (m.group(2) == ext and not p.name.endswith(_TMP))):
                found.add(int(m.group(1)))
        return sorted(found)

    def _next_number(self) -> int:
        numbers = self._numbers()
        return numbers[-1] + 1 if numbers else 1

    def _read_meta(self, number: int) -> ModelVersion:
        try:
            meta = ModelVersion.from_dict(json.loads(self._file(number, "json").read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"version {number}: unreadable metadata: {e}") from e
        if meta.version != number:
            raise CheckpointError(f"version {number}: metadata says version {meta.version}")
        arch = (meta.model_name, meta.input_shape, meta.num_classes)
        if arch != (self.model_name, self.input_shape, self.num_classes):
            raise CheckpointError(
                f"version {number}: architecture {arch} differs from the configured "
                f"{(self.model_name, self.input_shape, self.num_classes)}")
        return meta


class Prediction(NamedTuple):
    """Answer of one predict call, all from the same model."""

    labels: np.ndarray         # (N,) int64
    probabilities: np.ndarray  # (N, num_classes) float32
    version: int


class Transcription(NamedTuple):
    """Answer of one transcribe call, all from the same model."""

    transcripts: list[str]
    confidence: list[float]
    version: int


@dataclass(frozen=True)
class _Published:
    model: nn.Module
    version: ModelVersion
    info: dict[str, Any] = field(default_factory=dict)  # what ServedModel.info() reports


def _probe(input_shape: tuple[int, ...], speech: bool) -> tuple[torch.Tensor, ...]:
    """One batch-1 input: zeros of the input shape; for a speech model, 1 s of MFCC
    frames (100 at a 10 ms hop) and its length."""
    if speech:
        return torch.zeros(1, 100, *input_shape), torch.tensor([100])
    return (torch.zeros(1, *input_shape),)


def _latency_seconds(model: nn.Module, inputs: tuple[torch.Tensor, ...], calls: int = 5,
                     budget: float = 0.05, wait: float = 2.0) -> float | None:
    """Median wall time of a batch-1 forward pass over ``inputs`` after 2 warm-up calls (at
    most `calls`, stopping after `budget` seconds: a swap waits for it, so it stays short),
    measured in a thread; None if it takes over `wait` seconds (a model that blocks never
    holds up a swap)."""
    times: list[float] = []

    def measure() -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(calls + 2):
                t0 = time.perf_counter()
                model(*inputs)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                if time.perf_counter() - start > budget and times:
                    break

    worker = threading.Thread(target=measure, name="gnpd-latency", daemon=True)
    worker.start()
    worker.join(wait)
    if worker.is_alive() or not times:
        return None
    return sorted(times)[len(times) // 2]


class ServedModel:
    """The model currently answering requests, replaced atomically by :meth:`publish`.

    Published models are put in eval mode and must never be mutated afterwards (the
    updater trains a deep copy). Concurrent :meth:`predict` calls are safe.
    """

    def __init__(self, input_shape: Sequence[int], variant: str = "recoverable",
                 model_name: str | None = None) -> None:
        if variant not in ("recoverable", "compact"):
            raise ValueError(f"variant must be 'recoverable' or 'compact', got {variant!r}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.variant = variant
        self.model_name = model_name  # the configured model: what requests expect before a publish
        self._current: _Published | None = None

    def publish(self, model: nn.Module, version: ModelVersion) -> None:
        """Serve ``model`` from now on; requests already running finish on the old one.

        With the "compact" variant the served module is ``gnp.compact.compact_model(model)``:
        a plain dense model with the inactive units sliced away (same outputs); the
        recoverable model stays in the registry and keeps learning. Either way the batch-1
        latency of the served module is measured here, before the swap.
        """
        model.eval()
        if self.variant == "compact":
            from gnp.compact import compact_model  # lazily: serving may run without gnp

            model = compact_model(model)
        from gnp.models import SPEECH_MODELS

        probe = _probe(self.input_shape, version.model_name in SPEECH_MODELS)
        info = {"variant": self.variant,
                "parameters": sum(p.numel() for p in model.parameters()),
                "latency_seconds_batch1": _latency_seconds(model, probe)}
        self._current = _Published(model, version, info)  # one reference assignment: atomic

    def info(self) -> dict[str, Any]:
        """The served module's variant, parameter count (as held: a compact model's is its
        physical size) and measured batch-1 latency; {} before the first publish."""
        cur = self._current
        return {} if cur is None else dict(cur.info)

    def current(self) -> tuple[nn.Module, ModelVersion] | None:
        """The published (model, version) pair, read once; None before the first publish."""
        cur = self._current
        return None if cur is None else (cur.model, cur.version)

    @property
    def version(self) -> ModelVersion | None:
        cur = self._current
        return None if cur is None else cur.version

    @property
    def speech(self) -> bool:
        """True when the served model (before the first one, the configured model)
        transcribes audio (a speech model) instead of classifying fixed-size inputs."""
        from gnp.models import SPEECH_MODELS
        cur = self._current  # before the first publish: the configured model's kind
        return (cur.version.model_name if cur is not None else self.model_name) in SPEECH_MODELS

    def transcribe(self, audios: Sequence[np.ndarray], sample_rate: int) -> Transcription:
        """Greedy transcripts (+ confidence 0..1) of mono float audios, from one version.

        Raises:
            NoModelError: nothing published yet.
            ValueError: a sample rate other than the model's, or empty/non-finite audio.
        """
        from gnp.transcribe import transcribe
        cur = self._current  # read once: the whole answer comes from this pair
        if cur is None:
            raise NoModelError("no model is served yet")
        out = transcribe(cur.model, [torch.as_tensor(a, dtype=torch.float32) for a in audios],
                         sample_rate)
        return Transcription([t.text for t in out], [t.confidence for t in out],
                             cur.version.version)

    def predict(self, x: np.ndarray | torch.Tensor) -> Prediction:
        """Class labels and probabilities for ``x`` of shape (N, *input_shape) or (N, D).

        Raises:
            NoModelError: nothing published yet.
            ValueError: ``x`` does not hold N instances of the input shape.
        """
        cur = self._current  # read once: the whole answer comes from this pair
        if cur is None:
            raise NoModelError("no model is served yet")
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.ndim < 1 or math.prod(t.shape[1:]) != math.prod(self.input_shape):
            raise ValueError(f"expected instances of shape {list(self.input_shape)}, "
                             f"got array of shape {list(t.shape)}")
        t = t.reshape(t.shape[0], *self.input_shape)
        with torch.inference_mode():
            probs = torch.softmax(cur.model(t).float(), dim=1)
        labels = probs.argmax(dim=1)
        return Prediction(labels.numpy(), probs.numpy(), cur.version.version)
