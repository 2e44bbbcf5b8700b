"""The Arrow batch sample format: one Kafka message carries many samples.

A message whose ``content-type`` header is :data:`ARROW_CONTENT_TYPE` holds an Arrow
IPC *stream* (schema + one or more record batches; see ``schemas/arrow-batch.md``):

=============  =====================================  =====  ==========================
column         Arrow type                             null   meaning
=============  =====================================  =====  ==========================
``features``   ``fixed_size_list<float32>[F]``        no     the input, flat row-major
``label``      any integer type                       no     ``0 <= label < classes``
``id``         ``string`` (optional column)           yes    the sample's id
``timestamp``  ``float64`` or integer (optional)      yes    Unix seconds
=============  =====================================  =====  ==========================

:func:`parse_arrow_batch` validates the whole batch with vectorised checks (shape,
finite values, label range, ids) and returns the good rows as one :class:`RowBatch`
(columns, never one Python object per row) plus one :class:`~daemon.messages.Rejection`
per bad row, whose ``row`` names the row and whose ``raw`` is that row alone as a
one-row Arrow IPC stream. A message that cannot be read as such a stream at all (not
Arrow, a missing column, a wrong column type) is rejected whole (``row`` None).

A row's identity is (partition, offset, row index): a message is appended to the store
whole, so exactly-once per message is exactly-once per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from daemon.messages import Rejection

__all__ = ["ARROW_CONTENT_TYPE", "CONTENT_TYPE_HEADER", "RowBatch", "arrow_batch_schema",
           "encode_arrow_batch", "is_arrow", "parse_arrow_batch"]

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
CONTENT_TYPE_HEADER = "content-type"
_DETAIL_MAX = 200


@dataclass(frozen=True, eq=False)
class RowBatch:
    """The valid rows of one Arrow batch message, as columns.

    ``features`` is (n, F) float32, all finite; ``rows`` the index of each row in the
    message (bad rows left out); ``ids``/``timestamps`` Arrow arrays or None.
    """

    features: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    partition: int
    offset: int
    ids: pa.Array | None = None
    timestamps: pa.Array | None = None
    id: None = field(default=None, init=False)  # a message has no single id (see UnstorableError)

    def __len__(self) -> int:
        return len(self.labels)


def arrow_batch_schema(input_size: int, with_id: bool = True,
                       with_timestamp: bool = True) -> pa.Schema:
    """The schema a producer should write for samples of ``input_size`` features."""
    fields = [pa.field("features", pa.list_(pa.float32(), input_size), nullable=False),
              pa.field("label", pa.int64(), nullable=False)]
    if with_id:
        fields.append(pa.field("id", pa.string()))
    if with_timestamp:
        fields.append(pa.field("timestamp", pa.float64()))
    return pa.schema(fields)


def encode_arrow_batch(features: np.ndarray, labels: np.ndarray, ids: list[str] | None = None,
                       timestamps: np.ndarray | None = None) -> bytes:
    """One message value: ``features`` (n, F) and ``labels`` (n,) as an Arrow IPC stream."""
    x = np.ascontiguousarray(features, dtype=np.float32).reshape(len(labels), -1)
    arrays = [pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
              pa.array(np.asarray(labels, dtype=np.int64))]
    schema = arrow_batch_schema(x.shape[1], ids is not None, timestamps is not None)
    if ids is not None:
        arrays.append(pa.array(ids, pa.string()))
    if timestamps is not None:
        arrays.append(pa.array(np.asarray(timestamps, dtype=np.float64)))
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def is_arrow(headers: list[tuple[str, bytes]] | None) -> bool:
    """True if a record's headers announce the Arrow batch format."""
    for key, value in headers or ():
        if key.lower() == CONTENT_TYPE_HEADER and value is not None:
            return bytes(value).split(b";")[0].strip().lower() == ARROW_CONTENT_TYPE.encode()
    return False


class _Whole(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail[:_DETAIL_MAX]


def parse_arrow_batch(raw: bytes | None, partition: int, offset: int, input_size: int,
                      num_classes: int, max_bytes: int = 1_000_000,
                      ) -> tuple[RowBatch | None, list[Rejection]]:
    """Validate one Arrow batch message: its good rows and a rejection per bad row.

    Returns ``(None, [one whole-message rejection])`` when the message is not a usable
    stream, and ``(None, [])`` for a stream of zero rows. Never raises on bad input.
    """
    data = b"" if raw is None else raw
    try:
        if len(data) > max_bytes:
            raise _Whole("too_large", f"{len(data)} bytes > max_message_bytes {max_bytes}")
        table = _read(data)
        return _validate(table, partition, offset, input_size, num_classes)
    except _Whole as e:
        return None, [Rejection(e.reason, e.detail, partition, offset, bytes(data))]
    except Exception as exc:  # noqa: BLE001 - a poison message must never escape
        return None, [Rejection("bad_type", f"unexpected {type(exc).__name__}: {exc}"[:_DETAIL_MAX],
                                partition, offset, bytes(data))]


def _read(data: bytes) -> pa.Table:
    if not data:
        raise _Whole("invalid_arrow", "empty message")
    try:
        table = ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise _Whole("invalid_arrow", f"not an Arrow IPC stream: {e}") from None
    missing = [c for c in ("features", "label") if c not in table.column_names]
    if missing:
        raise _Whole("missing_field", f"missing required column(s): {', '.join(missing)}")
    return table.combine_chunks()


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)


