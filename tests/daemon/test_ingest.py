"""Ingestor against a real broker: storing, dead letters, commits, restarts, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.broker import EmbeddedBroker
from daemon.ingest import Ingestor
from daemon.metrics import JSON_REJECT_REASONS, Metrics
from daemon.settings import KafkaSettings
from daemon.store import ChunkInfo, ChunkStore

pytestmark = pytest.mark.integration

SHAPE = (4,)
CLASSES = 3
CHUNK = 5
REPO = Path(__file__).resolve().parents[2]

BAD = {  # reason -> a message that must be rejected for it
    "invalid_json": b'{"features": [0.1, 0.2',
    "not_object": b"[0.1, 0.2, 0.3, 0.4]",
    "missing_field": b'{"id": "bad/missing", "features": [0.1, 0.2, 0.3, 0.4]}',
    "bad_shape": b'{"id": "bad/shape", "features": [0.1, 0.2, 0.3], "label": 1}',
    "non_finite": b'{"id": "bad/nan", "features": [0.1, NaN, 0.3, 0.4], "label": 1}',
    "bad_label": b'{"id": "bad/label", "features": [0.1, 0.2, 0.3, 0.4], "label": 3}',
    "too_large": b'{"id": "bad/large", "features": [0.1, 0.2, 0.3, 0.4], "label": 1, "pad": "'
                 + b"x" * 3000 + b'"}',
    "bad_type": b'{"id": "bad/type", "features": [0.1, 0.2, 0.3, 0.4], "label": true}',
    "unstorable": b'{"id": "\\udfff", "features": [0.1, 0.2, 0.3, 0.4], "label": 1}',
}


def good(i: int) -> bytes:
    return json.dumps({"id": f"good/{i}", "features": [i, 0.5, 0.25, 1.0],
                       "label": i % CLASSES, "timestamp": 1718000000 + i}).encode()


def send(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        for partition, value in values:
            producer.send(topic, value, partition=partition)
        producer.flush()
    finally:
        producer.close()


def settings(bootstrap: str, topic: str, **kw) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id=f"g-{topic}",
                         poll_timeout_ms=100, max_message_bytes=2000, **kw)


def ingestor(kafka: KafkaSettings, store: ChunkStore, **kw) -> Ingestor:
    return Ingestor(kafka, store, input_shape=SHAPE, num_classes=CLASSES, lag_interval=0.0, **kw)


def drain(ing: Ingestor, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; stats {ing.stats}"
        ing.poll_once(100)


def stored_ids(store: ChunkStore) -> list[str]:
    return store.read_table()["id"].to_pylist()


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 20.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def test_good_stored_bad_dead_lettered(kafka_bootstrap: str, make_topic, tmp_path: Path) -> None:
    topic = make_topic(partitions=2)
    values, good_ids = [], []
    bad = list(BAD.items())
    for i in range(20):  # 20 good (4 chunks) with the 9 bad kinds interleaved on both partitions
        values.append((i % 2, good(i)))
        good_ids.append(f"good/{i}")
        if i < len(bad):
            values.append(((i + 1) % 2, bad[i][1]))
    send(kafka_bootstrap, topic, values)

    metrics = Metrics()
    sealed: list[ChunkInfo] = []
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    kafka = settings(kafka_bootstrap, topic)
    ing = ingestor(kafka, store, metrics=metrics, on_sealed=sealed.extend)
    try:
        drain(ing, lambda: ing.stats.consumed == len(values))
    finally:
        ing.stop()

    assert sorted(stored_ids(store)) == sorted(good_ids)
    assert [c.id for c in sealed] == [1, 2, 3, 4] and store.buffered == 0
    assert ing.stats.stored == 20 and ing.stats.rejected == len(BAD)
    assert store.next_offsets() == {0: 14, 1: 15}  # every consumed record, bad ones included

    dead = read_all(kafka_bootstrap, kafka.effective_dlq_topic, len(BAD))
    by_reason = {dict(r.headers)["reason"].decode(): r for r in dead}
    assert set(by_reason) == set(JSON_REJECT_REASONS) and len(dead) == len(BAD)
    for reason, record in by_reason.items():
        headers = dict(record.headers)
        assert headers["detail"] and headers["source_topic"] == topic.encode()
        src = (int(headers["source_partition"]), int(headers["source_offset"]))
        assert src in {(p, o) for p in (0, 1) for o in range(15)}
        if reason == "too_large":
            assert record.value == BAD[reason][:2000] and int(headers["truncated"]) > 2000
        else:
            assert record.value == BAD[reason]

    value = metrics.registry.get_sample_value
    assert value("gnp_ingest_samples_total") == 20
    for reason in JSON_REJECT_REASONS:
        assert value("gnp_ingest_rejected_total", {"reason": reason}) == 1
    assert value("gnp_store_chunks") == 4
    for p in ("0", "1"):
        assert value("gnp_ingest_lag_messages", {"partition": p}) == 0
    assert committed(kafka_bootstrap, kafka.group_id, topic, 2) == {0: 14, 1: 15}


def test_commit_only_after_seal_and_restart_resumes(kafka_bootstrap: str, make_topic,
                                                    tmp_path: Path) -> None:
    topic = make_topic(partitions=2)
    kafka = settings(kafka_bootstrap, topic)
    send(kafka_bootstrap, topic, [(i % 2, good(i)) for i in range(CHUNK - 1)])
    ing = ingestor(kafka, ChunkStore(tmp_path, CHUNK, SHAPE, 0.2))
    drain(ing, lambda: ing.stats.consumed == CHUNK - 1)
    assert committed(kafka_bootstrap, kafka.group_id, topic, 2) == {0: None, 1: None}
    send(kafka_bootstrap, topic, [(0, good(CHUNK - 1)), (1, BAD["bad_label"])])
    drain(ing, lambda: ing.stats.consumed == CHUNK + 1)
    ing.stop()
    # the rejected record at (1, 2) came after the seal: not covered by it
    assert committed(kafka_bootstrap, kafka.group_id, topic, 2) == {0: 3, 1: 2}

    # Restart on the same directory: resumes after the seal, re-reads the rejected
    # record (dead-lettered again: at least once), never stores a sample twice.
    send(kafka_bootstrap, topic, [(i % 2, good(i)) for i in range(CHUNK, 3 * CHUNK)])
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    ing2 = ingestor(kafka, store)
    drain(ing2, lambda: len(store.chunks()) == 3)
    ing2.stop()
    assert ing2.stats.consumed == 2 * CHUNK + 1 and ing2.stats.rejected == 1
    ids = stored_ids(store)
    assert sorted(ids) == sorted(f"good/{i}" for i in range(3 * CHUNK))
    assert committed(kafka_bootstrap, kafka.group_id, topic, 2) == store.next_offsets()


def test_same_store_new_ingestor_does_not_duplicate_buffer(kafka_bootstrap: str, make_topic,
                                                           tmp_path: Path) -> None:
    topic = make_topic(partitions=1)
    kafka = settings(kafka_bootstrap, topic)
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(3)])
    first = ingestor(kafka, store)
    drain(first, lambda: store.buffered == 3)
    first.stop()
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(3, 5)])
    second = ingestor(kafka, store)  # same in-memory buffer: seeks past it
    drain(second, lambda: len(store.chunks()) == 1)
    second.stop()
    assert sorted(stored_ids(store)) == [f"good/{i}" for i in range(5)]
    assert second.stats.consumed == 2


class _FailedSend:
    exception = RuntimeError("dead-letter topic unavailable")

    def failed(self) -> bool:
        return True


class _BrokenDeadLetterProducer:
    """Stands in for KafkaProducer: every dead-letter send fails."""

    def __init__(self, **config) -> None:
        pass

    def send(self, topic: str, value: bytes, headers=None) -> _FailedSend:
        return _FailedSend()

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


def test_failed_dead_letter_blocks_the_seal(kafka_bootstrap: str, make_topic, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    topic = make_topic(partitions=1)
    send(kafka_bootstrap, topic, [(0, BAD["bad_label"])] + [(0, good(i)) for i in range(CHUNK)])
    kafka = settings(kafka_bootstrap, topic)
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    with monkeypatch.context() as patch:
        patch.setattr("daemon.kafka_clients.KafkaProducer", _BrokenDeadLetterProducer)
        broken = ingestor(kafka, store, max_backoff=0.1)
        broken.start()
        _wait(lambda: broken.stats.errors >= 2, "retries")
        assert broken.stop()
    assert store.chunks() == [] and store.next_offsets() == {}  # nothing sealed past it
    fixed = ingestor(kafka, store)
    drain(fixed, lambda: len(store.chunks()) == 1)
    fixed.stop()
    dead = read_all(kafka_bootstrap, kafka.effective_dlq_topic, 1)
    assert [dict(r.headers)["reason"] for r in dead] == [b"bad_label"]
    assert store.next_offsets() == {0: CHUNK + 1}


def test_thread_start_stop_and_new_topic(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    kafka = settings(kafka_bootstrap, topic, topic_partitions=2)  # topic does not exist yet
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    done = threading.Event()
    ing = ingestor(kafka, store, on_sealed=lambda chunks: done.set())
    ing.start()
    try:
        deadline = time.monotonic() + 20
        while ing.partitions != [0, 1]:
            assert time.monotonic() < deadline, "topic was not created"
            time.sleep(0.05)
        send(kafka_bootstrap, topic, [(i % 2, good(i)) for i in range(CHUNK)])
        assert done.wait(20), f"no seal; stats {ing.stats}"
    finally:
        t0 = time.monotonic()
        assert ing.stop(timeout=10)
        assert time.monotonic() - t0 < 5
    assert len(stored_ids(store)) == CHUNK


def test_recreated_topic_is_read_from_the_start(tmp_path: Path) -> None:
    """A fresh embedded broker (memory storage) restarts offsets at 0: rebase, don't stall."""
    store_dir = tmp_path / "store"
    for round_ in range(2):
        with EmbeddedBroker() as broker:
            kafka = settings(broker.bootstrap_servers, "samples")
            store = ChunkStore(store_dir, CHUNK, SHAPE, 0.2)
            send(broker.bootstrap_servers, "samples",
                 [(0, good(round_ * 100 + i)) for i in range(CHUNK)])
            ing = ingestor(kafka, store)
            drain(ing, lambda s=store, n=round_ + 1: len(s.chunks()) == n)
            ing.stop()
    assert len(stored_ids(ChunkStore(store_dir, CHUNK, SHAPE, 0.2))) == 2 * CHUNK


