"""Durable Arrow chunk store: the daemon's record of every sample it has accepted.

Layout under ``path``::

    manifest.json            chunks + next Kafka offset per partition (atomic replace)
    chunks/chunk-000001.arrow
    chunks/chunk-000002.arrow ...

Samples are buffered in memory and *sealed* into an immutable Arrow IPC file
each time ``chunk_size`` of them have arrived. A chunk holds whole messages: the
rows of an Arrow batch message (:class:`~daemon.arrow_batch.RowBatch`) never straddle
two chunks, so a chunk may hold up to one batch less one row beyond ``chunk_size``,
and exactly-once per message is exactly-once per row (partition, offset, row). A seal writes the chunk to a temp
file, fsyncs it, renames it into place, then replaces the manifest the same way.
With ``write_behind`` > 0 a seal encodes the chunk on the calling thread and
hands the file and manifest writes to one background writer (at most
``write_behind`` chunks in flight, written in order), so the ingest thread keeps
consuming meanwhile; a chunk counts as sealed (:meth:`ChunkStore.chunks`,
:meth:`ChunkStore.next_offsets`) only once its file and the manifest listing it
are durable, and a failed write is raised on the ingest thread at its next call.
The manifest is the only source of truth: at start-up, temp files and a chunk file
it does not list that a crash between the rename and the manifest write explains
(numbered after the last listed chunk, every offset at or past ``next_offsets``) are
deleted, and ingestion resumes from the manifest's ``next_offsets`` -- the messages
of the lost chunk and of the open buffer are read again from Kafka. Any other
unlisted chunk file is moved to ``orphans/``, never deleted. A missing (while chunk
files exist) or unreadable manifest refuses to open with the way out
(``gnpd store rebuild-manifest``); see :mod:`daemon.manifest`. An open store holds
an exclusive lock on ``<path>/lock``: a second process gets :class:`StoreLockedError`.

Offsets: ``next_offsets[p]`` is one past the last message of partition ``p``
*consumed* before the seal, valid or rejected. The ingestor reports rejected
messages with :meth:`ChunkStore.skip` so they count too. The file format is
described in ``schemas/chunk.md``.

A store given a ``codec`` (a :class:`daemon.speech_store.SpeechChunkCodec`, for a speech
model) keeps that codec's samples and schema instead of fixed-size features, with the
same seal, manifest (its ``kind`` recorded), checksum, offset and split guarantees.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from daemon.manifest import (
    CHUNK_DIR as _CHUNK_DIR, CHUNK_SCHEMA_VERSION, TOPIC_META, ChunkInfo, Manifest, StoreError,
    StoreLock, StoreLockedError, new_store_id, read_manifest, sweep_strays, verify_chunk,
    write_atomic as _write_atomic, write_manifest,
)
from daemon.arrow_batch import RowBatch
from daemon.messages import Sample

__all__ = ["CHUNK_SCHEMA_VERSION", "ChunkInfo", "ChunkStore", "StoreError", "StoreLockedError",
           "UnstorableError", "chunk_schema", "val_mask"]

log = logging.getLogger(__name__)


class UnstorableError(ValueError):
    """A seal failed because some samples cannot be encoded into a chunk (not an I/O error).

    ``bad`` lists each such sample with the encoder's error, found by bisecting the chunk;
    it is empty when no single sample fails alone. Nothing became durable; the samples
    are back in the open buffer.
    """

    def __init__(self, bad: list[tuple[Sample, str]], cause: BaseException) -> None:
        where = ", ".join(f"partition {s.partition} offset {s.offset}" for s, _ in bad[:5])
        super().__init__(f"cannot encode a chunk ({type(cause).__name__}: {cause}); "
                         f"unstorable: {where or 'no single sample'}")
        self.bad = bad


def chunk_schema(input_size: int) -> pa.Schema:
    """The Arrow schema of a chunk file whose samples have ``input_size`` features."""
    return pa.schema([
        pa.field("features", pa.list_(pa.float32(), input_size), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("timestamp", pa.float64()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
    ], metadata={"gnpd.chunk_schema_version": str(CHUNK_SCHEMA_VERSION)})


def val_mask(partitions: np.ndarray, offsets: np.ndarray, val_fraction: float,
             rows: np.ndarray | None = None) -> np.ndarray:
    """Which samples of a chunk are validation: exactly round(f * n) of them.

    The samples with the smallest hash of (partition, offset[, row]) are chosen, so the
    choice is deterministic, independent of arrival order and -- as the offsets of
    a message never change -- the same when a chunk is rebuilt after a crash. Row 0 of
    a message (every JSON sample) hashes as before rows existed.
    """
    n = len(offsets)
    k = int(round(val_fraction * n))
    keys = (partitions.astype(np.uint64) << np.uint64(40)) ^ offsets.astype(np.uint64)
    hashes = _splitmix64(keys)
    if rows is not None and rows.any():
        r = rows.astype(np.uint64)
        hashes = np.where(r == 0, hashes, _splitmix64(hashes ^ r))
    order = np.argsort(hashes, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ChunkStore:
    """Buffers samples, seals them into Arrow chunks, serves them back as arrays.

    Thread-safety: one writer (the ingest thread) calls append/skip/flush/sync; any
    thread may call chunks(), dataset() and the offset getters.

    Args:
        write_behind: chunks whose file and manifest writes may still be in flight in
            a background thread while ingestion goes on (0: written by the sealing call).
        codec: encodes the buffered samples of another kind (speech) into a chunk table
            (``kind``, ``schema()``, ``check(item)``, ``encode(items, val_fraction)``);
            None: fixed-size feature chunks (:func:`chunk_schema`).

    Raises:
        StoreError: the manifest is missing (while chunk files exist) or unreadable, or
            holds another input shape or kind of chunks; the message names the path and
            the way out.
        StoreLockedError: another process uses the store. A second ChunkStore on the
            same path in this process shares the lock (:class:`~daemon.manifest.StoreLock`)
            and leaves stray files alone: they may be the first one's writes in flight.
    """

    def __init__(self, path: str | Path, chunk_size: int, input_shape: Sequence[int],
                 val_fraction: float = 0.1, write_behind: int = 0,
                 codec: Any | None = None) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        if not 0.0 <= val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
        if not input_shape or any(int(d) <= 0 for d in input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {list(input_shape)}")
        if write_behind < 0:
            raise ValueError(f"write_behind must be >= 0, got {write_behind}")
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_size = math.prod(self.input_shape)
        self.val_fraction = val_fraction
        self.codec = codec
        self.kind = "image" if codec is None else codec.kind
        self._schema = chunk_schema(self.input_size) if codec is None else codec.schema()
        self._lock = threading.Lock()
        self._chunks: list[ChunkInfo] = []
        self._next: dict[int, int] = {}
        self._topic_id: str | None = None
        self._store_id = ""
        self.write_behind = write_behind
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: deque[Future] = deque()  # background chunk writes, oldest first
        self._write_failed: BaseException | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file: StoreLock | None = StoreLock(self.path)
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self._last_id = self._chunks[-1].id if self._chunks else 0  # sealed or in flight
        self._reset_buffer()

    @property
    def store_id(self) -> str:
        """This store's identity (created with the store; recorded in every checkpoint)."""
        return self._store_id

    def close(self) -> None:
        """Finish the chunk writes in flight, release the lock (idempotent); the open
        buffer is not sealed."""
        self._settle()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self, chunk: ChunkInfo) -> str | None:
        """Why a sealed chunk's file cannot be used (see :func:`daemon.manifest.verify_chunk`)."""
        return verify_chunk(chunk, self.input_size if self.codec is None else None, self.kind)

    # ---- offsets ---------------------------------------------------------------

    def next_offsets(self) -> dict[int, int]:
        """Durable resume point: partition -> next offset to read after the last seal."""
        with self._lock:
            return dict(self._next)

    def positions(self) -> dict[int, int]:
        """In-session resume point: past the sealed chunks *and* the open buffer."""
        with self._lock:
            return dict(self._consumed)

    @property
    def buffered(self) -> int:
        """Samples (rows) in the open (not yet durable) buffer."""
        return self._buffered_rows

    # ---- writing ---------------------------------------------------------------

    def append(self, samples: Sequence[Sample | RowBatch]) -> list[ChunkInfo]:
        """Add samples (or batches of rows) in consumption order; seal a chunk each time
        chunk_size rows are reached (after the whole message that reaches it).

        Messages at an offset already consumed in this session (or already durable)
        are ignored, so a re-delivered message is never stored twice.

        Returns:
            The chunks sealed by this call (often none); with ``write_behind`` they may
            not be durable yet: :meth:`chunks` lists them once they are.

        Raises:
            OSError, StoreError: a background write of an earlier chunk failed (nothing
                of it is durable; :meth:`discard_buffer` rewinds to the last durable seal).
        """
        self.sync(block=False)
        sealed = []
        for item in samples:
            if self.codec is not None:
                self.codec.check(item)
            else:
                width = item.features.shape[-1] if isinstance(item, RowBatch) else item.features.size
                if width != self.input_size or item.features.ndim != (2 if isinstance(
                        item, RowBatch) else 1):
                    raise ValueError(f"sample at partition {item.partition} offset {item.offset} "
                                     f"has {width} features, the store expects "
                                     f"{self.input_size} (input_shape {list(self.input_shape)})")
            if not self._consume(item.partition, item.offset):
                continue
            self._buffer.append(item)
            self._buffered_rows += len(item) if isinstance(item, RowBatch) else 1
            if self._buffered_rows >= self.chunk_size:
                sealed.append(self._seal())
        return sealed

    def skip(self, partition: int, offset: int) -> bool:
        """Record a consumed message that is not stored (rejected to the dead-letter topic).

        Returns:
            False if the offset was already consumed (a re-delivery), else True.
        """
        return self._consume(partition, offset)

    def flush(self) -> ChunkInfo | None:
        """Seal the open buffer even if it is short of chunk_size; None if it is empty.

        The daemon does not call this (a partial buffer is simply re-read from
        Kafka after a restart); it is for tests and one-off imports.
        """
        info = self._seal() if self._buffer else None
        self.sync()
        return info

    def sync(self, block: bool = True) -> None:
        """Raise the error of a failed background chunk write; with ``block``, first wait
        until every chunk sealed so far is durable.
        """
        while self._inflight and (block or self._inflight[0].done()):
            self._inflight[0].result()  # raises the write's error; stays queued until a discard
            self._inflight.popleft()

    def discard_buffer(self) -> int:
        """Drop the open buffer and rewind to the durable offsets; returns samples dropped.

        Used by the ingestor to recover from an error: it then seeks Kafka back to
        :meth:`next_offsets` and reads the dropped messages again.
        """
        self._settle()
        dropped = len(self._buffer)
        self._reset_buffer()
        return dropped

    @property
    def topic_id(self) -> str | None:
        """Kafka id of the topic incarnation the offsets refer to (None if unknown)."""
        return self._topic_id

    def bind_topic(self, topic_id: str | None) -> bool:
        """Tie the offsets to a Kafka topic id; on a new id, start again from offset 0.

        A topic deleted and created again (or a fresh broker with memory storage)
        numbers its messages from 0 again, so the stored offsets would skip new
        messages. On a changed id all offsets are cleared and the open buffer is
        dropped (it may already hold messages of the new topic, which are then read
        again). The id and offsets are saved with the next seal.

        Returns:
            True if the positions were reset.
        """
        if topic_id is None or topic_id == self._topic_id:
            return False
        self.sync()  # the offsets of chunks in flight must be durable (or their error raised)
        reset = self._topic_id is not None
        self._topic_id = topic_id
        if reset:
            with self._lock:  # the old offsets mean nothing now, durable ones included
                self._buffer, self._consumed, self._next = [], {}, {}
                self._buffered_rows = 0
        return reset

    def rebase(self, partition: int, offset: int) -> None:
        """Move a partition's position to ``offset`` (past a retention gap, or back to where
        the broker truncated its log).

        Buffered samples stay. A position moved back below the durable offsets is saved at
        once: a restart before the next seal would otherwise resume from the old, higher
        offset and skip the broker's new records, and a truncation, unlike a retention
        gap, is not detected again after a restart. A position moved forward is saved with
        the next seal (a restart meets the same gap again).
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.sync()
        with self._lock:
            self._consumed[partition] = offset
            lowered = self._next.get(partition, 0) > offset
            if lowered:
                self._next[partition] = offset  # also after a discard_buffer()
                chunks, next_offsets = list(self._chunks), dict(self._next)
        if lowered:
            self._write_manifest(chunks, next_offsets)

    def _reset_buffer(self) -> None:
        with self._lock:
            self._buffer: list[Sample | RowBatch] = []
            self._buffered_rows = 0
            self._consumed: dict[int, int] = dict(self._next)

    def _consume(self, partition: int, offset: int) -> bool:
        if offset < self._consumed.get(partition, 0):
            return False
        self._consumed[partition] = offset + 1  # under the GIL a dict store is atomic
        return True

    def _seal(self) -> ChunkInfo:
        samples, self._buffer = self._buffer, []
        rows, self._buffered_rows = self._buffered_rows, 0
        chunk_id = self._last_id + 1
        final = self.path / _CHUNK_DIR / f"chunk-{chunk_id:06d}.arrow"
        try:
            while len(self._inflight) >= self.write_behind > 0:  # bounded: wait for room
                self._inflight[0].result()  # a failed write stays queued until a discard
                self._inflight.popleft()
            table = self._encode(samples)
            if self._topic_id:  # which incarnation its offsets count in (for a rebuild)
                table = table.replace_schema_metadata(
                    {**(table.schema.metadata or {}), TOPIC_META: self._topic_id.encode()})
            data = _ipc_bytes(table)
            info = ChunkInfo(chunk_id, final, table.num_rows, _offset_ranges(table), time.time(),
                             crc32c.crc32c(data))
            next_offsets = dict(self._consumed)
            if self.write_behind:
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="gnpd-chunk-writer")
                self._inflight.append(self._writer.submit(self._write_behind, info, data,
                                                          next_offsets))
            else:
                self._make_durable(info, data, next_offsets)
        except BaseException:
            self._buffer = samples + self._buffer  # nothing became durable: keep the samples
            self._buffered_rows += rows
            raise
        self._last_id = chunk_id
        return info

    def _make_durable(self, info: ChunkInfo, data: memoryview,
                      next_offsets: dict[int, int]) -> None:
        """Write the chunk file, then the manifest listing it; then it counts as sealed."""
        _write_atomic(info.path, lambda f: f.write(data))
        _drop_page_cache(info.path)
        self._write_manifest(self._chunks + [info], next_offsets)
        with self._lock:
            self._chunks.append(info)
            self._next = next_offsets

    def _write_behind(self, info: ChunkInfo, data: memoryview,
                      next_offsets: dict[int, int]) -> None:
        """:meth:`_make_durable` in the writer thread; after a failure, write nothing more
        (the manifest must list chunks without gaps) until :meth:`discard_buffer`."""
        if self._write_failed is not None:
            raise StoreError(f"chunk {info.id} not written: an earlier chunk write failed "
                             f"({self._write_failed!r})")
        try:
            self._make_durable(info, data, next_offsets)
        except BaseException as exc:
            self._write_failed = exc
            raise

    def _settle(self) -> None:
        """Wait for the writes in flight; a failed one is only logged (its rows are
        not durable, so they are read again from the durable offsets)."""
        while self._inflight:
            try:
                self._inflight.popleft().result()
            except Exception as exc:  # noqa: BLE001 - already raised to the caller or moot
                log.warning("a background chunk write failed: %r", exc)
        self._write_failed = None
        self._last_id = self._chunks[-1].id if self._chunks else 0

    def _encode(self, samples: list[Sample | RowBatch]) -> pa.Table:
        """:meth:`_to_table`, or UnstorableError naming the samples that cannot be encoded."""
        try:
            return self._to_table(samples)
        except Exception as exc:  # noqa: BLE001 - any encoder failure: find who caused it
            raise UnstorableError(self._unstorable(samples), exc) from exc

    def _unstorable(self, samples: list[Sample | RowBatch]
                    ) -> list[tuple[Sample | RowBatch, str]]:
        """The samples that fail to encode on their own, by bisection (k log n encodes)."""
        try:
            self._to_table(samples)
            return []
        except Exception as exc:  # noqa: BLE001
            if len(samples) == 1:
                return [(samples[0], f"{type(exc).__name__}: {exc}")]
        mid = len(samples) // 2
        return self._unstorable(samples[:mid]) + self._unstorable(samples[mid:])

    def _to_table(self, items: list[Sample | RowBatch]) -> pa.Table:
        """One table of the buffered items: runs of JSON samples and batches, in order."""
        if self.codec is not None:
            return self.codec.encode(items, self.val_fraction)
        parts, run = [], []
        for item in items:
            if isinstance(item, RowBatch):
                if run:
                    parts.append(_samples_columns(run))
                    run = []
                parts.append(_batch_columns(item))
            else:
                run.append(item)
        if run:
            parts.append(_samples_columns(run))
        cols = [np.concatenate([p[i] for p in parts]) if i < 5 else
                pa.concat_arrays([p[i] for p in parts]) for i in range(7)]
        features, labels, partitions, offsets, rows, ids, timestamps = cols
        mask = val_mask(partitions, offsets, self.val_fraction, rows)
        split = pa.DictionaryArray.from_arrays(pa.array(mask.astype(np.int8)),
                                               pa.array(["train", "val"])).cast(pa.string())
        return pa.Table.from_arrays([
            pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), self.input_size),
            pa.array(labels), pa.array(partitions), pa.array(offsets),
            ids, timestamps, split, pa.array(rows),
        ], schema=self._schema)

    # ---- reading ---------------------------------------------------------------

    def chunks(self) -> list[ChunkInfo]:
        """Sealed chunks, oldest first."""
        with self._lock:
            return list(self._chunks)

    @property
    def sealed_count(self) -> int:
        """How many chunks :meth:`chunks` lists (without copying the list)."""
        return len(self._chunks)

    def read_table(self, chunk_ids: Iterable[int] | None = None) -> pa.Table:
        """All columns of the given sealed chunks (default all) as one Arrow table."""
        tables = [_read_ipc(c.path) for c in self._select(chunk_ids)]
        return pa.concat_tables(tables) if tables else self._schema.empty_table()

    def dataset(self, chunk_ids: Iterable[int] | None = None,
                split: Literal["train", "val"] | None = "train") -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, *input_shape)`` float32 and labels ``(N,)`` int64 of sealed chunks.

        Args:
            chunk_ids: which chunks (default: all sealed chunks), in chunk order.
            split: "train", "val", or None for both.
        """
        if self.codec is not None:
            raise ValueError(f"store {self.path} holds {self.kind} chunks: read them with "
                             f"read_table(), not as fixed-size features")
        if split not in ("train", "val", None):
            raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
        xs, ys = [], []
        for chunk in self._select(chunk_ids):
            table = _read_ipc(chunk.path)  # memory-mapped; copied out below
            if split is not None:
                table = table.filter(pc.equal(table.column("split"), split))
            feats = table.column("features").combine_chunks().flatten()
            xs.append(feats.to_numpy(zero_copy_only=False).reshape(-1, self.input_size))
            ys.append(table.column("label").to_numpy())
        if not xs:
            return (np.zeros((0, *self.input_shape), np.float32), np.zeros(0, np.int64))
        x = np.concatenate(xs).reshape(-1, *self.input_shape)
        return x, np.concatenate(ys).astype(np.int64, copy=False)

    def _select(self, chunk_ids: Iterable[int] | None) -> list[ChunkInfo]:
        chunks = self.chunks()
        if chunk_ids is None:
            return chunks
        by_id = {c.id: c for c in chunks}
        wanted = sorted(set(chunk_ids))
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise ValueError(f"unknown chunk id(s) {unknown}; sealed: {sorted(by_id)}")
        return [by_id[i] for i in wanted]

    # ---- manifest --------------------------------------------------------------

    def _load(self) -> None:
        (self.path / _CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.path)
        if manifest is None:  # a new store: its identity is durable from the start
            self._store_id = new_store_id()
            log.info("new store %s (id %s)", self.path, self._store_id)
            self._write_manifest([], {})
        else:
            if manifest.kind != self.kind:
                raise StoreError(
                    f"store {self.path} holds {manifest.kind} chunks, but the configured model "
                    f"takes {self.kind} samples: point GNPD_STORE__PATH (or GNPD_DATA_DIR) at "
                    f"another folder for this model, or configure the model that learnt "
                    f"this store")
            if list(manifest.input_shape) != list(self.input_shape):
                raise ValueError(f"store {self.path} holds input_shape "
                                 f"{list(manifest.input_shape)}, not {list(self.input_shape)}")
            self._chunks = list(manifest.chunks)
            self._next = dict(manifest.next_offsets)
            self._topic_id = manifest.topic_id
            self._store_id = manifest.store_id
            if not self._store_id:  # written before stores had an identity: give it one now
                self._store_id = new_store_id()
                log.info("store %s had no identity; it is now %s", self.path, self._store_id)
                self._write_manifest(self._chunks, self._next)
        if self._lock_file is not None and self._lock_file.first:  # not a second view's
            sweep_strays(self.path, self._chunks, self._next)

    def _write_manifest(self, chunks: list[ChunkInfo], next_offsets: dict[int, int]) -> None:
        write_manifest(self.path, Manifest(
            self._store_id, self.input_shape, self.chunk_size, self.val_fraction,
            self._topic_id, dict(next_offsets), tuple(chunks), kind=self.kind))


