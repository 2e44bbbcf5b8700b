"""The store's ``manifest.json``, its lock, chunk checksums and stray chunk files.

The manifest is the store's source of truth (see ``schemas/chunk.md``). This module
reads and writes it and never deletes a chunk file it cannot account for; when the
manifest is lost, :mod:`daemon.rebuild` lists the chunk files again from their own
columns (``gnpd store rebuild-manifest``). A :class:`StoreLock` (``flock`` on
``<store>/lock``) keeps a second process off a store that one daemon is using.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import crc32c
import pyarrow as pa
import pyarrow.ipc as ipc

__all__ = [
    "CHUNK_DIR", "CHUNK_SCHEMA_VERSION", "MANIFEST", "REBUILD_HINT", "TOPIC_META", "ChunkInfo",
    "Manifest",
    "StoreError", "StoreLock", "StoreLockedError", "chunk_id_of", "file_crc32c",
    "new_store_id", "read_manifest", "sweep_strays", "verify_chunk", "write_atomic",
    "write_manifest",
]

log = logging.getLogger(__name__)

CHUNK_SCHEMA_VERSION = 2  # 2: the `row` column (index of a row in an Arrow batch message)
MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
LOCK = "lock"
TOPIC_META = b"gnpd.topic_id"  # chunk schema metadata: the topic incarnation of its offsets
TMP_SUFFIX = ".tmp"
_CHUNK_NAME = re.compile(r"^chunk-(\d{6,})\.arrow$")
ORPHANS = "orphans"
REBUILD_HINT = "gnpd store rebuild-manifest --store {path}"


class StoreError(RuntimeError):
    """A store that cannot be opened as it is; the message names the path and the way out."""


class StoreLockedError(StoreError):
    """Another process holds the store's lock."""


