"""Write-behind sealing: chunks written in the background, durable before they count.

The store unit tests gate or break the real file writes (``daemon.store._write_atomic``)
to hold a chunk in flight; the ingestor tests run against the real broker, and one
SIGKILLs an ingesting process while a chunk file is on disk but not yet in the manifest.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import daemon.store as store_module
from daemon.manifest import read_manifest
from daemon.messages import Sample
from daemon.store import ChunkStore
from tests.daemon.test_ingest import (CHUNK, SHAPE, committed, drain, good, ingestor, send,
                                      settings, stored_ids)

REPO = Path(__file__).resolve().parents[2]


def sample(offset: int) -> Sample:
    return Sample(np.full(4, offset, np.float32), offset % 3, 0, offset, f"s/{offset}", None)


def samples(start: int, stop: int) -> list[Sample]:
    return [sample(i) for i in range(start, stop)]


def listed(path: Path) -> list[int]:
    """Chunk ids the manifest on disk lists (what a restart would see)."""
    manifest = read_manifest(path)
    return [c.id for c in manifest.chunks] if manifest else []


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Chunk-file writes wait until the event is set (manifest writes do not)."""
    opened, real = threading.Event(), store_module._write_atomic

    def gated(final: Path, write) -> None:
        assert opened.wait(30), "gate never opened"
        real(final, write)

    monkeypatch.setattr(store_module, "_write_atomic", gated)
    yield opened
    opened.set()


@pytest.fixture
def disk_full_once(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The first chunk-file write fails with ENOSPC; returns the paths it refused."""
    refused: list[Path] = []
    real = store_module._write_atomic

    def failing(final: Path, write) -> None:
        if not refused:
            refused.append(final)
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        real(final, write)

    monkeypatch.setattr(store_module, "_write_atomic", failing)
    return refused


# ---- the store -------------------------------------------------------------------------

def test_a_chunk_counts_only_once_its_file_and_manifest_are_durable(
        tmp_path: Path, gate: threading.Event) -> None:
    store = ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=1)
    (info,) = store.append(samples(0, 4))  # sealed: handed to the writer, not durable yet
    store.append(samples(4, 6))  # the ingest thread goes on meanwhile
    assert store.chunks() == [] and store.next_offsets() == {} and listed(tmp_path) == []
    assert not info.path.exists() and store.positions() == {0: 6}
    gate.set()
    store.sync()
    assert [c.id for c in store.chunks()] == [1] and listed(tmp_path) == [1]
    assert store.next_offsets() == {0: 4} and store.buffered == 2
    store.close()


def test_at_most_write_behind_chunks_are_in_flight(tmp_path: Path,
                                                   gate: threading.Event) -> None:
    store = ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=1)
    store.append(samples(0, 4))
    second = threading.Thread(target=store.append, args=(samples(4, 8),))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "a second chunk was sealed while the first was in flight"
    gate.set()
    second.join(10)
    store.sync()
    assert [c.id for c in store.chunks()] == [1, 2] and listed(tmp_path) == [1, 2]
    store.close()


def test_a_failed_background_write_is_raised_to_the_caller_and_nothing_is_lost(
        tmp_path: Path, disk_full_once: list[Path]) -> None:
    store = ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=2)
    store.append(samples(0, 8))  # two chunks in flight; the first write fails
    with pytest.raises(OSError, match="No space left"):
        store.sync()
    with pytest.raises(OSError):  # refused until the caller rewinds
        store.append(samples(8, 9))
    # chunk 2 was not written after chunk 1 failed: the manifest never has a gap
    assert store.chunks() == [] and listed(tmp_path) == []
    assert not (tmp_path / "chunks" / "chunk-000002.arrow").exists()
    assert store.discard_buffer() == 0 and store.positions() == {}
    assert [c.id for c in store.append(samples(0, 8))] == [1, 2]  # read again, same ids
    store.sync()
    assert stored_ids(store) == [f"s/{i}" for i in range(8)]
    assert listed(tmp_path) == [1, 2] and disk_full_once == [tmp_path / "chunks" /
                                                            "chunk-000001.arrow"]
    assert not list(tmp_path.rglob("*.tmp"))
    store.close()


def test_a_rebase_never_hides_a_failed_write(tmp_path: Path,
                                             disk_full_once: list[Path]) -> None:
    store = ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=1)
    store.append(samples(0, 5))
    with pytest.raises(OSError):  # else offsets 0-3 would count as consumed, never stored
        store.rebase(0, 5)
    store.discard_buffer()
    assert store.positions() == {} and store.next_offsets() == {}
    store.close()


def test_close_finishes_the_writes_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    store = ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=1)
    store.append(samples(0, 5))
    threading.Timer(0.2, gate.set).start()
    store.close()
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as again:
        assert [c.rows for c in again.chunks()] == [4] and again.next_offsets() == {0: 4}


# ---- the ingestor, real broker -----------------------------------------------------------

@pytest.mark.integration
def test_offsets_are_committed_only_once_the_chunk_is_durable(
        kafka_bootstrap: str, make_topic, tmp_path: Path, gate: threading.Event) -> None:
    topic = make_topic(partitions=1)
    kafka = settings(kafka_bootstrap, topic)
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(CHUNK + 2)])
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2, write_behind=1)
    ing = ingestor(kafka, store)
    drain(ing, lambda: store.positions() == {0: CHUNK + 2})  # consumed past the seal
    assert committed(kafka_bootstrap, kafka.group_id, topic, 1) == {0: None}
    assert listed(tmp_path) == [] and ing.stats.sealed == 0
    gate.set()
    drain(ing, lambda: ing.stats.sealed == 1)
    assert committed(kafka_bootstrap, kafka.group_id, topic, 1) == {0: CHUNK}
    ing.stop()
    store.close()


@pytest.mark.integration
def test_a_background_write_error_is_recovered_on_the_ingest_thread(
        kafka_bootstrap: str, make_topic, tmp_path: Path, disk_full_once: list[Path]) -> None:
    topic = make_topic(partitions=1)
    kafka = settings(kafka_bootstrap, topic)
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(3 * CHUNK)])
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2, write_behind=1)
    ing = ingestor(kafka, store)
    ing.start()  # its loop recovers from the error: rewinds to the last durable seal
    deadline = time.monotonic() + 30
    while len(store.chunks()) < 3:
        assert time.monotonic() < deadline, f"timed out; stats {ing.stats}"
        time.sleep(0.05)
    assert ing.stop()
    assert disk_full_once and ing.stats.errors == 1
    assert sorted(stored_ids(store)) == sorted(f"good/{i}" for i in range(3 * CHUNK))
    assert committed(kafka_bootstrap, kafka.group_id, topic, 1) == {0: 3 * CHUNK}
    store.close()


# A worker that ingests with write-behind, but whose second manifest write never
# happens: chunk 2's file is on disk, the manifest lists chunk 1 only. It prints
# "stuck" there, and the test SIGKILLs it.
STUCK_WORKER = textwrap.dedent("""
    import sys, threading, daemon.store as store_module
    from daemon.ingest import Ingestor
    from daemon.settings import KafkaSettings
    from daemon.store import ChunkStore
    bootstrap, topic, path, chunk = sys.argv[1:5]
    real, calls = store_module.write_manifest, []
    def write_manifest(*args):
        calls.append(1)
        if len(calls) == 3:  # 1: a new store, 2: chunk 1, 3: chunk 2
            print("stuck", flush=True)
            threading.Event().wait()
        real(*args)
    store_module.write_manifest = write_manifest
    store = ChunkStore(path, int(chunk), (4,), 0.2, write_behind=1)
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id="stuck",
                          poll_timeout_ms=50)
    Ingestor(kafka, store, input_shape=(4,), num_classes=3).run()
