"""Dead-letter writer: rejected messages to the dead-letter topic, with why and from where.

Each record carries the original message bytes and these headers: ``reason`` (one of
:data:`daemon.metrics.REJECT_REASONS`), ``detail``, ``source_topic``,
``source_partition``, ``source_offset``, ``source_row`` (for one row of an Arrow batch
message, whose value is then that row alone as an Arrow IPC stream), and ``truncated`` (the original size in
bytes) when the value had to be cut.

A send can never block ingestion for good: the value is cut to ``max_value_bytes``
up front, and when the broker still refuses a record as too large (the dead-letter
topic's ``max.message.bytes`` may be smaller than the input topic's) it is sent again
cut to 64 KiB, then with an empty value -- the headers alone say what was rejected
and where to find it. Only a failure that is not about size (the broker is down, no
permission) is raised, as :class:`DeadLetterError`, for the ingestor to retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from daemon.messages import Rejection

__all__ = ["FALLBACK_SIZES", "DeadLetterError", "DeadLetterWriter"]

log = logging.getLogger(__name__)

FALLBACK_SIZES = (64 * 1024, 0)  # value sizes tried, in turn, after a "too large" refusal
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class DeadLetterError(RuntimeError):
    """A rejected message could not be written to the dead-letter topic."""


@dataclass(frozen=True)
class _Pending:
    future: Any
    rejection: Rejection
    sent_bytes: int  # length of the value sent


class DeadLetterWriter:
    """Sends :class:`Rejection`\\ s with a KafkaProducer; :meth:`flush` confirms them.

    Args:
        producer: a KafkaProducer (or anything with ``send`` and ``flush``).
        topic: the dead-letter topic.
        source_topic: the topic the rejected messages came from (a header).
        max_value_bytes: longest value sent; longer ones are cut (``truncated`` header).
    """

    def __init__(self, producer: Any, topic: str, source_topic: str,
                 max_value_bytes: int) -> None:
        self.producer, self.topic, self.source_topic = producer, topic, source_topic
        self.max_value_bytes = max_value_bytes
        self.truncated = 0  # records sent cut, since this writer was made
        self._pending: list[_Pending] = []

    @property
    def pending(self) -> int:
        """Sends not yet confirmed by :meth:`flush`."""
        return len(self._pending)

    def send(self, rej: Rejection, max_bytes: int | None = None) -> None:
        """Queue ``rej`` (its value cut to ``max_bytes``, default ``max_value_bytes``)."""
        size = min(len(rej.raw), self.max_value_bytes if max_bytes is None else max_bytes)
        headers = [
            ("reason", rej.reason.encode()), ("detail", rej.detail.encode("utf-8", "replace")),
            ("source_topic", self.source_topic.encode()),
            ("source_partition", str(rej.partition).encode()),
            ("source_offset", str(rej.offset).encode()),
        ]
        if rej.row is not None:
            headers.append(("source_row", str(rej.row).encode()))
        if size < len(rej.raw):
            headers.append(("truncated", str(len(rej.raw)).encode()))
        future = self.producer.send(self.topic, value=rej.raw[:size], headers=headers)
        self._pending.append(_Pending(future, rej, size))

    def flush(self, timeout: float = 30) -> None:
        """Wait for every queued send; re-send the ones refused as too large, cut down.

        Raises:
            DeadLetterError: a send failed for another reason (or even empty was too large).
        """
        while self._pending:
            self.producer.flush(timeout=timeout)
            done, self._pending = self._pending, []
            failed = [p for p in done if p.future.failed()]
            other = [p for p in failed if not _retry_smaller(p)]
            if other:
                raise DeadLetterError(f"{len(other)} dead-letter send(s) to {self.topic} "
                                      f"failed") from other[0].future.exception
            for p in failed:
                smaller = max(s for s in FALLBACK_SIZES if s < p.sent_bytes)
                log.warning("%s refused the dead letter of partition %d offset %d (%d bytes) "
                            "as too large: sending it cut to %d bytes", self.topic,
                            p.rejection.partition, p.rejection.offset, p.sent_bytes, smaller)
                self.truncated += 1
                self.send(p.rejection, smaller)

    def discard(self) -> None:
        """Forget unconfirmed sends (their messages will be read and rejected again)."""
        self._pending = []


def _retry_smaller(p: _Pending) -> bool:
    """True if ``p`` failed for its size and a smaller value is left to try."""
    return isinstance(p.future.exception, _TOO_LARGE) and p.sent_bytes > 0