@dataclass(frozen=True)
class ChunkInfo:
    """A sealed chunk: ``offsets[p] = (first, last)`` Kafka offsets of its samples.

    ``crc32c`` is the CRC-32C of the whole file (None in manifests written before
    checksums existed: such a chunk is checked only for being readable).
    """

    id: int
    path: Path
    rows: int
    offsets: dict[int, tuple[int, int]]
    created: float
    crc32c: int | None = None


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a store."""

    store_id: str
    input_shape: tuple[int, ...]
    chunk_size: int
    val_fraction: float
    topic_id: str | None
    next_offsets: dict[int, int]
    chunks: tuple[ChunkInfo, ...] = field(default=())
    kind: str = "image"  # what the chunks hold: "image" (fixed-size features) or "speech"

    def to_json(self) -> bytes:
        doc = {
            "version": CHUNK_SCHEMA_VERSION,
            "store_id": self.store_id,
            "input_shape": list(self.input_shape),
            "chunk_size": self.chunk_size,
            "val_fraction": self.val_fraction,
            "topic_id": self.topic_id,
            "next_offsets": {str(p): o for p, o in sorted(self.next_offsets.items())},
            "chunks": [_chunk_json(c) for c in self.chunks],
        }
        if self.kind != "image":  # image manifests stay as they were before speech stores
            doc["kind"] = self.kind
        return json.dumps(doc, indent=1).encode("utf-8")


def _chunk_json(c: ChunkInfo) -> dict[str, Any]:
    d: dict[str, Any] = {"id": c.id, "file": c.path.name, "rows": c.rows, "created": c.created,
                         "offsets": {str(p): list(r) for p, r in sorted(c.offsets.items())}}
    if c.crc32c is not None:
        d["crc32c"] = c.crc32c
    return d


def new_store_id() -> str:
    """A fresh store identity (32 hex digits)."""
    return uuid.uuid4().hex


def chunk_id_of(path: Path) -> int | None:
    """The chunk number in a file name like ``chunk-000007.arrow``; None for other names."""
    m = _CHUNK_NAME.match(path.name)
    return int(m.group(1)) if m else None


# ---- reading and writing --------------------------------------------------------------------

def read_manifest(store: Path) -> Manifest | None:
    """The manifest of the store at ``store``; None when the store has none and no chunks.

    Raises:
        StoreError: the manifest is missing while chunk files exist, is truncated or not
            valid, or lists a chunk file that is not there. Nothing is deleted.
    """
    path = store / MANIFEST
    if not path.exists():
        files = sorted(p.name for p in (store / CHUNK_DIR).glob("chunk-*.arrow"))
        if files:
            raise StoreError(
                f"{path} is missing but {store / CHUNK_DIR} holds {len(files)} chunk file(s) "
                f"({files[0]} ...): refusing to start rather than lose them. Rebuild the "
                f"manifest from the chunk files with: {REBUILD_HINT.format(path=store)}")
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        manifest = _parse(store, doc)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise StoreError(
            f"{path} cannot be read ({type(e).__name__}: {e}): it may be truncated or "
            f"corrupt. The chunk files are untouched; rebuild the manifest from them with: "
            f"{REBUILD_HINT.format(path=store)}") from None
    for c in manifest.chunks:
        if not c.path.exists():
            raise StoreError(f"chunk file {c.path} listed in {path} is missing. To go on with "
                             f"the chunks that remain, rebuild the manifest: "
                             f"{REBUILD_HINT.format(path=store)}")
    return manifest


def _parse(store: Path, doc: dict[str, Any]) -> Manifest:
    chunks = tuple(ChunkInfo(
        int(c["id"]), store / CHUNK_DIR / str(c["file"]), int(c["rows"]),
        {int(p): (int(a), int(b)) for p, (a, b) in c["offsets"].items()}, float(c["created"]),
        None if c.get("crc32c") is None else int(c["crc32c"])) for c in doc["chunks"])
    return Manifest(
        store_id=str(doc.get("store_id") or ""),
        input_shape=tuple(int(d) for d in doc["input_shape"]),
        chunk_size=int(doc.get("chunk_size", 0)),
        val_fraction=float(doc.get("val_fraction", 0.0)),
        topic_id=doc.get("topic_id"),
        next_offsets={int(p): int(o) for p, o in doc["next_offsets"].items()},
        chunks=chunks, kind=str(doc.get("kind", "image")))


def write_manifest(store: Path, manifest: Manifest) -> None:
    """Replace ``<store>/manifest.json`` atomically (temp file, fsync, rename, fsync dir)."""
    data = manifest.to_json()
    write_atomic(store / MANIFEST, lambda f: f.write(data))


def write_atomic(final: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write via ``write(file)`` to a temp file, fsync, rename over ``final``, fsync the dir."""
    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---- checksums ------------------------------------------------------------------------------

def file_crc32c(path: Path) -> int:
    """CRC-32C of a file's bytes, read through a memory map."""
    with pa.memory_map(str(path), "r") as src:
        return crc32c.crc32c(src.read_buffer())