def test_broker_outage_is_survived(tmp_path: Path) -> None:
    """The broker dies and comes back empty (memory storage) at the same address."""
    broker = EmbeddedBroker().start()
    port = broker.port
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    ing = ingestor(settings(broker.bootstrap_servers, "samples"), store, max_backoff=1.0,
                   partition_check_interval=0.5)
    ing.start()
    try:
        send(broker.bootstrap_servers, "samples", [(0, good(i)) for i in range(CHUNK + 2)])
        _wait(lambda: len(store.chunks()) == 1 and store.buffered == 2, "first chunk")
        broker.stop()
        time.sleep(1.0)
        broker = EmbeddedBroker(port=port).start()
        send(broker.bootstrap_servers, "samples",
             [(0, good(i)) for i in range(100, 100 + CHUNK + 2)])
        _wait(lambda: len(store.chunks()) == 2, "a chunk after the outage")
    finally:
        assert ing.stop(timeout=15)
        broker.stop()
    ids = stored_ids(store)
    assert ids[:CHUNK] == [f"good/{i}" for i in range(CHUNK)]
    # The 2 samples buffered before the outage are kept (or, if the ingestor had to
    # recover, dropped -- the broker lost them); new ones are read from offset 0.
    after = ids[CHUNK:]
    assert len(set(after)) == CHUNK and after[-3:] == ["good/100", "good/101", "good/102"] or \
        after == [f"good/{i}" for i in range(100, 100 + CHUNK)], after


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


