"""ChunkStore seal: the samples the encoder refuses are named, nothing is half-written.

Issue 8, item 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.messages import Sample
from daemon.store import ChunkStore, UnstorableError


def _sample(offset: int, sample_id: str) -> Sample:
    return Sample(np.full(4, 0.5, np.float32), 1, 0, offset, sample_id, None)


@pytest.mark.parametrize("bad_at", [(0,), (3,), (1, 4), (0, 1, 2, 3, 4)])
def test_seal_names_exactly_the_samples_it_cannot_encode(tmp_path: Path, bad_at) -> None:
    store = ChunkStore(tmp_path, 5, (4,), 0.2)
    samples = [_sample(i, "\ud800" if i in bad_at else f"ok/{i}") for i in range(5)]
    with pytest.raises(UnstorableError) as info:
        store.append(samples)
    assert [(s.offset, why.split(":")[0]) for s, why in info.value.bad] == \
        [(i, "UnicodeEncodeError") for i in bad_at]
    # nothing became durable, the samples are still buffered, no file is left behind
    assert store.chunks() == [] and store.next_offsets() == {} and store.buffered == 5
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == []
    # the manifest (written when the store was created, for its identity) lists no chunk
    assert json.loads((tmp_path / "manifest.json").read_text())["chunks"] == []


def test_a_failure_no_sample_explains_names_none(tmp_path: Path, monkeypatch) -> None:
    store = ChunkStore(tmp_path, 2, (4,), 0.2)
    calls = []

    def fails_for_two(samples):
        calls.append(len(samples))
        if len(samples) > 1:
            raise OverflowError("capacity")
        return ChunkStore._to_table(store, samples)

    monkeypatch.setattr(store, "_to_table", fails_for_two)
    with pytest.raises(UnstorableError) as info:
        store.append([_sample(0, "a"), _sample(1, "b")])
    assert info.value.bad == [] and "OverflowError" in str(info.value)