def _validate(table: pa.Table, partition: int, offset: int, input_size: int,
              num_classes: int) -> tuple[RowBatch | None, list[Rejection]]:
    n = table.num_rows
    if n == 0:
        return None, []
    bad: dict[int, tuple[str, str]] = {}  # row -> (reason, detail); the first check wins

    def reject(mask: np.ndarray, reason: str, detail) -> None:
        for i in np.flatnonzero(mask).tolist():
            bad.setdefault(i, (reason, detail(i)))

    x = _features(_column(table, "features"), n, input_size, reject)
    labels = _labels(_column(table, "label"), num_classes, reject)
    ids = _ids(table, reject)
    timestamps = _timestamps(table, reject)
    rejections = [Rejection(reason, f"row {i}: {detail}"[:_DETAIL_MAX], partition, offset,
                            _one_row(table, i), row=i)
                  for i, (reason, detail) in sorted(bad.items())]
    if len(bad) == n:
        return None, rejections
    if not bad:
        keep = None
        rows = np.arange(n, dtype=np.int32)
    else:
        mask = np.ones(n, dtype=bool)
        mask[list(bad)] = False
        keep = pa.array(mask)
        rows = np.flatnonzero(mask).astype(np.int32)
        x, labels = x[mask], labels[mask]
        ids = None if ids is None else ids.filter(keep)
        timestamps = None if timestamps is None else timestamps.filter(keep)
    return RowBatch(x, labels, rows, partition, offset, ids, timestamps), rejections


def _features(col: pa.Array, n: int, size: int, reject) -> np.ndarray:
    t = col.type
    if not pa.types.is_fixed_size_list(t) or not (pa.types.is_floating(t.value_type)
                                                   or pa.types.is_integer(t.value_type)):
        raise _Whole("bad_type", f"features must be fixed_size_list<float32>[{size}], got {t}")
    if t.list_size != size:
        raise _Whole("bad_shape", f"features have {t.list_size} values per row, the model "
                                  f"expects {size}")
    # Every row's slots, null rows' included (flatten() drops a null row's slots, which
    # would shift every later row); the slice respects an offset into the values.
    values = col.values.slice(col.offset * size, n * size)
    if col.null_count:  # a null row has no features
        reject(col.is_null().to_numpy(zero_copy_only=False), "missing_field",
               lambda i: "features are null")
    if values.null_count:
        nulls = values.is_null().to_numpy(zero_copy_only=False).reshape(n, size).any(axis=1)
        reject(nulls, "bad_type", lambda i: "features hold a null value")
        values = values.fill_null(0)
    if values.type != pa.float32():
        values = values.cast(pa.float32(), safe=False)
    x = values.to_numpy(zero_copy_only=False).reshape(n, size)
    finite = np.isfinite(x)
    rows_ok = finite.all(axis=1)
    if not rows_ok.all():
        reject(~rows_ok, "non_finite",
               lambda i: f"feature {int(np.flatnonzero(~finite[i])[0])} is "
                         f"{x[i, np.flatnonzero(~finite[i])[0]]}")
    return x


def _labels(col: pa.Array, num_classes: int, reject) -> np.ndarray:
    if not pa.types.is_integer(col.type):
        raise _Whole("bad_type", f"label must be an integer column, got {col.type}")
    if col.null_count:
        reject(col.is_null().to_numpy(zero_copy_only=False), "missing_field",
               lambda i: "label is null")
        col = col.fill_null(0)
    y = col.to_numpy(zero_copy_only=False).astype(np.int64)
    out = (y < 0) | (y >= num_classes)
    if out.any():
        reject(out, "bad_label", lambda i: f"label {y[i]} outside 0..{num_classes - 1}")
    return y


def _ids(table: pa.Table, reject) -> pa.Array | None:
    if "id" not in table.column_names:
        return None
    col = _column(table, "id")
    if pa.types.is_large_string(col.type):
        col = col.cast(pa.string())
    if not pa.types.is_string(col.type):
        raise _Whole("bad_type", f"id must be a string column, got {col.type}")
    try:
        col.validate(full=True)  # UTF-8, offsets: the chunk file must hold valid strings
    except pa.ArrowInvalid:
        invalid = np.zeros(len(col), dtype=bool)
        for i in range(len(col)):
            try:
                col.slice(i, 1).validate(full=True)
            except pa.ArrowInvalid:
                invalid[i] = True
        reject(invalid, "unstorable", lambda i: "id is not valid UTF-8")  # filtered out
    return col


def _timestamps(table: pa.Table, reject) -> pa.Array | None:
    if "timestamp" not in table.column_names:
        return None
    col = _column(table, "timestamp")
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise _Whole("bad_type", f"timestamp must be a number column (Unix seconds), "
                                 f"got {col.type}")
    if col.type != pa.float64():
        col = col.cast(pa.float64(), safe=False)  # Unix seconds: beyond 2**53 rounding is moot
    values = (col.fill_null(0.0) if col.null_count else col).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values)
    if bad.any():
        reject(bad, "non_finite", lambda i: f"timestamp is {values[i]}")
    return col


def _one_row(table: pa.Table, i: int) -> bytes:
    """Row ``i`` alone as an Arrow IPC stream (the value of its dead letter)."""
    try:
        part = table.slice(i, 1)
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        return sink.getvalue().to_pybytes()
    except Exception:  # noqa: BLE001 - the headers still say which row of which offset
        return b""
