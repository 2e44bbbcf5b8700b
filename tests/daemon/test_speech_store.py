"""Speech chunks: variable-length audio in an Arrow list column, back to training data,
and their MFCC cache."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from daemon.speech_messages import SpeechSample
from daemon.speech_store import speech_chunk_schema, speech_table, speech_training_data


def _samples():
    rng = np.random.default_rng(0)
    return [SpeechSample((0.1 * rng.standard_normal(n)).astype(np.float32), 8000, text, 0, i,
                         f"s{i}", None)
            for i, (n, text) in enumerate([(1600, "one"), (2400, "two"), (4000, "six"), (800, "one")])]


def test_variable_length_audio_survives_an_ipc_roundtrip():
    samples = _samples()
    table = speech_table(samples, np.array([False, False, False, True]))
    sink = io.BytesIO()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    back = ipc.open_file(pa.BufferReader(sink.getvalue())).read_all()
    assert back.schema.equals(speech_chunk_schema(), check_metadata=True)
    audio = back["audio"].to_pylist()
    assert [len(a) for a in audio] == [1600, 2400, 4000, 800]
    np.testing.assert_array_equal(np.array(audio[2], np.float32), samples[2].audio)
    assert back["split"].to_pylist() == ["train", "train", "train", "val"]


def test_training_data_from_speech_chunks():
    table = speech_table(_samples(), np.array([False, False, False, True]))
    train = speech_training_data([table, table])
    assert len(train) == 6
    assert train.lengths.tolist() == [21, 31, 51] * 2  # 10 ms frames of 0.2, 0.3, 0.5 s
    assert train.transcripts() == ["one", "two", "six"] * 2
    assert len(speech_training_data([table], "val")) == 1
    with pytest.raises(ValueError):
        speech_training_data([table.slice(0, 0)])


def test_a_stored_utterance_shorter_than_one_window_is_padded_not_fatal_to_its_chunk():
    """Ingest refuses audio under 129 samples (8 kHz) now; a store written before may hold
    some, and its chunk must still become training data (else every update fails)."""
    samples = _samples()
    short = SpeechSample(samples[0].audio[:100], 8000, "one", 0, 9, "s9", None)
    train = speech_training_data([speech_table(samples[:3] + [short], np.zeros(4, bool))])
    assert len(train) == 4 and train.transcripts()[-1] == "one"
    assert train.lengths.tolist()[-1] == 2  # 129 samples: 2 frames of 10 ms, centred


# ---- the MFCC cache and streamed speech sets (real chunk files in a real store) ----------

def _chunks(path, n=12, chunk=6):
    from tests.daemon.test_speech_daemon import _speech, _store

    store = _store(path, chunk=chunk)
    sealed = store.append(_speech(range(n)))
    store.close()
    return sealed


def _resident(chunk, split):
    from daemon.store import _read_ipc

    return speech_training_data([_read_ipc(chunk.path)], split)


def _mapped(path) -> bool:
    """True while this process has `path` memory-mapped."""
    return str(path) in Path("/proc/self/maps").read_text()


def test_the_mfcc_cache_is_written_once_then_read_memory_mapped(tmp_path):
    from daemon.speech_store import mfcc_cache, mfcc_cache_path

    (chunk,) = _chunks(tmp_path / "store", n=6)
    cache = tmp_path / "store" / "mfcc-cache"
    sets, cached = mfcc_cache(chunk.path, chunk.crc32c, cache)
    path = mfcc_cache_path(cache, chunk.path, chunk.crc32c)
    assert cached and [p.name for p in cache.iterdir()] == [path.name]
    for split in ("train", "val"):
        want = _resident(chunk, split)
        assert torch.equal(sets[split].x[:, :want.x.shape[1]], want.x)
        assert sets[split].transcripts() == want.transcripts()
    assert _mapped(path)  # the features are views of the file, not a private copy
    written = path.stat()
    # Same size, but no Arrow file any more: only a cache that is reused can still answer.
    chunk.path.write_bytes(bytes(chunk.path.stat().st_size))
    again, cached = mfcc_cache(chunk.path, chunk.crc32c, cache)
    assert cached and torch.equal(again["train"].x, sets["train"].x)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (written.st_mtime_ns, written.st_ino)


def test_a_truncated_or_corrupt_mfcc_cache_file_is_computed_again(tmp_path):
    from gnp.audio import FeatureConfig

    from daemon.speech_store import mfcc_cache, mfcc_cache_path

    (chunk,) = _chunks(tmp_path / "store", n=6)
    cache = tmp_path / "cache"
    good = mfcc_cache(chunk.path, chunk.crc32c, cache)[0]["train"].x.clone()
    path = mfcc_cache_path(cache, chunk.path, chunk.crc32c)
    whole = path.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x40  # inside the features: only their CRC-32C tells
    for damaged in (whole[:len(whole) // 2], bytes(flipped), b""):
        path.unlink()  # a new file: shrinking a mapped one in place would be a SIGBUS
        path.write_bytes(damaged)
        sets, cached = mfcc_cache(chunk.path, chunk.crc32c, cache)
        assert cached and path.read_bytes() == whole
        assert torch.equal(sets["train"].x, good)
    # other MFCC settings (or another chunk checksum) are another key; the old file goes
    other = FeatureConfig(n_mfcc=13)
    sets, _ = mfcc_cache(chunk.path, chunk.crc32c, cache, other)
    assert sets["train"].feature_dim == 13 and not path.exists()
    assert mfcc_cache_path(cache, chunk.path, chunk.crc32c, other).exists()
    assert mfcc_cache_path(cache, chunk.path, chunk.crc32c + 1, other) != \
        mfcc_cache_path(cache, chunk.path, chunk.crc32c, other)


def test_speech_sets_over_the_budget_stream_the_resident_sets_values(tmp_path):
    from gnp.sequences import ChunkedSequenceData, SequenceData

    from daemon.speech_store import speech_sets

    chunks = _chunks(tmp_path / "store", n=18)
    cache = tmp_path / "store" / "mfcc-cache"
    resident = speech_sets(chunks[2:], chunks[:2], 10**9, cache)
    streamed = speech_sets(chunks[2:], chunks[:2], 1_000, cache)
    assert all(isinstance(s, SequenceData) for s in resident.values())
    assert all(isinstance(s, ChunkedSequenceData) for s in streamed.values())
    cpu = torch.device("cpu")
    for name in ("new", "all", "val"):
        assert len(streamed[name]) == len(resident[name])
        a, b = streamed[name].gather(slice(None), cpu), resident[name].gather(slice(None), cpu)
        assert torch.equal(a.x, b.x) and torch.equal(a.targets, b.targets)
    assert len(streamed["new"]) == 5 and streamed["all"].nbytes == resident["all"].nbytes
    assert _mapped(next(cache.iterdir()))


def test_speech_sets_sweep_cache_files_no_chunk_of_the_update_reads(tmp_path):
    from daemon.speech_store import mfcc_cache_path, speech_sets

    chunks = _chunks(tmp_path / "store", n=18)
    cache = tmp_path / "store" / "mfcc-cache"
    speech_sets(chunks[1:], chunks[:1], 10**9, cache)
    assert len(list(cache.iterdir())) == 3
    left = mfcc_cache_path(cache, chunks[0].path, chunks[0].crc32c)
    killed = cache / "chunk-999999.abc.arrow.tmp"  # a write killed before its rename
    killed.write_bytes(b"partial")
    kept = cache / "README.txt"  # not ours: never touched
    kept.write_text("hands off")
    # chunks[0] leaves the update (quarantined, moved to orphans): its file goes too.
    speech_sets(chunks[1:], [], 10**9, cache)
    assert not left.exists() and not killed.exists() and kept.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [kept.name] + [mfcc_cache_path(cache, c.path, c.crc32c).name for c in chunks[1:]])


def test_speech_sets_refuse_only_when_they_can_neither_stream_nor_fit(tmp_path):
    from daemon.speech_store import ReplayBudgetError, speech_sets

    chunks = _chunks(tmp_path / "store", n=12)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the cache cannot be made here")
    sets = speech_sets(chunks[1:], chunks[:1], 10**9, blocked / "mfcc-cache")
    assert len(sets["all"]) == 10  # fits: computed in memory, as before the cache
    with pytest.raises(ReplayBudgetError, match="cannot stream.*GNPD_TRAIN__REPLAY_MEMORY_BYTES"):
        speech_sets(chunks[1:], chunks[:1], 1_000, blocked / "mfcc-cache")