WORKER = textwrap.dedent("""
    import logging, sys
    from daemon.ingest import Ingestor
    from daemon.settings import KafkaSettings
    from daemon.store import ChunkStore
    logging.basicConfig(level=logging.WARNING)
    bootstrap, topic, path, chunk = sys.argv[1:5]
    store = ChunkStore(path, int(chunk), (4,), 0.2)  # as the daemon's default
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id="crash",
                          poll_timeout_ms=50, max_message_bytes=2000)
    Ingestor(kafka, store, input_shape=(4,), num_classes=3).run()
""")


def test_crash_safety_sigkill(kafka_bootstrap: str, make_topic, tmp_path: Path) -> None:
    """SIGKILL the ingestor at random moments while producing; every id is stored once.

    The total of good messages is a multiple of the chunk size, so at the end
    everything is sealed without a partial flush. Set GNPD_TEST_SEED to replay a run.
    """
    seed = int(os.environ.get("GNPD_TEST_SEED", time.time()))
    rng = random.Random(seed)
    chunk, total = 7, 7 * 60
    topic = make_topic(partitions=2)
    values = []
    for i in range(total):
        values.append((i % 2, good(i)))
        if i % 37 == 0:
            values.append((rng.randrange(2), BAD["bad_label"]))
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-c", WORKER, kafka_bootstrap, topic, str(store_dir), str(chunk)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "worker.log", "wb") as log:
        def start() -> subprocess.Popen:
            return subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)

        done = threading.Event()
        threading.Thread(target=_produce_slowly, args=(kafka_bootstrap, topic, values, done),
                         daemon=True).start()
        rows_at_kill = _kill_repeatedly(start, rng, done, store_dir)
        # the kills hit a store in progress, not only an empty or a finished one
        assert len({r for r in rows_at_kill if 0 < r < total}) >= 2, (rows_at_kill, seed)
        proc = start()
        try:
            _wait(lambda: _manifest_rows(store_dir) == total, f"all rows (seed {seed})", 60)
        finally:
            proc.terminate()
            proc.wait(10)
    ids = stored_ids(ChunkStore(store_dir, chunk, SHAPE, 0.2))
    assert len(ids) == total == len(set(ids)), f"duplicates (seed {seed})"
    assert set(ids) == {f"good/{i}" for i in range(total)}
    n_bad = sum(1 for _, v in values if v == BAD["bad_label"])
    dead = [dict(r.headers) for r in read_all(kafka_bootstrap, f"{topic}.dlq", n_bad)]
    # each rejected message is dead-lettered at least once (again after some crashes)
    assert {(int(h["source_partition"]), int(h["source_offset"])) for h in dead} == \
        _bad_coordinates(kafka_bootstrap, topic, len(values)), f"seed {seed}"


