"""ChunkStore: sealing, atomic files, manifest round trip, dataset(), splits, offsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from daemon.manifest import read_manifest
from daemon.messages import Sample
from daemon.store import ChunkStore, StoreError, chunk_schema, val_mask

SHAPE = (1, 2, 2)


def sample(partition: int, offset: int, label: int | None = None) -> Sample:
    value = partition * 1000 + offset
    feats = np.full(4, value, dtype=np.float32) + np.arange(4, dtype=np.float32) / 10
    return Sample(feats, value % 3 if label is None else label, partition, offset,
                  f"p{partition}/o{offset}", float(value))


def make(path: Path, chunk_size: int = 4, val_fraction: float = 0.25) -> ChunkStore:
    return ChunkStore(path, chunk_size, SHAPE, val_fraction)


def test_seals_each_time_chunk_size_is_reached(tmp_path: Path) -> None:
    store = make(tmp_path)
    assert store.append([sample(0, i) for i in range(3)]) == []
    assert store.buffered == 3 and store.chunks() == []
    sealed = store.append([sample(0, i) for i in range(3, 11)])
    assert [c.id for c in sealed] == [1, 2] and store.buffered == 3
    assert [c.rows for c in store.chunks()] == [4, 4]
    assert sealed[0].offsets == {0: (0, 3)} and sealed[1].offsets == {0: (4, 7)}
    assert sealed[0].path == tmp_path / "chunks" / "chunk-000001.arrow"
    assert store.next_offsets() == {0: 8}  # offsets 8.. are buffered, not durable
    assert store.positions() == {0: 11}


def test_chunk_file_is_arrow_with_documented_schema(tmp_path: Path) -> None:
    store = make(tmp_path)
    (chunk,) = store.append([sample(0, 0), sample(1, 0), sample(0, 1), sample(1, 5)])
    with pa.memory_map(str(chunk.path)) as src:
        table = ipc.open_file(src).read_all()
    assert table.schema.equals(chunk_schema(4), check_metadata=True)
    assert table.column("id").to_pylist() == ["p0/o0", "p1/o0", "p0/o1", "p1/o5"]
    assert table.column("offset").to_pylist() == [0, 0, 1, 5]
    assert sorted(table.column("split").to_pylist()) == ["train", "train", "train", "val"]
    assert chunk.offsets == {0: (0, 1), 1: (0, 5)}
    assert not list(tmp_path.rglob("*.tmp"))


def test_manifest_round_trip(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.append([sample(p, o) for o in range(6) for p in (0, 1)])  # 12 -> 3 chunks
    store.append([sample(0, 6)])
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["next_offsets"] == {"0": 6, "1": 6}
    store.close()
    again = make(tmp_path)
    assert again.chunks() == store.chunks()
    assert again.next_offsets() == {0: 6, 1: 6}
    assert again.buffered == 0  # the open buffer was not durable, by design
    x1, y1 = store.dataset(split=None)
    x2, y2 = again.dataset(split=None)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_reopen_with_other_input_shape_fails(tmp_path: Path) -> None:
    make(tmp_path).append([sample(0, i) for i in range(4)])
    with pytest.raises(ValueError, match=r"input_shape \[1, 2, 2\]"):
        ChunkStore(tmp_path, 4, (4,), 0.25)


def test_dataset_shapes_values_and_splits(tmp_path: Path) -> None:
    store = make(tmp_path, chunk_size=8)
    samples = [sample(0, i) for i in range(16)]
    store.append(samples)
    x, y = store.dataset(split=None)
    assert x.shape == (16, *SHAPE) and x.dtype == np.float32
    assert y.shape == (16,) and y.dtype == np.int64
    np.testing.assert_array_equal(x.reshape(16, -1), np.stack([s.features for s in samples]))
    np.testing.assert_array_equal(y, [s.label for s in samples])
    xt, yt = store.dataset()  # train by default
    xv, yv = store.dataset(split="val")
    assert len(xt) == 12 and len(xv) == 4  # 0.25 of each 8-sample chunk
    assert sorted(np.concatenate([yt, yv]).tolist()) == sorted(y.tolist())
    x2, _ = store.dataset([2], split=None)
    np.testing.assert_array_equal(x2, x[8:])
    assert store.dataset([], split=None)[0].shape == (0, *SHAPE)


def test_dataset_rejects_unknown_chunk_and_split(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.append([sample(0, i) for i in range(4)])
    with pytest.raises(ValueError, match=r"unknown chunk id\(s\) \[7\]"):
        store.dataset([7])
    with pytest.raises(ValueError, match="split"):
        store.dataset(split="test")  # type: ignore[arg-type]


def test_val_split_deterministic_and_about_fraction() -> None:
    parts = np.repeat(np.arange(4, dtype=np.int32), 2500)
    offs = np.tile(np.arange(2500, dtype=np.int64), 4)
    mask = val_mask(parts, offs, 0.1)
    assert mask.sum() == 1000
    shuffled = np.random.default_rng(0).permutation(len(offs))
    again = val_mask(parts[shuffled], offs[shuffled], 0.1)
    np.testing.assert_array_equal(again, mask[shuffled])  # order-independent
    # not a trivial pattern: every partition and every offset decile gets a share
    for p in range(4):
        assert 150 < mask[parts == p].sum() < 350
    assert 50 < mask[offs < 250].sum() < 150


def test_split_stable_when_chunk_is_rebuilt(tmp_path: Path) -> None:
    a = make(tmp_path / "a", chunk_size=20, val_fraction=0.2)
    b = make(tmp_path / "b", chunk_size=20, val_fraction=0.2)
    a.append([sample(p, o) for p in (0, 1) for o in range(10)])
    b.append([sample(p, o) for o in range(10) for p in (1, 0)])  # another arrival order
    val_a, val_b = (_val_ids(store.read_table()) for store in (a, b))
    assert val_a == val_b and len(val_a) == 4


def _val_ids(table: pa.Table) -> set[str]:
    ids, splits = table["id"].to_pylist(), table["split"].to_pylist()
    return {i for i, s in zip(ids, splits, strict=True) if s == "val"}


def test_orphans_and_temp_files_are_removed(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    store.append([sample(0, i) for i in range(4)])
    store.close()
    with make(tmp_path / "other") as other:  # the chunk a crash would have left: offsets 4..7
        other.append([sample(0, i) for i in range(4, 8)])
    chunks = tmp_path / "s" / "chunks"
    # A crash after renaming chunk 2 but before the manifest, and half-written temps:
    (chunks / "chunk-000002.arrow").write_bytes(
        (tmp_path / "other" / "chunks" / "chunk-000001.arrow").read_bytes())
    (chunks / "chunk-000003.arrow.tmp").write_bytes(b"partial")
    (tmp_path / "s" / "manifest.json.tmp").write_text("{")
    tmp_path = tmp_path / "s"
    again = make(tmp_path)
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk-000001.arrow"]
    assert not (tmp_path / "manifest.json.tmp").exists()
    assert [c.id for c in again.chunks()] == [1] and again.next_offsets() == {0: 4}
    # the re-read messages seal into chunk 2 once
    (c2,) = again.append([sample(0, i) for i in range(4, 8)])
    assert c2.id == 2 and len(again.dataset(split=None)[0]) == 8


def test_missing_listed_chunk_is_an_error(tmp_path: Path) -> None:
    make(tmp_path).append([sample(0, i) for i in range(4)])
    (tmp_path / "chunks" / "chunk-000001.arrow").unlink()
    with pytest.raises(StoreError, match="chunk-000001.*rebuild-manifest"):
        make(tmp_path)


def test_skipped_offsets_advance_next_offsets(tmp_path: Path) -> None:
    store = make(tmp_path, chunk_size=3)
    store.append([sample(0, 0)])
    assert store.skip(0, 1)           # rejected message at offset 1
    store.append([sample(1, 0)])
    assert store.skip(1, 1) and store.skip(1, 2)
    assert store.next_offsets() == {}  # nothing durable yet
    (chunk,) = store.append([sample(0, 2)])
    assert chunk.rows == 3
    assert store.next_offsets() == {0: 3, 1: 3}  # rejected offsets before the seal count
    assert store.skip(0, 3)           # after the seal: not durable until the next one
    store.close()
    assert make(tmp_path).next_offsets() == {0: 3, 1: 3}


def test_redelivered_offsets_are_ignored(tmp_path: Path) -> None:
    store = make(tmp_path, chunk_size=4)
    store.append([sample(0, 0), sample(0, 1)])
    assert store.append([sample(0, 0), sample(0, 1), sample(0, 2)]) == []
    assert store.buffered == 3
    assert not store.skip(0, 1)
    store.append([sample(0, 3)])
    assert store.append([sample(0, 2)]) == [] and store.buffered == 0  # already sealed
    assert store.read_table()["offset"].to_pylist() == [0, 1, 2, 3]


def test_flush_seals_partial_and_discard_rewinds(tmp_path: Path) -> None:
    store = make(tmp_path, chunk_size=10)
    store.append([sample(0, i) for i in range(3)])
    assert store.discard_buffer() == 3
    assert store.positions() == {} and store.buffered == 0
    store.append([sample(0, i) for i in range(3)])  # re-read after the rewind: accepted
    chunk = store.flush()
    assert chunk is not None and chunk.rows == 3 and store.next_offsets() == {0: 3}
    assert store.flush() is None


def test_rebase_lowers_position(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.append([sample(0, i) for i in range(100, 104)])
    store.rebase(0, 0)  # the topic was recreated: offsets start again at 0
    store.discard_buffer()
    assert store.positions() == {0: 0}
    store.append([sample(0, i) for i in range(4)])
    assert store.next_offsets() == {0: 4} and len(store.chunks()) == 2


def test_new_topic_id_restarts_offsets(tmp_path: Path) -> None:
    store = make(tmp_path)
    assert not store.bind_topic("id-1")  # first binding: nothing to reset
    store.append([sample(0, i) for i in range(6)])
    assert read_manifest(tmp_path).topic_id == "id-1"  # saved with the seal
    assert not store.bind_topic("id-1") and store.buffered == 2
    assert store.bind_topic("id-2")
    assert store.positions() == {} and store.buffered == 0
    store.discard_buffer()  # an error before the next seal must not bring old offsets back
    assert store.positions() == {} and store.next_offsets() == {}
    store.append([sample(0, i) for i in range(4)])  # offsets 0.. of the new topic
    store.close()
    again = make(tmp_path)
    assert again.topic_id == "id-2" and again.next_offsets() == {0: 4}
    assert not again.bind_topic(None)


def test_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkStore(tmp_path, 0, SHAPE, 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        ChunkStore(tmp_path, 4, SHAPE, 0.5)
    with pytest.raises(ValueError, match="input_shape"):
        ChunkStore(tmp_path, 4, (1, 0), 0.1)


def test_wrong_feature_size_does_not_lose_buffer(tmp_path: Path) -> None:
    store = make(tmp_path, chunk_size=2)
    store.append([sample(0, 0)])
    bad = Sample(np.zeros(5, np.float32), 0, 0, 1)
    with pytest.raises(ValueError, match="5 features"):
        store.append([bad])
    assert store.chunks() == [] and store.buffered == 1 and store.positions() == {0: 1}
    assert not list((tmp_path / "chunks").iterdir())
