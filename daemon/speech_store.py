"""Arrow encoding of speech samples: variable-length audio in a list column.

A speech chunk holds one row per utterance: ``audio`` (list<float32>, variable length:
the raw samples, so features can change without re-ingesting), ``sample_rate``,
``transcript`` and the Kafka position, plus the ``split`` (train/val) column of image
chunks. :func:`speech_training_data` turns such tables into the trainer's
`gnp.sequences.SequenceData` (MFCCs computed on read). Not yet wired into
`daemon.store.ChunkStore`, which still writes fixed-size feature lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daemon.speech_messages import SpeechSample

__all__ = ["speech_chunk_schema", "speech_table", "speech_training_data"]

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
