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
`gnp.sequences.SequenceData` (MFCCs computed on read, resident: unlike image chunks,
speech data cannot stream from the memory maps yet; :func:`speech_resident_bytes`
says what it will take before any MFCC is computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daemon.messages import Rejection
from daemon.speech_messages import SpeechSample, parse_speech_message

__all__ = ["ReplayBudgetError", "SpeechChunkCodec", "codec_for", "speech_chunk_schema",
           "speech_resident_bytes", "speech_sets", "speech_table", "speech_training_data"]

SAMPLE_RATE = 8000  # gnp.audio.FeatureConfig's rate: the speech models' MFCCs assume it
MAX_SECONDS = 10.0  # longest utterance stored (FSDD's recordings last under 2.5 s)

SPEECH_CHUNK_SCHEMA_VERSION = 1


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


def speech_training_data(tables: Sequence[pa.Table], split: str = "train"):
    """The `split` rows of speech chunk tables as gnp SequenceData (MFCC features)."""
    import torch

    from gnp.audio import mfcc
    from gnp.sequences import SequenceData
    from gnp.transcripts import encode

    feats, targets = [], []
    for table in tables:
        rows = table.filter(pc.equal(table["split"], split))
        audio = rows["audio"].combine_chunks()
        flat = audio.values.to_numpy(zero_copy_only=False)
        bounds = audio.offsets.to_numpy()
        for i, (rate, text) in enumerate(zip(rows["sample_rate"].to_pylist(),
                                             rows["transcript"].to_pylist())):
            feats.append(mfcc(torch.from_numpy(flat[bounds[i]:bounds[i + 1]].copy()), rate))
            targets.append(encode(text))
    if not feats:
        raise ValueError(f"no {split} rows in the given speech chunks")
    return SequenceData.from_lists(feats, targets)


def speech_resident_bytes(tables: Sequence[pa.Table], split: str = "train") -> int:
    """Bytes `speech_training_data(tables, split)` will hold (padded MFCCs and targets),
    from the audio lengths alone: checked against the replay budget before MFCCs are made."""
    from gnp.audio import FeatureConfig

    cfg = FeatureConfig()
    n, frames, letters = 0, 0, 0
    for table in tables:
        rows = table.filter(pc.equal(table["split"], split))
        if rows.num_rows == 0:
            continue
        n += rows.num_rows
        frames = max(frames, int(pc.max(pc.list_value_length(rows["audio"])).as_py())
                     // cfg.hop_length + 1)
        letters = max(letters, int(pc.max(pc.utf8_length(rows["transcript"])).as_py()))
    return n * (4 * frames * cfg.n_mfcc + 8 * max(letters, 1) + 16)


class ReplayBudgetError(MemoryError):
    """Speech training data would not fit the replay budget (it cannot stream yet)."""


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


def speech_sets(new: Sequence[str | Path], old: Sequence[str | Path], budget: int
                ) -> dict[str, object] | None:
    """New, replay ("all") and validation SequenceData of speech chunk files, resident.

    Speech data cannot stream from the memory-mapped chunks yet (the trainer's
    `SequenceData` is padded tensors), so replay and validation must fit ``budget``
    together (the new set is a view of the replay set's first rows); that is checked from
    the audio lengths before any MFCC is computed. None when the new chunks
    have no training rows or no chunk has validation rows.

    Raises:
        ReplayBudgetError: the sets need more than ``budget`` bytes.
    """
    from daemon.store import _read_ipc

    tables = [_read_ipc(Path(p)) for p in list(new) + list(old)]
    new_rows = _rows(tables[:len(new)], "train")
    if new_rows == 0 or _rows(tables, "val") == 0:
        return None
    need = {split: speech_resident_bytes(tables, split) for split in ("train", "val")}
    if sum(need.values()) > budget:
        raise ReplayBudgetError(
            f"the speech data of this update needs {sum(need.values()):,} bytes resident "
            f"(replay {need['train']:,}, validation {need['val']:,}), over the replay budget "
            f"of {budget:,} bytes; speech data cannot stream from the chunk files yet: raise "
            f"GNPD_TRAIN__REPLAY_MEMORY_BYTES")
    replay = speech_training_data(tables, "train")
    # the new chunks come first, so their training rows lead the replay set: a view, no copy
    return {"val": speech_training_data(tables, "val"), "all": replay,
            "new": replay.subset(slice(0, new_rows))}


def _rows(tables: Sequence[pa.Table], split: str) -> int:
    return sum(int(pc.sum(pc.equal(t["split"], split)).as_py() or 0) for t in tables)
