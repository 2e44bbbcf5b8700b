"""OffsetWatch with a stand-in consumer: the Kafka answers Tansu cannot give (issue 8, 3 and 11).

Tansu has no retention and no DeleteRecords, and answers a fetch past the log end with
an empty batch rather than OFFSET_OUT_OF_RANGE, so these paths of a real Kafka are
driven here with a consumer that answers as Kafka does. The dip itself is tested
against the real broker in test_ingest.py.
"""

from __future__ import annotations

import logging

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from daemon.messages import Sample
from daemon.metrics import Metrics
from daemon.offsets import OffsetWatch
from daemon.store import ChunkStore

TP = TopicPartition("t", 0)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Kafka:
    """Answers like a Kafka consumer whose partition 0 holds offsets begin..end-1."""

    def __init__(self, begin: int, end: int, high: int | None = None) -> None:
        self.begin, self.end, self.high = begin, end, high
        self.seeks: list[int] = []
        self.paused: set[TopicPartition] = set()
        self.fail = False

    def beginning_offsets(self, tps, timeout_ms=None):
        return {tp: self.begin for tp in tps}

    def end_offsets(self, tps, timeout_ms=None):
        if self.fail:
            raise TimeoutError("broker unreachable")
        return {tp: self.end for tp in tps}

    def highwater(self, tp):
        return self.high

    def seek(self, tp, offset):
        self.seeks.append(offset)

    def pause(self, tp):
        self.paused.add(tp)

    def resume(self, tp):
        self.paused.discard(tp)


@pytest.fixture
def store(tmp_path) -> ChunkStore:
    import numpy as np

    s = ChunkStore(tmp_path, 4, (2,), 0.25)
    s.append([Sample(np.zeros(2, np.float32), 0, 0, o) for o in range(4)])  # sealed: next 4
    return s


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_records_deleted_by_retention_are_skipped_loudly_and_counted(
        store: ChunkStore, caplog: pytest.LogCaptureFixture) -> None:
    metrics, kafka = Metrics(), _Kafka(begin=10, end=20)
    watch = OffsetWatch(store, metrics)
    with caplog.at_level(logging.WARNING, logger="daemon.offsets"):
        assert watch.out_of_range(kafka, {TP: 4}) is False
    assert kafka.seeks == [10] and store.positions() == {0: 10}
    assert _value(metrics, "gnp_ingest_skipped_offsets_total", partition="0") == 6
    assert watch.skipped == 6
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "offsets 4..9 were deleted" in record.message
    assert "6 message(s) skipped" in record.message


def test_a_fetch_past_the_log_end_waits_and_fetches_again(store: ChunkStore) -> None:
    clock, kafka = _Clock(), _Kafka(begin=0, end=2, high=2)
    watch = OffsetWatch(store, Metrics(), recheck_interval=5.0, clock=clock)
    assert watch.out_of_range(kafka, {TP: 4}) is True  # check the topic id now
    assert kafka.paused == {TP} and store.positions() == {0: 4} and kafka.seeks == []
    assert watch.dipped == [0]
    clock.now += 1
    watch.check(kafka, [TP])
    assert kafka.paused == {TP}  # not yet
    clock.now += 5
    kafka.high = 4  # the new leader caught up
    watch.check(kafka, [TP])
    assert kafka.paused == set() and kafka.seeks == [4]  # fetched again at our position
    watch.check(kafka, [TP])
    assert watch.dipped == [] and store.positions() == {0: 4}


def test_a_dip_re_checks_the_topic_id_on_a_schedule(store: ChunkStore) -> None:
    clock, kafka = _Clock(), _Kafka(begin=0, end=2, high=2)
    watch = OffsetWatch(store, Metrics(), recheck_interval=5.0, clock=clock)
    assert watch.check(kafka, [TP]) is True  # dip seen: check at once
    assert watch.check(kafka, [TP]) is False
    clock.now += 5
    assert watch.check(kafka, [TP]) is True
    kafka.high = 7
    assert watch.check(kafka, [TP]) is False and watch.dipped == []
    assert store.positions() == {0: 4}  # never moved


def test_a_truncation_the_broker_confirms_reads_on_from_where_it_says(store, tmp_path) -> None:
    kafka = _Kafka(begin=0, end=2)
    OffsetWatch(store, Metrics()).truncated(kafka, {TP: OffsetAndMetadata(2, "", 3)})
    assert kafka.seeks == [2] and store.positions() == {0: 2}
    # Durable at once: a restart before the next seal resumes at 2, not at the old 4 (a
    # restarted consumer is not told of the truncation again, so it would skip 2..3).
    store.close()
    again = ChunkStore(tmp_path, 4, (2,), 0.25)
    assert again.next_offsets() == {0: 2} and len(again.chunks()) == 1
    again.close()


def test_health_and_lag_during_an_outage(store: ChunkStore) -> None:
    wall, metrics = _Clock(), Metrics()
    kafka = _Kafka(begin=0, end=9)
    watch = OffsetWatch(store, metrics, wall=wall)
    assert _value(metrics, "gnp_ingest_connected") == 0
    assert _value(metrics, "gnp_ingest_last_poll_timestamp_seconds") == 1000.0  # start
    wall.now = 1010.0
    watch.read_ends(kafka, [TP])
    assert _value(metrics, "gnp_ingest_connected") == 1
    assert _value(metrics, "gnp_ingest_last_poll_timestamp_seconds") == 1010.0
    assert _value(metrics, "gnp_ingest_lag_timestamp_seconds") == 1010.0
    assert _value(metrics, "gnp_ingest_lag_messages", partition="0") == 5  # 9 - 4
    wall.now, kafka.fail = 1070.0, True
    watch.read_ends(kafka, [TP])  # the broker is gone
    assert _value(metrics, "gnp_ingest_connected") == 0
    assert _value(metrics, "gnp_ingest_last_poll_timestamp_seconds") == 1010.0  # stale, visibly
    assert _value(metrics, "gnp_ingest_lag_timestamp_seconds") == 1010.0
    assert _value(metrics, "gnp_ingest_lag_messages", partition="0") == 5  # last known ends
    store.rebase(0, 2)  # a recovery rewinds the position: the lag follows
    watch.lost([0])
    assert _value(metrics, "gnp_ingest_lag_messages", partition="0") == 7