def _produce_slowly(bootstrap: str, topic: str, values: list[tuple[int, bytes]],
                    done: threading.Event) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    for n, (partition, value) in enumerate(values):
        producer.send(topic, value, partition=partition)
        if n % 5 == 0:  # ~430 messages over ~8 s: the kills land mid-stream
            producer.flush()
            time.sleep(0.1)
    producer.flush()
    producer.close()
    done.set()


def _kill_repeatedly(start: Callable[[], subprocess.Popen], rng: random.Random,
                     done: threading.Event, store_dir: Path) -> list[int]:
    """Start and SIGKILL the worker until production ends (6 times at least).

    The kill points are drawn around the worker's start-up time (its first seal), measured
    on the first run: about 1 s on an idle machine but several on a loaded one, where fixed
    delays killed every worker before it sealed anything.
    """
    proc, t0 = start(), time.monotonic()
    deadline = t0 + 30
    while _manifest_rows(store_dir) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    startup = time.monotonic() - t0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = [_manifest_rows(store_dir)]
    while len(rows_at_kill) < 6 or not done.is_set():
        proc = start()
        time.sleep(rng.uniform(0.8 * startup, startup + 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows_at_kill.append(_manifest_rows(store_dir))
    return rows_at_kill


def _manifest_rows(store_dir: Path) -> int:
    try:
        doc = json.loads((store_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(c["rows"] for c in doc["chunks"])


def _bad_coordinates(bootstrap: str, topic: str, total: int) -> set[tuple[int, int]]:
    records = read_all(bootstrap, topic, total)
    assert len(records) == total
    return {(r.partition, r.offset) for r in records if r.value == BAD["bad_label"]}


# ---- issue 8, item 1: a value that cannot be stored ------------------------------------------

SURROGATE = b'{"id": "\\ud800", "features": [0.1, 0.2, 0.3, 0.4], "label": 1}'  # valid JSON


def _dead_letters(bootstrap: str, kafka: KafkaSettings, n: int) -> list:
    return read_all(bootstrap, kafka.effective_dlq_topic, n)


def test_lone_surrogate_id_is_dead_lettered_and_ingestion_goes_on(
        kafka_bootstrap: str, make_topic, tmp_path: Path) -> None:
    """Before: the id passed validation, every seal failed to encode it, forever."""
    topic = make_topic(partitions=1)
    send(kafka_bootstrap, topic,
         [(0, good(0)), (0, SURROGATE)] + [(0, good(i)) for i in range(1, 2 * CHUNK)])
    metrics = Metrics()
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    kafka = settings(kafka_bootstrap, topic)
    ing = ingestor(kafka, store, metrics=metrics)
    try:
        drain(ing, lambda: len(store.chunks()) == 2, timeout=20)
    finally:
        ing.stop()
    assert stored_ids(store) == [f"good/{i}" for i in range(2 * CHUNK)]
    assert store.next_offsets() == {0: 2 * CHUNK + 1}
    (dead,) = _dead_letters(kafka_bootstrap, kafka, 1)
    headers = dict(dead.headers)
    assert dead.value == SURROGATE and headers["reason"] == b"unstorable"
    assert b"surrogate" in headers["detail"] and headers["source_offset"] == b"1"
    assert metrics.registry.get_sample_value("gnp_ingest_rejected_total",
                                             {"reason": "unstorable"}) == 1


def test_a_seal_that_fails_dead_letters_the_record_and_goes_on(
        kafka_bootstrap: str, make_topic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net behind validation: a sample the store cannot encode is found by
    bisecting the chunk, dead-lettered with its original bytes, and ingestion goes on."""
    import daemon.messages

    monkeypatch.setattr(daemon.messages, "_check_id", lambda value: value)  # a validation gap
    topic = make_topic(partitions=2)
    values = [(i % 2, good(i)) for i in range(3 * CHUNK)]
    values.insert(7, (1, SURROGATE))
    values.insert(2, (0, SURROGATE))
    send(kafka_bootstrap, topic, values)
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    kafka = settings(kafka_bootstrap, topic)
    metrics = Metrics()
    ing = ingestor(kafka, store, metrics=metrics)
    try:
        drain(ing, lambda: len(store.chunks()) == 3, timeout=30)
    finally:
        ing.stop()
    assert sorted(stored_ids(store)) == sorted(f"good/{i}" for i in range(3 * CHUNK))
    dead = _dead_letters(kafka_bootstrap, kafka, 2)
    assert sorted((int(dict(r.headers)["source_partition"]), r.value) for r in dead) == \
        [(0, SURROGATE), (1, SURROGATE)]
    for record in dead:
        headers = dict(record.headers)
        assert headers["reason"] == b"unstorable"
        assert headers["detail"].startswith(b"the store cannot encode it: UnicodeEncodeError")
    assert ing.stats.errors == 0  # handled in place: no reconnect, no backoff
    assert metrics.registry.get_sample_value("gnp_ingest_rejected_total",
                                             {"reason": "unstorable"}) == 2


# ---- issue 8, item 9: dead-letter sends that cannot succeed ------------------------------------

_DLQ_LIMIT = 100_000  # the dead-letter topic's max.message.bytes in the test below


class _Refused:
    """A send future the broker answered MESSAGE_SIZE_TOO_LARGE."""

    def __init__(self, size: int) -> None:
        from kafka.errors import MessageSizeTooLargeError

        self.exception = MessageSizeTooLargeError(f"{size} bytes")

    def failed(self) -> bool:
        return True


class _SmallDeadLetterTopic(KafkaProducer):
    """The real producer, whose dead-letter topic refuses records over _DLQ_LIMIT bytes as a
    Kafka broker does for a topic with a smaller max.message.bytes (Tansu enforces none)."""

    def send(self, topic, value=None, headers=None, **kw):
        size = len(value or b"") + sum(len(k) + len(v) for k, v in headers or [])
        if topic.endswith(".dlq") and size > _DLQ_LIMIT:
            return _Refused(size)
        return super().send(topic, value=value, headers=headers, **kw)


def _padded(label: int, size: int) -> bytes:
    head = b'{"id": "big", "features": [0.1, 0.2, 0.3, 0.4], "label": %d, "pad": "' % label
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_a_reject_too_large_for_the_dead_letter_topic_is_sent_truncated(
        kafka_bootstrap: str, make_topic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the DLQ send failed, the seal waited for it, and ingestion stopped for good."""
    topic = make_topic(partitions=1)
    bad_label, too_large = _padded(7, 150_000), _padded(1, 300_000)
    values = [(0, good(0)), (0, bad_label), (0, good(1)), (0, too_large), (0, BAD["bad_shape"])]
    send(kafka_bootstrap, topic, values + [(0, good(i)) for i in range(2, CHUNK)])
    monkeypatch.setattr("daemon.kafka_clients.KafkaProducer", _SmallDeadLetterTopic)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic=topic, group_id=f"g-{topic}",
                          poll_timeout_ms=100, max_message_bytes=200_000)
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    ing = ingestor(kafka, store)
    try:
        drain(ing, lambda: len(store.chunks()) == 1, timeout=20)
    finally:
        ing.stop()
    assert sorted(stored_ids(store)) == sorted(f"good/{i}" for i in range(CHUNK))
    dead = {int(dict(r.headers)["source_offset"]): r
            for r in read_all(kafka_bootstrap, kafka.effective_dlq_topic, 3)}
    assert sorted(dead) == [1, 3, 4]
    for offset, raw, reason in ((1, bad_label, b"bad_label"), (3, too_large, b"too_large")):
        headers = dict(dead[offset].headers)
        assert headers["reason"] == reason and headers["truncated"] == str(len(raw)).encode()
        assert dead[offset].value == raw[:64 * 1024]  # cut to what the topic accepts
    assert dead[4].value == BAD["bad_shape"] and "truncated" not in dict(dead[4].headers)


# ---- issue 8, item 3: a high-watermark dip is waited out, never rebased ------------------------

def test_a_high_watermark_dip_is_waited_out_not_rebased(
        kafka_bootstrap: str, make_topic, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a leader change the new leader's high watermark can lag our position for a
    while. Before, the ingestor took that for a recreated topic, rebased to the start and
    stored every retained message again."""
    import numpy as np

    from daemon.messages import Sample

    topic = make_topic(partitions=1)
    send(kafka_bootstrap, topic, [(0, good(i)) for i in range(CHUNK)])
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    kafka = settings(kafka_bootstrap, topic)
    first = ingestor(kafka, store)
    drain(first, lambda: len(store.chunks()) == 1)
    first.stop()
    # We had read offsets 5..7 from the old leader (stored with a seal); the new leader's
    # high watermark is still 5: our saved position, 8, is above it.
    store.append([Sample(np.zeros(4, np.float32), 0, 0, o, f"old-leader/{o}") for o in (5, 6, 7)])
    store.flush()
    assert store.next_offsets() == {0: 8}

    metrics = Metrics()
    ing = ingestor(kafka, store, metrics=metrics, dip_recheck_interval=0.2)
    try:
        with caplog.at_level("WARNING", logger="daemon.offsets"):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # the dip lasts 3 s
                ing.poll_once(100)
        assert store.positions() == {0: 8} and store.buffered == 0  # waited, not rebased
        assert ing._watch.dipped == [0]  # noqa: SLF001
        assert any("below our position 8" in r.message and "not rebasing" in r.message
                   for r in caplog.records)
        # the new leader catches up (5..7) and new records arrive (8..12)
        send(kafka_bootstrap, topic, [(0, good(100 + i)) for i in range(3 + CHUNK)])
        drain(ing, lambda: len(store.chunks()) == 3)
    finally:
        ing.stop()
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)) == 3 * CHUNK - 2, ids  # nothing stored twice
    assert ids[-CHUNK:] == [f"good/{100 + i}" for i in range(3, 3 + CHUNK)]
    assert ing._watch.dipped == [] and ing.stats.skipped == 0  # noqa: SLF001
    assert metrics.registry.get_sample_value("gnp_ingest_samples_total") == CHUNK


# ---- issue 8, item 11: ingest health ----------------------------------------------------------

def _gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_broker_outage_shows_in_the_health_gauges(tmp_path: Path) -> None:
    """The broker is frozen (SIGSTOP) and thawed: gnp_ingest_connected drops to 0, the last
    successful poll and the lag's end offsets visibly age, and all recover afterwards."""
    broker = EmbeddedBroker().start()
    metrics = Metrics()
    store = ChunkStore(tmp_path, CHUNK, SHAPE, 0.2)
    ing = Ingestor(settings(broker.bootstrap_servers, "samples"), store, input_shape=SHAPE,
                   num_classes=CLASSES, metrics=metrics, lag_interval=0.5, max_backoff=1.0)
    connected = lambda: _gauge(metrics, "gnp_ingest_connected")  # noqa: E731
    ing.start()
    try:
        send(broker.bootstrap_servers, "samples", [(0, good(i)) for i in range(CHUNK + 2)])
        _wait(lambda: len(store.chunks()) == 1 and connected() == 1, "first chunk, connected")
        # The lag is read every lag_interval, not on each poll: under load the first read
        # can come after the chunk is sealed (a flake on a busy CI machine), so wait for it.
        _wait(lambda: _gauge(metrics, "gnp_ingest_lag_messages", partition="0") == 0, "lag 0")
        frozen = time.time()
        broker._proc.send_signal(signal.SIGSTOP)  # noqa: SLF001 - freeze, keep the sockets
        try:
            _wait(lambda: connected() == 0, "connected == 0 during the outage", timeout=20)
            last_poll = _gauge(metrics, "gnp_ingest_last_poll_timestamp_seconds")
            lag_read = _gauge(metrics, "gnp_ingest_lag_timestamp_seconds")
            assert last_poll < frozen + 1.0 and lag_read < frozen + 1.0
            time.sleep(2.0)
            assert _gauge(metrics, "gnp_ingest_last_poll_timestamp_seconds") == last_poll
            assert _gauge(metrics, "gnp_ingest_lag_timestamp_seconds") == lag_read
            assert connected() == 0
        finally:
            thawed = time.time()
            broker._proc.send_signal(signal.SIGCONT)  # noqa: SLF001
        _wait(lambda: connected() == 1, "connected again", timeout=30)
        assert _gauge(metrics, "gnp_ingest_last_poll_timestamp_seconds") >= thawed
        assert _gauge(metrics, "gnp_ingest_lag_timestamp_seconds") >= thawed
        send(broker.bootstrap_servers, "samples", [(0, good(i)) for i in range(100, 103)])
        _wait(lambda: len(store.chunks()) == 2, "a chunk after the outage")
    finally:
        broker._proc.send_signal(signal.SIGCONT)  # noqa: SLF001
        assert ing.stop(timeout=15)
        broker.stop()
    assert len(set(stored_ids(store))) == 2 * CHUNK


def test_re_reads_after_a_recovery_are_counted_apart_from_new_samples(
        kafka_bootstrap: str, make_topic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every failed dead-letter flush makes the ingestor read from the last seal again; the
    samples it reads again are re-reads, not new samples (before: counted again each time)."""
    topic = make_topic(partitions=1)
    values = [(0, good(0)), (0, good(1)), (0, BAD["bad_label"])] + \
        [(0, good(i)) for i in range(2, 6)]
    send(kafka_bootstrap, topic, values)
    monkeypatch.setattr("daemon.kafka_clients.KafkaProducer", _BrokenDeadLetterProducer)
    metrics = Metrics()
    ing = ingestor(settings(kafka_bootstrap, topic), ChunkStore(tmp_path, CHUNK, SHAPE, 0.2),
                   metrics=metrics, max_backoff=0.1)
    ing.start()
    _wait(lambda: ing.stats.errors >= 3 and ing.stats.reread >= 2 * len(values), "re-reads")
    assert ing.stop()
    assert _gauge(metrics, "gnp_ingest_samples_total") == 6
    assert _gauge(metrics, "gnp_ingest_rejected_total", reason="bad_label") == 1
    assert _gauge(metrics, "gnp_ingest_reread_total") == ing.stats.reread
    assert ing.stats.consumed == len(values) + ing.stats.reread
