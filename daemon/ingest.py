"""Kafka -> ChunkStore: consume sample messages, dead-letter the bad ones, seal chunks.

The :class:`Ingestor` ``assign()``s every partition of the topic (a group join
through ``subscribe()`` takes ~23 s on Tansu; gnpd keeps its own offsets in the
store's manifest, so it needs no group membership) and seeks each partition to
the store's resume point. For each message it either appends a
:class:`~daemon.messages.Sample` to the store or sends the raw bytes to the
dead-letter topic with ``reason``/``detail``/source headers.

Delivery guarantees:

* A chunk is sealed only after every dead-letter send it covers is acknowledged,
  so a crash never loses a rejected message (it may dead-letter one twice).
* Offsets are committed to Kafka for ``group_id`` only after a seal, and only as
  far as the seal: they serve lag tools, while the manifest stays the source of
  truth for resuming.
* On any error (broker outage, failed dead-letter send, disk full) the ingestor
  drops its non-durable buffer, reconnects with exponential backoff and reads
  again from the last seal -- nothing is stored twice, nothing is skipped.
* A seal that fails because a sample cannot be encoded (a value validation let
  through) never blocks ingestion: the store names the offending samples by
  bisection, the ingestor rewinds to the last seal and, reading them again,
  dead-letters them as ``unstorable``. Only a failure no single sample explains
  (e.g. the disk) is retried as an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from daemon.deadletter import DeadLetterError, DeadLetterWriter
from daemon.messages import Rejection, Sample, parse_message
from daemon.metrics import Metrics
from daemon.settings import KafkaSettings, Settings
from daemon.store import ChunkInfo, ChunkStore, UnstorableError

__all__ = ["DeadLetterError", "IngestStats", "Ingestor"]

log = logging.getLogger(__name__)

OnSealed = Callable[[list[ChunkInfo]], None]
_HEADER_OVERHEAD = 64 * 1024  # producer request headroom over max_message_bytes


def _fast_crc() -> bool:
    try:
        from kafka.record import util
    except ImportError:
        return False
    return getattr(util, "crc32c_c", None) is not None


# kafka-python checks record CRC32Cs in pure Python unless the `crc32c` package is
# installed; that costs ~90% of consume time (~1,000 msg/s for 4 KB messages). So
# check only when it is cheap -- librdkafka does not check by default either; TCP
# checksums the transfer and the broker checked the CRC when the record was produced.
_FAST_CRC = _fast_crc()


@dataclass(frozen=True)
class IngestStats:
    """Counters since the Ingestor was built (a snapshot)."""

    consumed: int = 0     # records read from Kafka, duplicates excluded
    stored: int = 0       # valid samples appended to the store's buffer
    rejected: int = 0     # records sent to the dead-letter topic
    duplicates: int = 0   # re-delivered records ignored
    sealed: int = 0       # chunks sealed
    errors: int = 0       # recoveries (buffer dropped, reconnected)


class Ingestor:
    """Consumes one topic into a :class:`ChunkStore`; runs in its own thread.

    Args:
        kafka: broker, topics, group id, poll timeout and size limit.
        store: where samples go; its offsets say where to resume.
        input_shape, num_classes: what a valid sample looks like.
        metrics: counters and gauges to update (a private set by default).
        on_sealed: called in the ingest thread with the chunks of each seal, after
            the seal is durable; it should hand off quickly (e.g. wake a worker).
        lag_interval: seconds between ``end_offsets`` calls for the lag gauge.
        partition_check_interval: seconds between checks for new partitions.
        max_backoff: longest wait between reconnect attempts, seconds.
    """

    def __init__(self, kafka: KafkaSettings, store: ChunkStore, *, input_shape: Sequence[int],
                 num_classes: int, metrics: Metrics | None = None,
                 on_sealed: OnSealed | None = None,
                 lag_interval: float = 5.0, partition_check_interval: float = 30.0,
                 max_backoff: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not kafka.bootstrap_servers:
            raise ValueError("kafka.bootstrap_servers is empty: start an EmbeddedBroker first")
        if tuple(input_shape) != store.input_shape:
            raise ValueError(f"input_shape {list(input_shape)} differs from the store's "
                             f"{list(store.input_shape)}")
        self.kafka, self.store = kafka, store
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_sealed = on_sealed
        self.lag_interval, self.partition_check_interval = lag_interval, partition_check_interval
        self.max_backoff, self._clock = max_backoff, clock
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._dlq: DeadLetterWriter | None = None
        self._assigned: list[TopicPartition] = []
        self._poison: dict[tuple[int, int], str] = {}  # (partition, offset) -> why unstorable
        self._counts = dict.fromkeys(IngestStats.__dataclass_fields__, 0)
        self._admin: KafkaAdminClient | None = None
        self._next_lag = self._next_topic_check = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics.store_chunks.set(len(store.chunks()))

    @classmethod
    def from_settings(cls, settings: Settings, store: ChunkStore, metrics: Metrics | None = None,
                      on_sealed: OnSealed | None = None) -> Ingestor:
        """An Ingestor for ``settings.kafka`` and the input of ``settings.model``."""
        return cls(settings.kafka, store, input_shape=settings.model.input_shape,
                   num_classes=settings.model.num_classes, metrics=metrics, on_sealed=on_sealed)

    @property
    def stats(self) -> IngestStats:
        """Counters so far."""
        return IngestStats(**self._counts)

    @property
    def partitions(self) -> list[int]:
        """Partitions currently assigned."""
        return [tp.partition for tp in self._assigned]

    # ---- thread ----------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run` in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("ingestor already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, name="gnpd-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the loop to stop and wait up to ``timeout`` s; True if it stopped.

        The open buffer is not sealed: those messages are read again on restart.
        """
        self._stopping.set()
        thread = self._thread
        if thread is None:
            self.close()
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def run(self) -> None:
        """Poll until :meth:`stop`; errors are logged and retried with backoff."""
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                try:
                    self.poll_once()
                    backoff = 0.5
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                    log.warning("ingest error, retrying from the last seal in %.1fs: %r",
                                backoff, exc, exc_info=not isinstance(exc, KafkaError))
                    self._recover()
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            self.close()

    def close(self) -> None:
        """Flush dead-letter sends and close the Kafka clients (reconnects on next poll)."""
        producer, consumer, admin = self._producer, self._consumer, self._admin
        self._consumer, self._producer, self._admin, self._dlq = None, None, None, None
        self._assigned = []
        _close_quietly(producer, timeout=5)
        _close_quietly(consumer, autocommit=False)
        _close_quietly(admin)

    # ---- one step ----------------------------------------------------------------

    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Connect if needed, poll once and handle what arrived; returns records handled."""
        self.connect()
        assert self._consumer is not None
        if self._clock() >= self._next_topic_check:
            self._next_topic_check = self._clock() + self.partition_check_interval
            self._refresh_topic()
        wait = self.kafka.poll_timeout_ms if timeout_ms is None else timeout_ms
        batches = self._consumer.poll(timeout_ms=wait)
        try:
            handled = sum(self._handle_partition(tp.partition, records)
                          for tp, records in batches.items())
        except UnstorableError as exc:
            self._set_aside(exc)
            return 0
        self._check_positions()
        if self._clock() >= self._next_lag:
            self._next_lag = self._clock() + self.lag_interval
            self._report_lag()
        return handled

    def connect(self) -> None:
        """Create the Kafka clients, and the topic and dead-letter topic if missing."""
        if self._consumer is not None:
            return
        k = self.kafka
        # Bounded waits, so that stop() is prompt and an outage is retried by run();
        # address and security (TLS, SASL) from one place for all three clients.
        common = {**k.client_kwargs(), "bootstrap_timeout_ms": 5_000,
                  "reconnect_backoff_max_ms": 5_000}
        self._admin = KafkaAdminClient(client_id="gnpd-admin", **common)
        self._consumer = KafkaConsumer(
            client_id="gnpd-ingest", group_id=k.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", check_crcs=_FAST_CRC,
            max_partition_fetch_bytes=max(8 << 20, k.max_message_bytes + _HEADER_OVERHEAD),
            metadata_max_age_ms=int(self.partition_check_interval * 1000), **common)
        self._producer = KafkaProducer(
            client_id="gnpd-dlq", acks="all", linger_ms=5, max_block_ms=10_000,
            max_request_size=k.max_message_bytes + _HEADER_OVERHEAD, **common)
        self._dlq = DeadLetterWriter(self._producer, k.effective_dlq_topic, k.topic,
                                     k.max_message_bytes)
        existing = self._consumer.topics()
        for name, partitions in ((k.topic, k.topic_partitions), (k.effective_dlq_topic, 1)):
            if name not in existing:
                _create_topic(self._admin, name, partitions)
        self._next_topic_check = 0.0
        log.info("ingesting %s from %s (dead letters to %s)", k.topic, k.bootstrap_servers,
                 k.effective_dlq_topic)

    def _refresh_topic(self) -> None:
        """Follow the topic: a new id (recreated) restarts it at 0; new partitions are added."""
        assert self._admin is not None
        topic_id = _topic_id(self._admin, self.kafka.topic)
        if self.store.bind_topic(topic_id):
            log.warning("topic %s has a new id %s (recreated, or a fresh embedded broker): "
                        "reading it from the beginning", self.kafka.topic, topic_id)
            self._assigned = []  # re-seek every partition below
        self._assign(self._topic_partitions())

    def _topic_partitions(self) -> list[int]:
        assert self._consumer is not None
        deadline = self._clock() + 10.0
        while not (parts := self._consumer.partitions_for_topic(self.kafka.topic)):
            if self._clock() > deadline:
                raise KafkaError(f"topic {self.kafka.topic!r} has no partitions in the metadata")
            time.sleep(0.2)
        return sorted(parts)

    def _assign(self, partitions: list[int]) -> None:
        """Assign exactly ``partitions``; seek the new ones to the store's positions."""
        assert self._consumer is not None
        if [tp.partition for tp in self._assigned] == partitions:
            return
        old = set(self._assigned)
        self._assigned = [TopicPartition(self.kafka.topic, p) for p in partitions]
        self._consumer.assign(self._assigned)
        positions = self.store.positions()
        for tp in self._assigned:
            if tp in old:
                continue
            if tp.partition in positions:
                self._consumer.seek(tp, positions[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        log.info("assigned partitions %s, positions %s", partitions, positions)

    # ---- records -----------------------------------------------------------------

    def _handle_partition(self, partition: int, records: list) -> int:
        start = self.store.positions().get(partition, 0)
        run: list[Sample] = []
        for rec in records:
            if rec.offset < start:
                self._counts["duplicates"] += 1
                continue
            self._counts["consumed"] += 1
            poison = self._poison.get((partition, rec.offset))
            if poison is not None:
                result: Sample | Rejection = Rejection(
                    "unstorable", poison, partition, rec.offset, bytes(rec.value or b""))
            else:
                result = parse_message(rec.value, partition, rec.offset, self.input_shape,
                                       self.num_classes, self.kafka.max_message_bytes)
            if isinstance(result, Sample):
                run.append(result)
            else:
                self._store(run)
                run = []
                self._dead_letter(result)
        self._store(run)
        return len(records)

    def _store(self, run: list[Sample]) -> None:
        if not run:
            return
        if len(run) >= self.store.chunk_size - self.store.buffered:
            self._flush_dead_letters()  # the seal below covers their offsets
        before = len(self.store.chunks())
        try:
            sealed = self.store.append(run)
        except UnstorableError:
            done = self.store.chunks()[before:]  # sealed by this call before the failure
            if done:
                self._after_seal(done)
            raise
        self._counts["stored"] += len(run)
        self.metrics.ingest_samples.inc(len(run))
        if sealed:
            self._after_seal(sealed)

    def _dead_letter(self, rej: Rejection) -> None:
        if not self.store.skip(rej.partition, rej.offset):
            return
        assert self._dlq is not None
        self._dlq.send(rej)
        self._counts["rejected"] += 1
        self.metrics.ingest_rejected.labels(reason=rej.reason).inc()

    def _flush_dead_letters(self) -> None:
        if self._dlq is not None:
            self._dlq.flush(timeout=30)

    def _after_seal(self, sealed: list[ChunkInfo]) -> None:
        self._counts["sealed"] += len(sealed)
        durable = self.store.next_offsets()
        self._poison = {k: v for k, v in self._poison.items() if k[1] >= durable.get(k[0], 0)}
        self.metrics.store_chunks.set(len(self.store.chunks()))
        log.info("sealed chunk(s) %s (%d rows)", [c.id for c in sealed],
                 sum(c.rows for c in sealed))
        self._commit()
        if self.on_sealed is not None:
            try:
                self.on_sealed(sealed)
            except Exception:  # noqa: BLE001 - a consumer bug must not stop ingestion
                log.exception("on_sealed callback failed")

    def _commit(self) -> None:
        """Commit the durable offsets for group_id (for lag tools; failures only logged)."""
        assert self._consumer is not None
        offsets = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                   for p, o in self.store.next_offsets().items()}
        try:
            self._consumer.commit(offsets, timeout_ms=10_000)
        except Exception as exc:  # noqa: BLE001 - the manifest, not Kafka, is the truth
            log.warning("offset commit for group %s failed: %r", self.kafka.group_id, exc)

    # ---- positions, lag, recovery ---------------------------------------------------

    def _check_positions(self) -> None:
        """Rebase a partition whose log now ends before our position (topic recreated)."""
        assert self._consumer is not None
        positions = self.store.positions()
        for tp in self._assigned:
            high = self._consumer.highwater(tp)
            pos = positions.get(tp.partition)
            if high is None or pos is None or high >= pos:
                continue
            begin = self._consumer.beginning_offsets([tp], timeout_ms=10_000)[tp]
            log.warning("partition %d ends at offset %d, before our position %d: the topic "
                        "was recreated (e.g. a fresh embedded broker); reading from %d",
                        tp.partition, high, pos, begin)
            self.store.rebase(tp.partition, begin)
            self._consumer.seek(tp, begin)

    def _report_lag(self) -> None:
        assert self._consumer is not None
        try:
            ends = self._consumer.end_offsets(self._assigned, timeout_ms=5_000)
        except Exception as exc:  # noqa: BLE001 - lag is best effort
            log.debug("end_offsets failed: %r", exc)
            ends = {}
        positions = self.store.positions()
        for tp in self._assigned:
            # Tansu's ListOffsets can lag behind the fetch high watermark: take the larger.
            end = max(ends.get(tp) or 0, self._consumer.highwater(tp) or 0)
            lag = max(0, end - positions.get(tp.partition, 0))
            self.metrics.ingest_lag.labels(partition=str(tp.partition)).set(lag)

    def _set_aside(self, exc: UnstorableError) -> None:
        """Remember the samples a seal could not encode; read again from the last seal.

        Read again, they are dead-lettered as ``unstorable`` with their original bytes.
        A failure no single sample explains is not the data's: it is raised (retried).
        """
        if not exc.bad:
            raise exc
        for sample, why in exc.bad:
            log.error("partition %d offset %d (id %r) cannot be stored (%s): dead-lettering it",
                      sample.partition, sample.offset, sample.id, why)
            detail = f"the store cannot encode it: {why}"[:200]
            self._poison[(sample.partition, sample.offset)] = detail
        self._rewind()

    def _rewind(self) -> None:
        """Drop the open buffer and seek every partition back to the last seal."""
        assert self._consumer is not None
        dropped = self.store.discard_buffer()
        durable = self.store.next_offsets()
        for tp in self._assigned:
            if tp.partition in durable:
                self._consumer.seek(tp, durable[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        log.warning("dropped %d buffered samples; reading again from the last seal %s",
                    dropped, durable)

    def _recover(self) -> None:
        """Back to the last durable state: drop the buffer, reconnect on the next poll."""
        self._counts["errors"] += 1
        dropped = self.store.discard_buffer()
        if dropped:
            log.warning("dropped %d buffered samples; they will be read again", dropped)
        if self._dlq is not None:
            self._dlq.discard()
        self.close()


def _close_quietly(client: KafkaConsumer | KafkaProducer | KafkaAdminClient | None,
                   **kwargs: object) -> None:
    if client is None:
        return
    try:
        client.close(**kwargs)
    except Exception as exc:  # noqa: BLE001 - closing must not raise
        log.warning("closing %s failed: %r", type(client).__name__, exc)


def _create_topic(admin: KafkaAdminClient, name: str, partitions: int) -> None:
    try:
        admin.create_topics([NewTopic(name, partitions, -1)])  # -1: the broker's replication
        log.info("created topic %s with %d partition(s)", name, partitions)
    except TopicAlreadyExistsError:
        pass


def _topic_id(admin: KafkaAdminClient, topic: str) -> str | None:
    """The broker's id of ``topic`` (Kafka >= 2.8 and Tansu have one), or None."""
    try:
        (desc,) = admin.describe_topics([topic])
    except Exception as exc:  # noqa: BLE001 - an old broker: fall back to high-water checks
        log.debug("describe_topics(%s) failed: %r", topic, exc)
        return None
    topic_id = desc.get("topic_id")
    unset = (None, "", "00000000-0000-0000-0000-000000000000")
    return None if topic_id in unset else str(topic_id)
