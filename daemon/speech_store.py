"""Arrow encoding of speech samples: variable-length audio in a list column.

A speech chunk holds one row per utterance: ``audio`` (list<float32>, variable length:
the raw samples, so features can change without re-ingesting), ``sample_rate``,
``transcript`` and the Kafka position, plus the ``split`` (train/val) column of image
chunks, chosen by the same rule (:func:`daemon.store.val_mask`).
:class:`SpeechChunkCodec` is what a `daemon.store.ChunkStore` is given when the model is a
speech model (:func:`codec_for`): it parses speech messages for the ingestor and encodes
the buffered samples into such a table; manifest, checksums, offsets and the dead-letter
path are the store's and the ingestor's, as for images.
:func:`speech_training_data` turns such tables into the trainer's
`gnp.sequences.SequenceData` (MFCCs computed on read, resident).

The training child reads speech through :func:`speech_sets` instead: each chunk's MFCCs
are computed once and cached in ``<store>/mfcc-cache/`` (:func:`mfcc_cache`), one Arrow
IPC file per chunk named by a key of the chunk's checksum and the MFCC settings, written
atomically and read back memory-mapped (zero-copy, held by the page cache, not by the
process). The cache is derived data: a missing, unreadable or corrupt file (its values
carry a CRC-32C) is computed again, a changed chunk or setting is a new key, and the
folder may be deleted at any time; each update deletes the files none of its chunks
reads (chunks that left the store, a killed write's temp file). Sets that fit the replay
budget are made resident as before; larger ones stream from the cache batch by batch
(`gnp.sequences.ChunkedSequenceData`), like image chunks (:mod:`daemon.replay`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from daemon.messages import Rejection
from daemon.speech_messages import SpeechSample, parse_speech_message

if TYPE_CHECKING:  # torch and gnp are imported by the functions that train, not by ingest
    from gnp.audio import FeatureConfig

__all__ = ["MFCC_CACHE", "ReplayBudgetError", "SpeechChunkCodec", "codec_for", "mfcc_cache",
           "mfcc_cache_path", "speech_chunk_schema", "speech_sets", "speech_table",
           "speech_training_data"]

SAMPLE_RATE = 8000  # gnp.audio.FeatureConfig's rate: the speech models' MFCCs assume it
MAX_SECONDS = 10.0  # longest utterance stored (FSDD's recordings last under 2.5 s)

SPEECH_CHUNK_SCHEMA_VERSION = 1

log = logging.getLogger(__name__)


def speech_chunk_schema() -> pa.Schema:
    return pa.schema([
        pa.field("audio", pa.large_list(pa.float32()), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("transcript", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("timestamp", pa.float64()),
        pa.field("split", pa.string(), nullable=False),
    ], metadata={"gnpd.speech_chunk_schema_version": str(SPEECH_CHUNK_SCHEMA_VERSION)})


def speech_table(samples: Sequence[SpeechSample], val: np.ndarray) -> pa.Table:
    """One chunk's rows; `val[i]` marks sample i as validation."""
    lengths = np.array([len(s.audio) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([s.audio for s in samples]).astype(np.float32) if samples else np.zeros(0, np.float32)
    audio = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat, pa.float32()))
    return pa.Table.from_arrays([
        audio,
        pa.array([s.sample_rate for s in samples], pa.int32()),
        pa.array([s.transcript for s in samples], pa.string()),
        pa.array([s.partition for s in samples], pa.int32()),
        pa.array([s.offset for s in samples], pa.int64()),
        pa.array([s.id for s in samples], pa.string()),
        pa.array([None if s.timestamp is None else float(s.timestamp) for s in samples], pa.float64()),
        pa.array(["val" if v else "train" for v in val], pa.string()),
    ], schema=speech_chunk_schema())


def _features(rows: pa.Table, cfg: FeatureConfig) -> tuple[list, list[list[int]]]:
    """Per-utterance MFCCs (T_i, n_mfcc) and encoded transcripts of speech chunk rows.

    An utterance shorter than one analysis window (`FeatureConfig.min_samples`; ingest
    refuses those, but a store written before it did may hold one) is padded with
    silence to that length, so that its chunk stays usable."""
    import numpy as np
    import torch

    from gnp.audio import mfcc
    from gnp.transcripts import encode

    audio = rows["audio"].combine_chunks()
    flat = audio.values.to_numpy(zero_copy_only=False)
    bounds = audio.offsets.to_numpy()
    feats, targets = [], []
    for i, (rate, text) in enumerate(zip(rows["sample_rate"].to_pylist(),
                                         rows["transcript"].to_pylist())):
        clip = flat[bounds[i]:bounds[i + 1]]
        short = cfg.min_samples - len(clip)
        clip = np.pad(clip, (0, short)) if short > 0 else clip.copy()
        feats.append(mfcc(torch.from_numpy(clip), rate, cfg))
        targets.append(encode(text))
    return feats, targets


