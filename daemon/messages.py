"""Wire format of a sample message and its validation.

A message is a UTF-8 JSON object (see ``schemas/sample.schema.json``)::

    {"id": "fashion-mnist/train/7", "features": [0.0, 0.5, ...], "label": 3,
     "timestamp": 1718000000.5}

:func:`parse_message` turns the raw bytes of one Kafka record into a
:class:`Sample`, or a :class:`Rejection` carrying one of
:data:`daemon.metrics.REJECT_REASONS`; it never raises on bad input, so one
poison message cannot stop the ingest loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # optional: about 2x faster than json on 784-feature messages
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = ["JSON_DECODER", "Rejection", "Sample", "load_json", "matches_input_shape",
           "numeric_array", "parse_message", "shape_rule"]

JSON_DECODER = "orjson" if _orjson is not None else "json"

_DETAIL_MAX = 200  # characters of detail kept in a rejection (it travels as a header)


@dataclass(frozen=True, eq=False)
class Sample:
    """One valid labelled sample, with where it came from in Kafka.

    ``features`` is flat float32 of length prod(input_shape), all finite.
    """

    features: np.ndarray
    label: int
    partition: int
    offset: int
    id: str | None = None
    timestamp: int | float | None = None


@dataclass(frozen=True)
class Rejection:
    """A message (or one row of a batch message) that cannot be a sample.

    ``reason`` is one of REJECT_REASONS; ``row`` is the row's index in an Arrow batch
    message (None for a whole message).
    """

    reason: str
    detail: str
    partition: int
    offset: int
    raw: bytes
    row: int | None = None


class _Reject(ValueError):
    """Internal: carries a (reason, detail) out of the validation steps."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail[:_DETAIL_MAX]

    def __str__(self) -> str:
        return self.detail


def parse_message(
    raw: bytes | None,
    partition: int,
    offset: int,
    input_shape: Sequence[int],
    num_classes: int,
    max_bytes: int = 1_000_000,
) -> Sample | Rejection:
    """Validate one message; return a :class:`Sample` or a :class:`Rejection`.

    Args:
        raw: the record value (``None`` for a tombstone, rejected as invalid_json).
        partition, offset: where the record was read; copied into the result.
        input_shape: the model's input shape; ``features`` must match it as
            :func:`matches_input_shape` says (flat, or nested as the shape with any
            size-1 dimensions added or left out).
        num_classes: labels must be integers in ``0 .. num_classes - 1``.
        max_bytes: larger messages are rejected as too_large before parsing.
    """
    data = b"" if raw is None else bytes(raw)
    try:
        return _parse(data, partition, offset, tuple(input_shape), num_classes, max_bytes)
    except _Reject as rej:
        return Rejection(rej.reason, rej.detail, partition, offset, data)
    except Exception as exc:  # noqa: BLE001 - a poison message must never escape as an exception
        return Rejection("bad_type", f"unexpected {type(exc).__name__}: {exc}"[:_DETAIL_MAX],
                         partition, offset, data)