""")


@pytest.mark.integration
def test_sigkill_between_chunk_file_and_manifest_loses_and_duplicates_nothing(
        kafka_bootstrap: str, make_topic, tmp_path: Path) -> None:
    topic = make_topic(partitions=1)
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(3 * CHUNK)])
    store_dir = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_WORKER, kafka_bootstrap, topic, str(store_dir),
         str(CHUNK)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"stuck\n"
        assert (store_dir / "chunks" / "chunk-000002.arrow").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert listed(store_dir) == [1]
    # never past the manifest (chunk 1 may not have been committed yet: the ingest
    # thread was waiting for room to seal chunk 3)
    assert committed(kafka_bootstrap, "stuck", topic, 1)[0] in (None, CHUNK)
    store = ChunkStore(store_dir, CHUNK, SHAPE, 0.2, write_behind=1)
    ing = ingestor(settings(kafka_bootstrap, topic), store)
    drain(ing, lambda: len(store.chunks()) == 3)
    ing.stop()
    assert sorted(stored_ids(store)) == sorted(f"good/{i}" for i in range(3 * CHUNK))
    store.close()


def test_write_behind_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="write_behind"):
        ChunkStore(tmp_path, 4, SHAPE, 0.25, write_behind=-1)


def test_a_second_view_in_the_process_leaves_a_chunk_in_flight_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ChunkStore on the path shares the in-process lock; its startup sweep took the
    first one's chunk file, renamed into place but not yet in the manifest, for a crash's
    leftover and deleted it: the first then listed a missing file and its samples were lost."""
    renamed, go, real = threading.Event(), threading.Event(), store_module.write_manifest

    def held(path: Path, manifest) -> None:
        if manifest.chunks:  # the chunk file is in place, its manifest write waits
            renamed.set()
            assert go.wait(30)
        real(path, manifest)

    monkeypatch.setattr(store_module, "write_manifest", held)
    first = ChunkStore(tmp_path, 4, (4,), 0.25, write_behind=1)
    first.append(samples(0, 4))
    assert renamed.wait(30)
    ChunkStore(tmp_path, 4, (4,), 0.25).close()  # a view: sees the file, not in the manifest
    go.set()
    first.close()
    again = ChunkStore(tmp_path, 4, (4,), 0.25)
    assert [c.rows for c in again.chunks()] == [4] and again.read_table().num_rows == 4
    again.close()