def _samples_columns(samples: list[Sample]) -> tuple:
    """Columns of JSON samples: features, labels, partitions, offsets, rows, ids, timestamps."""
    n = len(samples)
    timestamps = [None if s.timestamp is None else float(s.timestamp) for s in samples]
    return (np.stack([s.features for s in samples]).astype(np.float32, copy=False),
            np.fromiter((s.label for s in samples), np.int64, n),
            np.fromiter((s.partition for s in samples), np.int32, n),
            np.fromiter((s.offset for s in samples), np.int64, n),
            np.zeros(n, np.int32),
            pa.array([s.id for s in samples], pa.string()),
            pa.array(timestamps, pa.float64()))


def _batch_columns(b: RowBatch) -> tuple:
    """The same columns for the good rows of one Arrow batch message (no per-row work)."""
    n = len(b)
    return (b.features.astype(np.float32, copy=False), b.labels.astype(np.int64, copy=False),
            np.full(n, b.partition, np.int32), np.full(n, b.offset, np.int64),
            b.rows.astype(np.int32, copy=False),
            pa.nulls(n, pa.string()) if b.ids is None else b.ids,
            pa.nulls(n, pa.float64()) if b.timestamps is None else b.timestamps)


def _offset_ranges(table: pa.Table) -> dict[int, tuple[int, int]]:
    parts = table.column("partition").to_numpy()
    offs = table.column("offset").to_numpy()
    return {int(p): (int(offs[parts == p].min()), int(offs[parts == p].max()))
            for p in np.unique(parts)}


def _ipc_bytes(table: pa.Table) -> memoryview:
    """The Arrow IPC file of ``table`` in memory (its checksum is taken before writing).

    An Arrow buffer, not BytesIO: no regrowth copies and no copy out (a 16 MB chunk took
    ~80 ms through BytesIO on the loaded benchmark machine).
    """
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return memoryview(sink.getvalue())


def _drop_page_cache(path: Path) -> None:
    """Let the kernel reuse a durable chunk's page-cache pages for the next chunk.

    Ingestion never reads a chunk back, and the training child maps it once per update;
    reusing freed pages for each new 16 MB file instead of taking fresh ones made Arrow
    ingestion faster on the benchmark VM: writing a new 16 MB file took ~50 ms with fresh
    pages, ~5 ms with recycled ones.
    """
    if not hasattr(os, "posix_fadvise"):  # not on macOS
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean (fsync'd) pages only
    finally:
        os.close(fd)


def _read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()