def _load_object(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """A message's top-level JSON object, or a rejection (too large, not JSON, not an object)."""
    if len(raw) > max_bytes:
        raise _Reject("too_large", f"{len(raw)} bytes > max_message_bytes {max_bytes}")
    obj = load_json(raw)
    if not isinstance(obj, dict):
        raise _Reject("not_object", f"top-level JSON value is a {_json_type(obj)}, not an object")
    return obj


def _parse(raw: bytes, partition: int, offset: int, shape: tuple[int, ...],
           num_classes: int, max_bytes: int) -> Sample:
    obj = _load_object(raw, max_bytes)
    missing = [k for k in ("features", "label") if k not in obj]
    if missing:
        raise _Reject("missing_field", f"missing required field(s): {', '.join(missing)}")
    label = _check_label(obj["label"], num_classes)
    sample_id = _check_id(obj.get("id"))
    timestamp = _check_timestamp(obj.get("timestamp"))
    features = _check_features(obj["features"], shape, maybe_bools=may_hold_bools(raw))
    return Sample(features, label, partition, offset, sample_id, timestamp)


def load_json(raw: bytes | bytearray) -> Any:
    """Parse JSON text without ever recursing past a fixed depth.

    orjson stops at 1024 nested levels, json at the interpreter's recursion limit
    (about 1000): either way deep nesting (``[[[[...``) is an error, never a crash.

    Raises:
        ValueError: ``.reason`` is invalid_json; the message says what is wrong.
    """
    if not raw:
        raise _Reject("invalid_json", "empty message")
    if _orjson is not None:
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass  # NaN, UTF-16, huge ints...: let json decide, so results never differ
    try:
        return json.loads(raw)
    except RecursionError:
        raise _Reject("invalid_json", "nested too deeply (over 1000 levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _Reject("invalid_json", f"{type(exc).__name__}: {exc}") from None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean",
             int: "integer", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_label(label: Any, num_classes: int) -> int:
    # bool is a subclass of int in Python, but `true` is not a class label.
    if type(label) is not int:
        raise _Reject("bad_type", f"label must be an integer, got {_json_type(label)} {label!r}")
    if not 0 <= label < num_classes:
        raise _Reject("bad_label", f"label {label} outside 0..{num_classes - 1}")
    return label


def _check_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Reject("bad_type", f"id must be a string, got {_json_type(value)}")
    try:  # JSON allows "\ud800" (a lone UTF-16 surrogate); UTF-8, hence Arrow, does not
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Reject("unstorable", f"id is not valid Unicode: lone surrogate "
                                    f"U+{ord(value[e.start]):04X} at index {e.start}") from None
    return value


def _check_timestamp(value: Any) -> int | float | None:
    if value is None:
        return None
    if type(value) not in (int, float):
        raise _Reject("bad_type", f"timestamp must be a number, got {_json_type(value)}")
    if not math.isfinite(value):
        raise _Reject("non_finite", f"timestamp is {value}")
    return value


def may_hold_bools(raw: bytes) -> bool:
    # json gives no hook for true/false; only when the text could contain one do we
    # pay for a per-element type scan of the features.
    return b"true" in raw or b"false" in raw


def numeric_array(value: Any, maybe_bools: bool = True) -> np.ndarray:
    """A JSON array of numbers as an ndarray, its dtype inferred and never coerced.

    Strings, null, objects and booleans are refused (np.asarray(..., dtype=float32)
    would turn "1.5" into 1.5 and true into 1.0). `maybe_bools=False` skips the scan
    for booleans mixed with numbers, for callers that know the text holds none.

    Raises:
        ValueError: not a regular array of numbers; `.reason` is bad_type or bad_shape.
    """
    if not isinstance(value, list):
        raise _Reject("bad_type", f"must be an array, got {_json_type(value)}")
    try:
        arr = np.asarray(value)  # infer the dtype: strings/null/objects must not coerce
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise _Reject("bad_shape", f"not a regular array: {exc}") from None
    if arr.dtype.kind not in "iuf" or (maybe_bools and _holds_bool(value)):
        kind = "booleans" if arr.dtype.kind == "b" else f"{arr.dtype} values"
        raise _Reject("bad_type", f"must be numbers, got {kind}")
    return arr


def matches_input_shape(shape: Sequence[int], input_shape: Sequence[int]) -> bool:
    """True if an array of ``shape`` holds exactly one sample of ``input_shape``.

    Size-1 dimensions do not count, on either side: for input shape [1, 28, 28] a
    flat list of 784 numbers, a 28x28 nested list, [1, 28, 28] and [28, 1, 28] all
    match; [784, 1] and [[784 numbers]] too (flat once size-1 dimensions are dropped).
    Ingestion and ``/v1/predict`` share this rule.
    """
    if math.prod(shape) != math.prod(input_shape):
        return False
    squeezed = tuple(d for d in shape if d != 1)
    return squeezed == tuple(d for d in input_shape if d != 1) or len(squeezed) <= 1


def shape_rule(input_shape: Sequence[int]) -> str:
    """The rule of :func:`matches_input_shape` in words, for error messages."""
    core = [d for d in input_shape if d != 1]
    return (f"{list(input_shape)} (size-1 dimensions optional, e.g. {core or [1]}) or flat "
            f"with {math.prod(input_shape)} values")


def _check_features(value: Any, shape: tuple[int, ...], maybe_bools: bool) -> np.ndarray:
    try:
        arr = numeric_array(value, maybe_bools)
    except _Reject as e:
        raise _Reject(e.reason, f"features {e.detail}") from None
    if not matches_input_shape(arr.shape, shape):
        raise _Reject("bad_shape", f"features have shape {list(arr.shape)}, expected "
                                   f"{shape_rule(shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        flat = arr.reshape(-1).astype(np.float32)
    finite = np.isfinite(flat)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise _Reject("non_finite", f"feature {bad} is {arr.reshape(-1)[bad]} "
                                    f"(non-finite or beyond float32 range)")
    return flat


def _holds_bool(value: list) -> bool:
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            return True
    return False
