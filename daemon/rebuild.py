"""Rebuild a store's ``manifest.json`` from its chunk files (``gnpd store rebuild-manifest``).

Chunk files hold their samples' Kafka partition and offset, so a lost or damaged
manifest can be written again: every readable chunk is listed with its rows, offset
ranges and checksum; the old manifest is moved aside; nothing is deleted.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from daemon.manifest import (
    CHUNK_DIR, MANIFEST, TOPIC_META, ChunkInfo, Manifest, StoreError, StoreLock, chunk_id_of,
    file_crc32c, new_store_id, write_manifest,
)

__all__ = ["Rebuilt", "rebuild_manifest"]


@dataclass(frozen=True)
class Rebuilt:
    """What :func:`rebuild_manifest` did."""

    manifest: Manifest
    skipped: tuple[tuple[str, str], ...]  # (file name, reason): left in place, not listed
    old_manifest: Path | None  # where the unreadable manifest was moved, if there was one
    store_id_source: str  # "argument", "old manifest", "checkpoint" or "new"


def rebuild_manifest(store: Path, input_shape: tuple[int, ...], chunk_size: int,
                     val_fraction: float, store_id: str | None = None,
                     adopt_store_id: Callable[[list[ChunkInfo]], str | None] | None = None,
                     kind: str = "image") -> Rebuilt:
    """Write a new manifest listing every readable chunk file of ``store``.

    ``next_offsets[p]`` becomes the last offset of partition ``p`` in the newest chunk that
    holds it, plus one (messages rejected after the last stored one are read again and
    dead-lettered again); newest, not largest, because offsets go back where the broker
    truncated its log. The topic id is the old manifest's, else the newest chunk's (each
    chunk records the topic incarnation its offsets count in); chunks of another
    incarnation (the topic was recreated, its offsets started again at 0) stay listed but
    set no offsets. The store id is ``store_id`` when given, else the one salvaged from the old
    manifest's text, else ``adopt_store_id(chunks)`` (the CLI offers the newest
    checkpoint's when every chunk it learnt is among ``chunks``), else new. The old
    manifest is moved aside, never deleted; no chunk file is touched. ``kind`` "speech":
    the chunks of a speech model's store (an ``audio`` column, no fixed-size features).

    Raises:
        StoreLockedError: a daemon is using the store.
        StoreError: a chunk file holds the other kind of samples (speech vs image).
    """
    lock = StoreLock(store)
    try:
        old_text = _read_text(store / MANIFEST)
        salvaged = _salvage(old_text)
        chunks, topics, skipped = _scan_chunks(store, math.prod(input_shape), kind)
        topic = salvaged.get("topic_id") or next((t for t in reversed(topics) if t), None)
        next_offsets: dict[int, int] = {}
        for c, t in zip(chunks, topics):  # in chunk order: the newest holding p says
            if t is None or t == topic:  # (a chunk written before chunks named their topic)
                for p, (_, last) in c.offsets.items():
                    next_offsets[p] = last + 1
        sources = (("argument", store_id), ("old manifest", salvaged.get("store_id")))
        source, sid = next(((n, v) for n, v in sources if v), ("", None))
        if sid is None and adopt_store_id is not None:
            source, sid = "checkpoint", adopt_store_id(chunks)
        if not sid:
            source, sid = "new", new_store_id()
        manifest = Manifest(sid, tuple(input_shape), chunk_size, val_fraction,
                            topic, next_offsets, tuple(chunks), kind=kind)
        moved = None
        if old_text is not None:
            moved = store / f"{MANIFEST}.broken-{int(time.time())}"
            os.replace(store / MANIFEST, moved)
        write_manifest(store, manifest)
        return Rebuilt(manifest, tuple(skipped), moved, source)
    finally:
        lock.release()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _salvage(text: str | None) -> dict[str, str]:
    """``store_id`` and ``topic_id`` from a manifest's text, even a truncated one."""
    out = {}
    for key in ("store_id", "topic_id"):
        m = re.search(rf'"{key}"\s*:\s*"([^"]+)"', text or "")
        if m:
            out[key] = m.group(1)
    return out


def _scan_chunks(store: Path, input_size: int, kind: str = "image"
                 ) -> tuple[list[ChunkInfo], list[str | None], list[tuple[str, str]]]:
    """The readable chunks in id order, the topic id each records, and the files left out."""
    chunks, topics, skipped = [], [], []
    # by number (chunk-1000000 comes after chunk-999999): the newest chunk sets the offsets
    for path in sorted((store / CHUNK_DIR).glob("chunk-*.arrow"),
                       key=lambda p: (chunk_id_of(p) or 0, p.name)):
        number = chunk_id_of(path)
        if number is None:
            skipped.append((path.name, "not a chunk file name"))
            continue
        try:
            chunk, topic = _describe(path, number, input_size, kind)
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            skipped.append((path.name, f"unreadable: {type(e).__name__}: {e}"))
            continue
        chunks.append(chunk)
        topics.append(topic)
    return chunks, topics, skipped


def _describe(path: Path, number: int, input_size: int, kind: str = "image"
              ) -> tuple[ChunkInfo, str | None]:
    """A ChunkInfo for a chunk file, from its partition and offset columns, and the topic id
    its metadata records (None: written before chunks recorded it, or the topic unknown)."""
    with pa.memory_map(str(path), "r") as src:
        table = ipc.open_file(src).read_all()
        if ("audio" in table.schema.names) != (kind == "speech"):  # never skip it: the
            other = "speech" if kind == "image" else "image"  # sweep would delete it
            raise StoreError(f"{path} holds {other} samples, not {kind} ones: rebuild this "
                             f"store with the settings of the model that learnt it "
                             f"(GNPD_MODEL__NAME)")
        width = input_size if kind == "speech" else table.schema.field("features").type.list_size
        if width != input_size:
            raise ValueError(f"{width} features per sample, the settings say {input_size}")
        topic = (table.schema.metadata or {}).get(TOPIC_META)
        parts = table.column("partition").to_pylist()
        offs = table.column("offset").to_pylist()
    ranges: dict[int, tuple[int, int]] = {}
    for p, o in zip(parts, offs, strict=True):
        a, b = ranges.get(p, (o, o))
        ranges[p] = (min(a, o), max(b, o))
    return (ChunkInfo(number, path, len(offs), ranges, path.stat().st_mtime, file_crc32c(path)),
            topic.decode() if topic else None)
