"""The store's manifest: never lose chunk files, refuse clearly, rebuild, lock, checksums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.manifest import read_manifest
from daemon.messages import Sample
from daemon.store import ChunkStore, StoreError

SHAPE = (1, 2, 2)
REPO = Path(__file__).resolve().parents[2]


def sample(partition: int, offset: int) -> Sample:
    return Sample(np.full(4, offset, np.float32), offset % 3, partition, offset, f"{partition}/{offset}")


def filled(path: Path, chunks: int = 3) -> ChunkStore:
    """A store with ``chunks`` sealed chunks of 4 over two partitions, plus a rejected offset."""
    store = ChunkStore(path, 4, SHAPE, 0.25)
    store.append([sample(o % 2, o // 2) for o in range(4 * chunks)])
    store.skip(1, 4 * chunks)  # not in any chunk: rebuilt next_offsets cannot know it
    return store


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "chunks").iterdir())}


def _gnpd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GNPD_MODEL__INPUT_SHAPE": "[1,2,2]",
           "GNPD_STORE__CHUNK_SIZE": "4", "GNPD_STORE__VAL_FRACTION": "0.25", **(env or {})}
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--env-file", "/dev/null"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_manifest_refuses_and_deletes_nothing(tmp_path):
    filled(tmp_path).close()
    before = _files(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(StoreError) as e:
        ChunkStore(tmp_path, 4, SHAPE, 0.25)
    assert str(tmp_path / "manifest.json") in str(e.value)
    assert f"gnpd store rebuild-manifest --store {tmp_path}" in str(e.value)
    assert _files(tmp_path) == before  # every chunk file still there, byte for byte


@pytest.mark.parametrize("damage", ["truncated", "empty", "not json"])
def test_corrupt_manifest_refuses_naming_the_path_and_the_command(tmp_path, damage):
    filled(tmp_path).close()
    manifest = tmp_path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text({"truncated": text[: len(text) // 2], "empty": "",
                         "not json": "[1, 2]"}[damage])
    with pytest.raises(StoreError) as e:
        ChunkStore(tmp_path, 4, SHAPE, 0.25)
    assert str(manifest) in str(e.value) and "rebuild-manifest" in str(e.value)
    assert len(_files(tmp_path)) == 3


def test_rebuild_manifest_command_round_trip(tmp_path):
    store = filled(tmp_path)
    chunks, store_id = store.chunks(), store.store_id
    x_before, y_before = store.dataset(split=None)
    store.close()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:150])  # truncated: the store id survives

    proc = _gnpd("store", "rebuild-manifest", "--store", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "rebuilt" in proc.stdout and "3 chunk(s)" in proc.stdout
    assert len(list(tmp_path.glob("manifest.json.broken-*"))) == 1  # moved aside, not deleted

    again = ChunkStore(tmp_path, 4, SHAPE, 0.25)
    assert again.store_id == store_id
    assert [(c.id, c.rows, c.offsets, c.crc32c) for c in again.chunks()] == [
        (c.id, c.rows, c.offsets, c.crc32c) for c in chunks]
    # next offset = largest stored offset + 1 (the rejected offset 6 of partition 1 is re-read)
    assert again.next_offsets() == {0: 6, 1: 6}
    x, y = again.dataset(split=None)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    (c4,) = again.append([sample(o % 2, 6 + o // 2) for o in range(4)])
    assert c4.id == 4


def test_rebuild_resumes_in_the_topic_incarnation_and_after_a_truncation(tmp_path):
    """Offsets count in one topic incarnation and go back where the broker truncated its
    log: the largest stored offset skipped the new topic's records (or the ones written
    after a truncation), so the rebuild takes the newest chunk of the recorded topic."""
    from daemon.rebuild import rebuild_manifest

    store = ChunkStore(tmp_path, 4, SHAPE, 0.25)
    store.bind_topic("old-id")
    store.append([sample(o % 2, 100 + o // 2) for o in range(8)])  # offsets 100..103 on 0 and 1
    assert store.bind_topic("new-id")  # recreated: offsets restart at 0
    store.append([sample(0, o) for o in range(8)])  # 0..7 on partition 0
    store.rebase(0, 5)  # the broker truncated partition 0 at 5
    store.append([sample(0, o) for o in range(5, 9)])  # 5..8 on partition 0
    want = store.next_offsets()
    assert want == {0: 9}
    store.close()
    text = (tmp_path / "manifest.json").read_text()
    for damage in (text[: text.index('"topic_id"') + 30], None):  # cut after the topic id; gone
        if damage is None:
            (tmp_path / "manifest.json").unlink()
        else:
            (tmp_path / "manifest.json").write_text(damage)
        done = rebuild_manifest(tmp_path, SHAPE, 4, 0.25)
        # the newest chunk's topic when the manifest is gone; partition 1 was only in the old one
        assert done.manifest.topic_id == "new-id" and done.manifest.next_offsets == want
        assert [c.rows for c in done.manifest.chunks] == [4, 4, 4, 4, 4]  # every chunk listed
        again = ChunkStore(tmp_path, 4, SHAPE, 0.25)
        assert not again.bind_topic("new-id") and again.next_offsets() == want
        again.close()


def test_rebuild_orders_chunks_by_number_past_six_digits(tmp_path):
    from daemon.rebuild import rebuild_manifest

    store = ChunkStore(tmp_path, 4, SHAPE, 0.25)
    store.append([sample(0, o) for o in range(8)])  # chunks 1, 2: offsets 0..7
    store.rebase(0, 0)  # the broker truncated everything
    store.append([sample(0, o) for o in range(4)])  # chunk 3: offsets 0..3
    store.close()
    chunks = tmp_path / "chunks"
    for old, new in ((1, 999998), (2, 999999), (3, 1000000)):  # by name, 1000000 sorts first
        (chunks / f"chunk-{old:06d}.arrow").rename(chunks / f"chunk-{new:06d}.arrow")
    (tmp_path / "manifest.json").unlink()
    done = rebuild_manifest(tmp_path, SHAPE, 4, 0.25)
    assert [c.id for c in done.manifest.chunks] == [999998, 999999, 1000000]
    assert done.manifest.next_offsets == {0: 4}


def test_rebuild_leaves_unreadable_chunks_in_place_and_unlisted(tmp_path):
    filled(tmp_path).close()
    bad = tmp_path / "chunks" / "chunk-000002.arrow"
    bad.write_bytes(bad.read_bytes()[:100])
    (tmp_path / "manifest.json").unlink()
    proc = _gnpd("store", "rebuild-manifest", "--store", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "left out chunk-000002.arrow: unreadable" in proc.stdout
    doc = read_manifest(tmp_path)
    assert [c.id for c in doc.chunks] == [1, 3] and bad.exists()
    # Opening the store moves the unlisted file aside (never deletes it).
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as store:
        assert [c.id for c in store.chunks()] == [1, 3]
    assert (tmp_path / "orphans" / "chunk-000002.arrow").exists() and not bad.exists()


def test_rebuild_refuses_while_a_daemon_holds_the_store(tmp_path):
    store = filled(tmp_path)
    proc = _gnpd("store", "rebuild-manifest", "--store", str(tmp_path))
    assert proc.returncode == 1 and f"in use by process {os.getpid()}" in proc.stderr
    store.close()


def test_second_process_on_a_store_is_refused_naming_the_holder(tmp_path):
    store = filled(tmp_path)
    code = ("import sys; from daemon.store import ChunkStore\n"
            f"try: ChunkStore({str(tmp_path)!r}, 4, (1, 2, 2), 0.25)\n"
            "except Exception as e: print(type(e).__name__, e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "StoreLockedError" in proc.stdout and f"in use by process {os.getpid()}" in proc.stdout
    store.close()
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # free again once closed


def test_unexplained_stray_chunk_is_moved_aside_not_deleted(tmp_path):
    with filled(tmp_path, chunks=2) as store:
        first = store.chunks()[0].path.read_bytes()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["chunks"] = manifest["chunks"][1:]  # chunk 1 no longer listed: not a crash leftover
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as store:
        assert [c.id for c in store.chunks()] == [2]
    assert (tmp_path / "orphans" / "chunk-000001.arrow").read_bytes() == first


def test_store_identity_is_created_once_and_kept(tmp_path):
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as store:
        sid = store.store_id
        assert len(sid) == 32 and read_manifest(tmp_path).store_id == sid  # durable at once
        store.append([sample(0, o) for o in range(4)])
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as store:
        assert store.store_id == sid
    with ChunkStore(tmp_path / "other", 4, SHAPE, 0.25) as other:
        assert other.store_id != sid


def test_old_manifest_without_identity_or_checksums_still_loads(tmp_path):
    with filled(tmp_path) as store:
        chunks = store.chunks()
    doc = json.loads((tmp_path / "manifest.json").read_text())
    del doc["store_id"]
    for c in doc["chunks"]:
        del c["crc32c"]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with ChunkStore(tmp_path, 4, SHAPE, 0.25) as store:
        assert len(store.store_id) == 32
        assert [c.crc32c for c in store.chunks()] == [None] * 3
        assert [store.verify(c) for c in store.chunks()] == [None] * 3
        assert len(store.dataset(split=None)[0]) == 12
    assert read_manifest(tmp_path).store_id == store.store_id  # given an identity, kept
    assert [c.offsets for c in read_manifest(tmp_path).chunks] == [c.offsets for c in chunks]