def verify_chunk(chunk: ChunkInfo, input_size: int | None = None,
                 kind: str = "image") -> str | None:
    """Why ``chunk`` cannot be used (missing, checksum mismatch, unreadable, another kind
    of chunk); None if sound.

    A chunk without a recorded checksum (an old manifest) is checked for being a
    readable Arrow file with the recorded number of rows. ``kind`` "speech": the file
    must hold the speech chunk columns (``audio``) instead of fixed-size ``features``.
    """
    try:
        if chunk.crc32c is not None:
            actual = file_crc32c(chunk.path)
            if actual != chunk.crc32c:
                return f"checksum mismatch: crc32c {actual} != {chunk.crc32c} in the manifest"
        with pa.memory_map(str(chunk.path), "r") as src:
            reader = ipc.open_file(src)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            names = reader.schema.names
            if ("audio" in names) != (kind == "speech"):
                return (f"holds {'speech' if 'audio' in names else 'image'} samples, the "
                        f"store expects {kind} samples")
            width = None if kind == "speech" else reader.schema.field("features").type.list_size
    except FileNotFoundError:
        return "file is missing"
    except (OSError, pa.ArrowException, KeyError, AttributeError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    if rows != chunk.rows:
        return f"holds {rows} rows, the manifest says {chunk.rows}"
    if input_size is not None and width != input_size:
        return f"holds {width} features per sample, the store expects {input_size}"
    return None


# ---- lock -----------------------------------------------------------------------------------

class StoreLock:
    """An exclusive ``flock`` on ``<store>/lock`` holding the owner's pid; released on close.

    The lock keeps other *processes* out. Within one process the lock is shared and
    counted (a tool or test may open a second view of a store it already has open);
    the flock is dropped when the last holder releases it. ``first`` tells the holder
    that took the flock from a later view, which must not clean up after a crash: the
    files it would take for a crash's leftovers may be the first holder's writes.

    Raises:
        StoreLockedError: another process holds the store.
    """

    _held: dict[str, list[int]] = {}  # lock file -> [fd, holders] in this process
    _guard = threading.Lock()

    def __init__(self, store: Path) -> None:
        self.path = store / LOCK
        self._key: str | None = None
        key = str(self.path.resolve())
        with StoreLock._guard:
            held = StoreLock._held.get(key)
            self.first = held is None
            if held is None:
                StoreLock._held[key] = [self._acquire(store), 1]
            else:
                held[1] += 1
            self._key = key

    def _acquire(self, store: Path) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"store {store} is in use by process {holder} (lock {self.path}); "
                    f"two daemons cannot share a store") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def release(self) -> None:
        """Release this holder's share of the lock (idempotent)."""
        with StoreLock._guard:
            key, self._key = self._key, None
            held = StoreLock._held.get(key) if key else None
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del StoreLock._held[key]
                os.close(held[0])  # closing the only descriptor drops the flock

    def __del__(self) -> None:  # a store dropped without close() must not keep its lock
        self.release()


# ---- stray files ----------------------------------------------------------------------------

def sweep_strays(store: Path, chunks: list[ChunkInfo], next_offsets: dict[int, int]) -> None:
    """Delete temp files and the chunk a crash left unlisted; move other strays aside.

    A chunk file the manifest does not list is deleted only when a crash between its
    rename and the manifest write explains it: numbered after the last listed chunk,
    every offset at or past ``next_offsets`` (its messages are read again from Kafka).
    Anything else goes to ``<store>/orphans/``: never delete what cannot be accounted for.
    """
    listed = {c.path.name for c in chunks}
    last = chunks[-1].id if chunks else 0
    for entry in sorted((store / CHUNK_DIR).iterdir()):
        if not entry.is_file() or entry.name in listed:
            continue
        if entry.name.endswith(TMP_SUFFIX):
            log.warning("removing %s: an incomplete write (left by a crash)", entry)
            entry.unlink()
        elif (chunk_id_of(entry) or 0) > last and _read_again(entry, next_offsets):
            log.warning("removing %s: sealed but not in the manifest (a crash); its "
                        "messages are read again from Kafka", entry)
            entry.unlink()
        else:
            target = store / ORPHANS / entry.name
            target.parent.mkdir(exist_ok=True)
            log.warning("moving %s to %s: not in the manifest and not explained by a "
                        "crash (nothing is deleted; inspect it)", entry, target)
            os.replace(entry, target)
    (store / (MANIFEST + TMP_SUFFIX)).unlink(missing_ok=True)


def _read_again(path: Path, next_offsets: dict[int, int]) -> bool:
    """True if every message in the chunk file lies at or past ``next_offsets``."""
    try:
        with pa.memory_map(str(path), "r") as src:
            table = ipc.open_file(src).read_all()
            parts = table.column("partition").to_pylist()
            offs = table.column("offset").to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return False
    return all(o >= next_offsets.get(p, 0) for p, o in zip(parts, offs, strict=True))
