"""Kafka -> ChunkStore: consume sample messages, dead-letter the bad ones, seal chunks.

The :class:`Ingestor` ``assign()``s every partition of the topic (a group join
through ``subscribe()`` takes ~23 s on Tansu; gnpd keeps its own offsets in the
store's manifest, so it needs no group membership) and seeks each partition to
the store's resume point. For each message it either appends a
:class:`~daemon.messages.Sample` to the store or sends the raw bytes to the
dead-letter topic with ``reason``/``detail``/source headers. A message whose
``content-type`` header announces an Arrow batch (:mod:`daemon.arrow_batch`) is
validated as a whole batch: its good rows go to the store as one
:class:`~daemon.arrow_batch.RowBatch` (columns, no per-row Python work) and each bad
row is dead-lettered alone, its ``source_row`` header naming it. When the store keeps
speech chunks (its ``codec``, :class:`daemon.speech_store.SpeechChunkCodec`) every message
is parsed as a speech sample instead (:mod:`daemon.speech_messages`; Arrow batches, which
carry fixed-size features, are dead-lettered ``bad_type``).

Delivery guarantees:

* A chunk is sealed only after every dead-letter send it covers is acknowledged,
  so a crash never loses a rejected message (it may dead-letter one twice).
* Offsets are committed to Kafka for ``group_id`` only after a seal is durable (its
  chunk file and the manifest listing it), and only as far as the seal: they serve
  lag tools, while the manifest stays the source of truth for resuming. With a
  write-behind store the chunk is written in the background while consumption goes
  on; each poll picks up the chunks that have become durable since, and a failed
  background write is handled on the ingest thread like any other seal error.
* On any error (broker outage, failed dead-letter send, disk full) the ingestor
  drops its non-durable buffer, reconnects with exponential backoff and reads
  again from the last seal -- nothing is stored twice, nothing is skipped.
* Positions move only forward, except when the topic was really recreated (a new
  topic id): a high watermark that dips below the saved position is waited out,
  and records deleted by retention before they were read are skipped with a
  WARNING and counted (:mod:`daemon.offsets`).
* A record read again after a recovery counts in ``gnp_ingest_reread_total``, not
  again in ``gnp_ingest_samples_total`` / ``gnp_ingest_rejected_total``.
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
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, LogTruncationError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata

from daemon.arrow_batch import RowBatch, is_arrow, parse_arrow_batch
from daemon.deadletter import DeadLetterError, DeadLetterWriter
from daemon.kafka_clients import _FAST_CRC  # noqa: F401 - benchmarks import it from here
from daemon.kafka_clients import close_quietly, create_topic, open_clients, topic_id
from daemon.messages import Rejection, Sample, parse_message
from daemon.metrics import Metrics
from daemon.offsets import OffsetWatch
from daemon.settings import KafkaSettings, Settings
from daemon.speech_messages import SpeechSample
from daemon.store import ChunkInfo, ChunkStore, UnstorableError

__all__ = ["DeadLetterError", "IngestStats", "Ingestor"]

log = logging.getLogger(__name__)

OnSealed = Callable[[list[ChunkInfo]], None]


@dataclass(frozen=True)
class IngestStats:
    """Counters since the Ingestor was built (a snapshot)."""

    consumed: int = 0     # records read from Kafka, duplicates excluded
    stored: int = 0       # valid samples (rows) appended to the store's buffer
    rejected: int = 0     # records (or batch rows) dead-lettered, each counted once
    duplicates: int = 0   # re-delivered records ignored
    sealed: int = 0       # chunks sealed
    errors: int = 0       # recoveries (buffer dropped, reconnected)
    reread: int = 0       # records read again after a recovery or a rewind
    skipped: int = 0      # offsets deleted by retention before they could be read


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
        dip_recheck_interval: seconds between re-checks of a partition whose high
            watermark is below our position.
    """

    def __init__(self, kafka: KafkaSettings, store: ChunkStore, *, input_shape: Sequence[int],
                 num_classes: int, metrics: Metrics | None = None,
                 on_sealed: OnSealed | None = None,
                 lag_interval: float = 5.0, partition_check_interval: float = 30.0,
                 max_backoff: float = 30.0, dip_recheck_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
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
        self._poison_counted: set[tuple[int, int]] = set()
        self._read_upto: dict[int, int] = {}  # partition -> one past the furthest offset read
        self._watch = OffsetWatch(store, self.metrics, recheck_interval=dip_recheck_interval,
                                  clock=clock)
        self._counts = dict.fromkeys(IngestStats.__dataclass_fields__, 0)
        self._admin: KafkaAdminClient | None = None
        self._next_lag = self._next_topic_check = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = store.sealed_count  # durable chunks already committed / announced
        self.metrics.store_chunks.set(self._reported)

    @classmethod
    def from_settings(cls, settings: Settings, store: ChunkStore, metrics: Metrics | None = None,
                      on_sealed: OnSealed | None = None) -> Ingestor:
        """An Ingestor for ``settings.kafka`` and the input of ``settings.model``."""
        return cls(settings.kafka, store, input_shape=settings.model.input_shape,
                   num_classes=settings.model.num_classes, metrics=metrics, on_sealed=on_sealed)

    @property
    def stats(self) -> IngestStats:
        """Counters so far."""
        return IngestStats(**{**self._counts, "skipped": self._watch.skipped})

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

        Chunks already sealed are made durable and their offsets committed first; the
        open buffer is not sealed: those messages are read again on restart.
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
            self._finish_writes()
            self.close()

    def _finish_writes(self) -> None:
        """Wait for the store's chunk writes in flight; commit and announce what is durable."""
        try:
            self.store.sync()
        except Exception as exc:  # noqa: BLE001 - not durable: read again at the next start
            log.warning("a chunk write failed at shutdown: %r", exc)
        self._report_sealed()

    def close(self) -> None:
        """Flush dead-letter sends and close the Kafka clients (reconnects on next poll)."""
        producer, consumer, admin = self._producer, self._consumer, self._admin
        self._consumer, self._producer, self._admin, self._dlq = None, None, None, None
        self._assigned = []
        close_quietly(producer, timeout=5)
        close_quietly(consumer, autocommit=False)
        close_quietly(admin)

    # ---- one step ----------------------------------------------------------------

    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Connect if needed, poll once and handle what arrived; returns records handled."""
        self.connect()
        assert self._consumer is not None
        if self._clock() >= self._next_topic_check:
            self._next_topic_check = self._clock() + self.partition_check_interval
            self._refresh_topic()
        wait = self.kafka.poll_timeout_ms if timeout_ms is None else timeout_ms
        try:
            batches = self._consumer.poll(timeout_ms=wait)
        except OffsetOutOfRangeError as exc:  # Kafka: past the log end, or before its start
            offsets = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            if self._watch.out_of_range(self._consumer, offsets):
                self._refresh_topic()
            return 0
        except LogTruncationError as exc:
            for tp, where in exc.divergent_offsets.items():
                if where is not None:
                    self._read_upto[tp.partition] = min(
                        self._read_upto.get(tp.partition, 0), where.offset)
            self._watch.truncated(self._consumer, exc.divergent_offsets)
            return 0
        if batches:
            self._watch.reached()
        self.store.sync(block=False)  # a failed background write: recover as from any error
        self._report_sealed()
        try:
            handled = sum(self._handle_partition(tp.partition, records)
                          for tp, records in batches.items())
        except UnstorableError as exc:
            self._set_aside(exc)
            return 0
        self._report_sealed()
        if self._watch.check(self._consumer, self._assigned):
            self._refresh_topic()  # a dip: was the topic recreated?
        if self._clock() >= self._next_lag:
            self._next_lag = self._clock() + self.lag_interval
            self._watch.read_ends(self._consumer, self._assigned)
        return handled

    def connect(self) -> None:
        """Create the Kafka clients, and the topic and dead-letter topic if missing."""
        if self._consumer is not None:
            return
        k = self.kafka
        self._admin, self._consumer, self._producer = open_clients(
            k, metadata_max_age_ms=int(self.partition_check_interval * 1000))
        self._dlq = DeadLetterWriter(self._producer, k.effective_dlq_topic, k.topic,
                                     k.max_message_bytes)
        existing = self._consumer.topics()
        for name, partitions in ((k.topic, k.topic_partitions), (k.effective_dlq_topic, 1)):
            if name not in existing:
                create_topic(self._admin, name, partitions)
        self._next_topic_check = 0.0
        log.info("ingesting %s from %s (dead letters to %s)", k.topic, k.bootstrap_servers,
                 k.effective_dlq_topic)

    def _refresh_topic(self) -> None:
        """Follow the topic: a new id (recreated) restarts it at 0; new partitions are added."""
        assert self._admin is not None
        new_id = topic_id(self._admin, self.kafka.topic)
        if self.store.bind_topic(new_id):
            log.warning("topic %s has a new id %s (recreated, or a fresh embedded broker): "
                        "reading it from the beginning", self.kafka.topic, new_id)
            self._assigned = []  # re-seek every partition below
            self._watch.forget()
            self._read_upto.clear()
            self._poison.clear()
            self._poison_counted.clear()
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
        read_before = self._read_upto.get(partition, 0)
        run: list[Sample | RowBatch] = []
        for rec in records:
            if rec.offset < start:
                self._counts["duplicates"] += 1
                continue
            self._counts["consumed"] += 1
            fresh = rec.offset >= read_before
            if fresh:
                self._read_upto[partition] = rec.offset + 1
            else:
                self._counts["reread"] += 1
                self.metrics.ingest_reread.inc()
            result = self._parse(partition, rec)
            if isinstance(result, tuple):
                run = self._take_batch(partition, rec.offset, *result, run, fresh)
            elif isinstance(result, (Sample, SpeechSample)):
                run.append(result)
                if fresh:
                    self.metrics.ingest_samples.inc()
            else:
                self._store(run)
                run = []
                self._dead_letter(result, fresh or self._first_unstorable(partition, rec.offset))
        self._store(run)
        return len(records)

    def _take_batch(self, partition: int, offset: int, batch: RowBatch | None,
                    rejections: list[Rejection], run: list, fresh: bool) -> list:
        """Queue the bad rows of a batch message for the DLQ and its good rows for the store.

        Returns the run of items still to store.
        """
        if rejections or batch is None:
            self._store(run)  # in order: the store consumes offsets only forwards
            run = []
            if batch is None and not self.store.skip(partition, offset):
                return run
            assert self._dlq is not None
            for rej in rejections:  # before the seal that covers them (flushed there)
                self._dlq.send(rej)
                if fresh:
                    self._counts["rejected"] += 1
                    self.metrics.ingest_rejected.labels(reason=rej.reason).inc()
        if batch is not None:
            run.append(batch)
            if fresh:
                self.metrics.ingest_samples.inc(len(batch))
        return run

    def _first_unstorable(self, partition: int, offset: int) -> bool:
        """True once for each record set aside by a failed seal: count its rejection once.

        (It was counted as a sample when first read, before the seal failed.)
        """
        key = (partition, offset)
        if key not in self._poison or key in self._poison_counted:
            return False
        self._poison_counted.add(key)
        return True

    def _parse(self, partition: int, rec: Any
               ) -> Sample | Rejection | tuple[RowBatch | None, list[Rejection]]:
        value, offset = rec.value, rec.offset  # a kafka ConsumerRecord
        poison = self._poison.get((partition, offset))
        if poison is not None:  # found by a failed seal: never parse it into a sample again
            return Rejection("unstorable", poison, partition, offset, bytes(value or b""))
        if self.store.codec is not None:  # a speech store: speech messages only
            if is_arrow(rec.headers):
                return Rejection("bad_type", "Arrow batches carry fixed-size features; the "
                                 "model takes speech messages (JSON, see "
                                 "schemas/speech-sample.schema.json)", partition, offset,
                                 bytes(value or b""))
            return self.store.codec.parse(value, partition, offset, self.kafka.max_message_bytes)
        if is_arrow(rec.headers):
            return parse_arrow_batch(value, partition, offset, self.store.input_size,
                                     self.num_classes, self.kafka.max_message_bytes)
        return parse_message(value, partition, offset, self.input_shape, self.num_classes,
                             self.kafka.max_message_bytes)

    def _store(self, run: list[Sample | RowBatch]) -> None:
        if not run:
            return
        rows = sum(len(x) if isinstance(x, RowBatch) else 1 for x in run)
        if rows >= self.store.chunk_size - self.store.buffered:
            self._flush_dead_letters()  # the seal below covers their offsets
        try:
            self.store.append(run)
        except UnstorableError:
            self._report_sealed()  # sealed by this call before the failure
            raise
        self._counts["stored"] += rows
        self._report_sealed()

    def _dead_letter(self, rej: Rejection, fresh: bool = True) -> None:
        if not self.store.skip(rej.partition, rej.offset):
            return
        assert self._dlq is not None
        self._dlq.send(rej)  # again after a re-read: at least once
        if fresh:
            self._counts["rejected"] += 1
            self.metrics.ingest_rejected.labels(reason=rej.reason).inc()

    def _flush_dead_letters(self) -> None:
        if self._dlq is not None:
            self._dlq.flush(timeout=30)

    def _report_sealed(self) -> None:
        """Commit and announce the chunks that became durable since the last call."""
        if self.store.sealed_count > self._reported:  # checked on every poll: no list copy
            sealed = self.store.chunks()[self._reported:]
            self._reported += len(sealed)
            self._after_seal(sealed)

    def _after_seal(self, sealed: list[ChunkInfo]) -> None:
        self._counts["sealed"] += len(sealed)
        durable = self.store.next_offsets()
        self._poison = {k: v for k, v in self._poison.items() if k[1] >= durable.get(k[0], 0)}
        self._poison_counted &= self._poison.keys()
        self.metrics.store_chunks.set(self.store.sealed_count)
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
        if self._consumer is None:  # closed by a recovery: the next seal's commit covers it
            return
        offsets = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                   for p, o in self.store.next_offsets().items()}
        try:
            self._consumer.commit(offsets, timeout_ms=10_000)
        except Exception as exc:  # noqa: BLE001 - the manifest, not Kafka, is the truth
            log.warning("offset commit for group %s failed: %r", self.kafka.group_id, exc)

    # ---- recovery --------------------------------------------------------------------

    def _set_aside(self, exc: UnstorableError) -> None:
        """Remember the samples a seal could not encode; read again from the last seal.

        Read again, they are dead-lettered as ``unstorable`` with their original bytes.
        A failure no single sample explains is not the data's: it is raised (retried).
        """
        if not exc.bad:
            raise exc
        for sample, why in exc.bad:  # a Sample, or a RowBatch (the whole message)
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
        self._watch.lost(self.partitions)  # also re-publishes the lag from rewound positions
        if self._dlq is not None:
            self._dlq.discard()
        self.close()