def speech_training_data(tables: Sequence[pa.Table], split: str = "train"):
    """The `split` rows of speech chunk tables as gnp SequenceData (MFCC features, resident)."""
    from gnp.audio import FeatureConfig
    from gnp.sequences import SequenceData

    feats, targets = [], []
    for table in tables:
        f, t = _features(table.filter(pc.equal(table["split"], split)), FeatureConfig())
        feats += f
        targets += t
    if not feats:
        raise ValueError(f"no {split} rows in the given speech chunks")
    return SequenceData.from_lists(feats, targets)


class ReplayBudgetError(MemoryError):
    """Speech training data can neither be resident within the replay budget nor stream
    (its MFCC cache cannot be written)."""


class SpeechChunkCodec:
    """How a ChunkStore keeps speech samples: parse a message, encode a buffer to a table.

    Args:
        sample_rate: the only rate accepted (other rates are dead-lettered ``bad_rate``).
        max_seconds: longer audio is dead-lettered ``bad_audio``.
    """

    kind = "speech"

    def __init__(self, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> None:
        if sample_rate <= 0 or max_seconds <= 0:
            raise ValueError(f"sample_rate and max_seconds must be > 0, got {sample_rate}, "
                             f"{max_seconds}")
        self.sample_rate, self.max_seconds = int(sample_rate), float(max_seconds)

    def schema(self) -> pa.Schema:
        return speech_chunk_schema()

    def check(self, item: object) -> None:
        """Raise ValueError unless ``item`` is a speech sample (the store takes no others)."""
        if not isinstance(item, SpeechSample):
            raise ValueError(f"a speech store takes speech samples, got {type(item).__name__} "
                             f"at partition {getattr(item, 'partition', '?')} offset "
                             f"{getattr(item, 'offset', '?')}")

    def parse(self, raw: bytes | None, partition: int, offset: int,
              max_bytes: int) -> SpeechSample | Rejection:
        return parse_speech_message(raw, partition, offset, self.sample_rate, self.max_seconds,
                                    max_bytes)

    def encode(self, samples: Sequence[SpeechSample], val_fraction: float) -> pa.Table:
        """One chunk's table; validation rows chosen as for image chunks (`val_mask`)."""
        from daemon.store import val_mask

        parts = np.fromiter((s.partition for s in samples), np.int32, len(samples))
        offsets = np.fromiter((s.offset for s in samples), np.int64, len(samples))
        return speech_table(samples, val_mask(parts, offsets, val_fraction))


def codec_for(model_name: str) -> SpeechChunkCodec | None:
    """The chunk codec a model needs: speech models a SpeechChunkCodec, others None
    (the store's own fixed-size feature chunks)."""
    from gnp.models import SPEECH_MODELS

    return SpeechChunkCodec() if model_name in SPEECH_MODELS else None


# ---- MFCC cache ---------------------------------------------------------------------------

MFCC_CACHE = "mfcc-cache"  # the cache's folder in the store directory
MFCC_CACHE_FORMAT = 1
_META = "gnpd.mfcc."


def mfcc_cache_path(cache_dir: Path, chunk: Path, checksum: int,
                    cfg: FeatureConfig | None = None) -> Path:
    """Where the MFCCs of ``chunk`` (its CRC-32C ``checksum``) made with ``cfg`` are cached:
    ``<cache_dir>/<chunk stem>.<key>.arrow``, the key a hash of the chunk's name, size and
    checksum, the MFCC settings, the alphabet and the cache format, so a change of any of
    them is a new file."""
    from gnp.audio import FeatureConfig
    from gnp.transcripts import ALPHABET

    what = {"chunk": chunk.name, "bytes": chunk.stat().st_size, "crc32c": int(checksum),
            "mfcc": dataclasses.asdict(cfg or FeatureConfig()), "alphabet": ALPHABET,
            "format": MFCC_CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{chunk.stem}.{key}.arrow"


def _mfcc_table(chunk: pa.Table, cfg: FeatureConfig) -> pa.Table:
    """A chunk's MFCCs as one record batch: training rows first, then validation rows,
    each padded to the chunk's longest; shapes and a CRC-32C of the values in the metadata."""
    import torch

    from gnp.sequences import pad_sequences

    is_val = pc.equal(chunk["split"], "val")
    rows = pa.concat_tables([chunk.filter(pc.invert(is_val)), chunk.filter(is_val)])
    feats, targets = _features(rows, cfg)
    x, lengths = pad_sequences(feats)  # (N, T, F), (N,)
    t, t_len = pad_sequences([torch.tensor(s, dtype=torch.int64) for s in targets], 0)
    arrays = [x.numpy(), lengths.numpy(), t.numpy(), t_len.numpy()]
    n, frames, width = x.shape
    meta = {"format": MFCC_CACHE_FORMAT, "train_rows": rows.num_rows - int(pc.sum(is_val).as_py()),
            "frames": frames, "features": width, "crc32c": _crc(arrays)}
    return pa.Table.from_arrays([
        pa.FixedSizeListArray.from_arrays(pa.array(arrays[0].ravel()), frames * width),
        pa.array(arrays[1]),
        pa.FixedSizeListArray.from_arrays(pa.array(arrays[2].ravel()), t.shape[1]),
        pa.array(arrays[3])], names=["x", "lengths", "targets", "target_lengths"]
    ).replace_schema_metadata({_META + k: str(v) for k, v in meta.items()})


def _crc(arrays: Sequence[np.ndarray]) -> int:
    value = 0
    for a in arrays:
        value = crc32c.crc32c(np.ascontiguousarray(a).data.cast("B"), value)
    return value


def _read_mfcc_cache(path: Path) -> dict[str, object]:
    """The cached training and validation SequenceData of a chunk, views of the memory map.

    Raises:
        OSError, pyarrow.ArrowException: missing or unreadable (e.g. truncated) file.
        ValueError: another format, or values that fail their CRC-32C (a corrupt file).
    """
    return _mfcc_sets(ipc.open_file(pa.memory_map(str(path), "r")).read_all(), path.name)


def _mfcc_sets(table: pa.Table, name: str) -> dict[str, object]:
    """{"train", "val"}: SequenceData viewing the buffers of an `_mfcc_table` (no copy)."""
    import torch

    from gnp.sequences import SequenceData

    meta = {k.decode()[len(_META):]: int(v) for k, v in (table.schema.metadata or {}).items()
            if k.decode().startswith(_META)}
    batches = table.to_batches()
    if meta.get("format") != MFCC_CACHE_FORMAT or len(batches) != 1:
        raise ValueError(f"{name} is no MFCC cache of format {MFCC_CACHE_FORMAT}")
    batch = batches[0]
    n = batch.num_rows
    arrays = [batch.column("x").flatten().to_numpy(zero_copy_only=True)
              .reshape(n, meta["frames"], meta["features"]),
              batch.column("lengths").to_numpy(zero_copy_only=True),
              batch.column("targets").flatten().to_numpy(zero_copy_only=True).reshape(n, -1),
              batch.column("target_lengths").to_numpy(zero_copy_only=True)]
    if _crc(arrays) != meta.get("crc32c"):
        raise ValueError(f"{name}: its values fail their CRC-32C")
    with warnings.catch_warnings():  # read-only map: torch warns; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        data = SequenceData(*(torch.from_numpy(a) for a in arrays))
    cut = meta["train_rows"]
    return {"train": data.subset(slice(0, cut)), "val": data.subset(slice(cut, None))}


def mfcc_cache(chunk: Path, checksum: int, cache_dir: Path,
               cfg: FeatureConfig | None = None) -> tuple[dict[str, object], bool]:
    """The training and validation MFCCs of a speech chunk file, read memory-mapped from
    its cache file, which is computed and written (temp file, fsync, rename) when missing,
    unreadable or corrupt. Returns ({"train", "val"}: SequenceData, cached); ``cached``
    False: the cache could not be written (OSError, logged) and the data is in memory."""
    from gnp.audio import FeatureConfig
    from daemon.manifest import write_atomic
    from daemon.store import _read_ipc

    cfg = cfg or FeatureConfig()
    path = mfcc_cache_path(cache_dir, chunk, checksum, cfg)
    try:
        return _read_mfcc_cache(path), True
    except FileNotFoundError:
        pass
    except (OSError, pa.ArrowException, ValueError, KeyError) as e:
        log.warning("MFCC cache %s unusable, computed again: %s: %s", path, type(e).__name__, e)
    table = _mfcc_table(_read_ipc(chunk), cfg)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(sink.getvalue()))
        for stale in path.parent.glob(f"{chunk.stem}.*.arrow"):  # older settings or chunk
            if stale != path:
                stale.unlink(missing_ok=True)
        return _read_mfcc_cache(path), True
    except OSError as e:
        log.warning("MFCC cache %s not written (%s): this chunk's MFCCs stay in memory", path, e)
        return _mfcc_sets(table, path.name), False


def _chunk_ref(chunk) -> tuple[Path, int]:
    """(path, CRC-32C) of a `daemon.manifest.ChunkInfo` or a bare path (checksummed here)."""
    from daemon.manifest import file_crc32c

    path = Path(getattr(chunk, "path", chunk))
    crc = getattr(chunk, "crc32c", None)
    return path, file_crc32c(path) if crc is None else int(crc)


def _sweep_cache(cache_dir: Path, keep: set[str]) -> None:
    """Delete the cache files not named in ``keep`` (those this update's chunks read):
    chunks that left the store (moved to orphans, quarantined, a crash's leftover) and
    temp files of a killed write. The cache is derived data (recomputed from a chunk when
    missing), and an update reads every chunk the model learns from, so whatever it does
    not read is dead weight."""
    from daemon.manifest import TMP_SUFFIX

    try:
        entries = list(Path(cache_dir).iterdir())
    except OSError:
        return  # no cache folder (it could not be made): nothing to sweep
    for entry in entries:
        if entry.name not in keep and entry.name.endswith((".arrow", ".arrow" + TMP_SUFFIX)):
            log.info("MFCC cache: removing %s (no chunk of this update reads it)", entry.name)
            entry.unlink(missing_ok=True)


def speech_sets(new: Sequence, old: Sequence, budget: int, cache_dir: Path,
                cfg: FeatureConfig | None = None) -> dict[str, object] | None:
    """New, replay ("all") and validation sets of speech chunks, as MFCCs.

    ``new`` and ``old`` are chunks (`daemon.manifest.ChunkInfo`, or paths), the new ones
    first. Each chunk's MFCCs come from its file in ``cache_dir`` (:func:`mfcc_cache`:
    computed once, then read memory-mapped). When replay and validation fit ``budget``
    together they are made resident `SequenceData` (the new set a view of the replay
    set's first rows); otherwise every set is a `gnp.sequences.ChunkedSequenceData` over
    the memory maps, which gnp makes resident while it fits and streams batch by batch
    beyond. None when the new chunks have no training rows or no chunk has validation rows.

    Raises:
        ReplayBudgetError: the sets are over ``budget`` and cannot stream, because the
            cache could not be written and the chunks held in memory instead exceed it.
    """
    from gnp.sequences import ChunkedSequenceData

    train, val, in_memory, names = [], [], 0, set()
    for chunk in list(new) + list(old):
        path, crc = _chunk_ref(chunk)
        names.add(mfcc_cache_path(cache_dir, path, crc, cfg).name)
        sets, cached = mfcc_cache(path, crc, cache_dir, cfg)
        train.append(sets["train"])
        val.append(sets["val"])
        in_memory += 0 if cached else sets["train"].nbytes + sets["val"].nbytes
        if in_memory > budget:
            raise ReplayBudgetError(
                f"speech MFCCs of this update cannot stream: the cache in {cache_dir} could "
                f"not be written (see the log), and the {in_memory:,} bytes held in memory "
                f"instead exceed the replay budget of {budget:,} bytes; make the folder "
                f"writable (and give it disk space) or raise GNPD_TRAIN__REPLAY_MEMORY_BYTES")
    _sweep_cache(cache_dir, names)
    new_rows = sum(len(t) for t in train[:len(new)])
    if new_rows == 0 or not any(len(v) for v in val):
        return None
    replay, valid = ChunkedSequenceData(train), ChunkedSequenceData(val)
    need = replay.nbytes + valid.nbytes
    if need <= budget:
        resident = replay.to("cpu")
        return {"val": valid.to("cpu"), "all": resident,
                "new": resident.subset(slice(0, new_rows))}
    log.info("speech data of this update needs %d bytes resident (replay %d, validation %d), "
             "over the replay budget of %d: streaming from the memory-mapped MFCC cache %s",
             need, replay.nbytes, valid.nbytes, budget, cache_dir)
    return {"val": valid, "all": replay, "new": replay.subset(slice(0, new_rows))}
