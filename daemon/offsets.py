"""The broker's offsets against the ingestor's: lag, watermark dips, retention gaps, health.

:class:`OffsetWatch` is the ingestor's view of where each partition's log starts and
ends, and what to do when that disagrees with the store's position:

* **High-watermark dip** (high watermark below our position, routine for a moment
  after a leader change): never a reason to move. The partition waits -- with
  Tansu the fetch just returns nothing; with Kafka a fetch past the log end is
  out of range, and the partition is paused and fetched again a little later --
  while the topic id is re-checked. Only a new topic id (the topic was recreated)
  resets positions, and that happens in ``ChunkStore.bind_topic``.
* **Retention gap** (the log now starts after our position: records were deleted
  before they were read): a WARNING, the skipped offsets counted in
  ``gnp_ingest_skipped_offsets_total{partition}``, and reading goes on from the log
  start. Never silent.
* **Truncation** confirmed by the broker's leader-epoch check (an unclean leader
  election): an ERROR, and reading goes on from the offset the broker names, so
  the new records written at those offsets are read.

Health: ``gnp_ingest_connected`` is 1 while the last round trip to the broker
worked, ``gnp_ingest_last_poll_timestamp_seconds`` is when one last did (records
fetched or end offsets read; the watch's creation until then). The lag gauge is
computed from the last end offsets read (``gnp_ingest_lag_timestamp_seconds`` says
when) against the current position, so during an outage it stays a lower bound
that still moves when positions do (a recovery rewinds them), and its age is
visible instead of a frozen value passing for a fresh one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from daemon.metrics import Metrics
from daemon.store import ChunkStore

__all__ = ["OffsetWatch"]

log = logging.getLogger(__name__)

_REWARN = 60.0  # seconds between warnings while a dip lasts


class OffsetWatch:
    """Follows the assigned partitions' log start and end; see the module docstring.

    Args:
        store: whose positions are ours.
        metrics: the ingest health, lag and skipped-offset metrics are set here.
        recheck_interval: seconds between re-checks of a dipped partition.
        clock: monotonic time; wall: Unix time (for the timestamp gauges).
    """

    def __init__(self, store: ChunkStore, metrics: Metrics, *, recheck_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.store, self.metrics = store, metrics
        self.recheck_interval, self._clock, self._wall = recheck_interval, clock, wall
        self.skipped = 0  # offsets skipped because retention deleted them, since creation
        self._ends: dict[int, int] = {}  # last known end offset per partition
        self._dips: dict[int, list[float]] = {}  # partition -> [since, last warned]
        self._paused: dict[TopicPartition, float] = {}  # -> when to fetch again
        self._next_recheck = 0.0
        metrics.ingest_connected.set(0)
        metrics.ingest_last_poll.set(wall())

    @property
    def dipped(self) -> list[int]:
        """Partitions whose high watermark is below our position right now."""
        return sorted(self._dips)

    # ---- health and lag -------------------------------------------------------------

    def reached(self) -> None:
        """A round trip to the broker worked (records arrived, end offsets were read)."""
        self.metrics.ingest_connected.set(1)
        self.metrics.ingest_last_poll.set(self._wall())

    def lost(self, partitions: Sequence[int] = ()) -> None:
        """The broker could not be reached; the lag keeps the last known end offsets."""
        self.metrics.ingest_connected.set(0)
        self.publish_lag(partitions or sorted(self._ends))

    def read_ends(self, consumer: KafkaConsumer, assigned: Sequence[TopicPartition]) -> None:
        """Read the end offsets (also the health probe) and publish the lag."""
        try:
            ends = consumer.end_offsets(list(assigned), timeout_ms=5_000)
        except Exception as exc:  # noqa: BLE001 - an outage: mark it, keep the last values
            log.debug("end_offsets failed: %r", exc)
            self.lost([tp.partition for tp in assigned])
            return
        self.reached()
        self.metrics.ingest_lag_timestamp.set(self._wall())
        for tp in assigned:
            # Tansu's ListOffsets can lag behind the fetch high watermark: take the larger.
            self._ends[tp.partition] = max(ends.get(tp) or 0, consumer.highwater(tp) or 0)
        self.publish_lag([tp.partition for tp in assigned])

    def publish_lag(self, partitions: Sequence[int]) -> None:
        """Lag = last known end offset minus the store's position, per partition."""
        positions = self.store.positions()
        for p in partitions:
            if p in self._ends:
                lag = max(0, self._ends[p] - positions.get(p, 0))
                self.metrics.ingest_lag.labels(partition=str(p)).set(lag)

    # ---- dips, retention, truncation -----------------------------------------------------

    def check(self, consumer: KafkaConsumer, assigned: Sequence[TopicPartition]) -> bool:
        """Note dips from the fetch high watermarks; True when the topic id should be checked."""
        positions, now = self.store.positions(), self._clock()
        for tp in assigned:
            high, pos = consumer.highwater(tp), positions.get(tp.partition)
            if tp in self._paused or high is None or pos is None:
                continue
            if high < pos:
                self._dip(tp.partition, f"high watermark {high}", pos)
            elif tp.partition in self._dips:
                since = self._dips.pop(tp.partition)[0]
                log.info("partition %d: high watermark %d is back at our position %d after "
                         "%.1fs; reading on", tp.partition, high, pos, now - since)
        self._resume(consumer, positions, now)
        if self._dips and now >= self._next_recheck:
            self._next_recheck = now + self.recheck_interval
            return True
        return False

    def out_of_range(self, consumer: KafkaConsumer, offsets: Mapping[TopicPartition, int]) -> bool:
        """A fetch offset outside the log (Kafka): a retention gap, or a dip to wait out.

        Returns True when the topic id should be checked now.
        """
        begins = consumer.beginning_offsets(list(offsets), timeout_ms=10_000)
        dipped = False
        for tp, fetch in offsets.items():
            begin = begins.get(tp)
            if begin is not None and fetch < begin:
                self._skip_deleted(consumer, tp, fetch, begin)
                continue
            consumer.pause(tp)  # past the log end: fetch again in a while, not in a loop
            self._paused[tp] = self._clock() + self.recheck_interval
            self._dip(tp.partition, "the log end", fetch)
            dipped = True
        return dipped

    def truncated(self, consumer: KafkaConsumer, divergent: Mapping[TopicPartition, Any]) -> None:
        """The broker says its log diverged below our position (an unclean leader election)."""
        for tp, where in divergent.items():
            if where is None:  # the broker cannot say where: wait as for a dip
                consumer.pause(tp)
                self._paused[tp] = self._clock() + self.recheck_interval
                continue
            log.error("partition %d: the broker truncated its log at offset %d, below our "
                      "position %s (unclean leader election?): records gnpd stored from "
                      "there on are gone upstream; reading the new ones from %d",
                      tp.partition, where.offset, self.store.positions().get(tp.partition),
                      where.offset)
            self.store.rebase(tp.partition, where.offset)
            consumer.seek(tp, where.offset)

    def forget(self) -> None:
        """The topic was recreated: what we knew of its offsets means nothing now."""
        self._ends.clear()
        self._dips.clear()
        self._paused.clear()

    def _dip(self, partition: int, what: str, pos: int) -> None:
        now = self._clock()
        state = self._dips.get(partition)
        if state is None:
            self._dips[partition] = [now, now]
            self._next_recheck = now  # check the topic id at once
            log.warning("partition %d: %s is below our position %d (a leader change?): "
                        "waiting for it, not rebasing; re-checking the topic id", partition,
                        what, pos)
        elif now - state[1] >= _REWARN:
            state[1] = now
            log.warning("partition %d: %s still below our position %d after %.0fs, topic id "
                        "unchanged: waiting", partition, what, pos, now - state[0])

    def _skip_deleted(self, consumer: KafkaConsumer, tp: TopicPartition, fetch: int,
                      begin: int) -> None:
        skipped = begin - fetch
        log.warning("partition %d: offsets %d..%d were deleted (retention) before gnpd read "
                    "them: %d message(s) skipped, reading on from %d", tp.partition, fetch,
                    begin - 1, skipped, begin)
        self.skipped += skipped
        self.metrics.ingest_skipped.labels(partition=str(tp.partition)).inc(skipped)
        self.store.rebase(tp.partition, begin)
        consumer.seek(tp, begin)

    def _resume(self, consumer: KafkaConsumer, positions: dict[int, int], now: float) -> None:
        for tp, when in list(self._paused.items()):
            if now >= when:
                del self._paused[tp]
                consumer.resume(tp)
                if tp.partition in positions:
                    consumer.seek(tp, positions[tp.partition])
