"""Speech chunks: variable-length audio in an Arrow list column, back to training data."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

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
