"""DeadLetterWriter: a refusal for size is retried smaller; other failures are raised."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

from daemon.deadletter import DeadLetterError, DeadLetterWriter
from daemon.messages import Rejection


class _Future:
    def __init__(self, exception: Exception | None) -> None:
        self.exception = exception

    def failed(self) -> bool:
        return self.exception is not None


class _Broker:
    """A producer whose broker refuses values over `limit` bytes (or everything, with `error`)."""

    def __init__(self, limit: int, error: type[Exception] = MessageSizeTooLargeError) -> None:
        self.limit, self.error = limit, error
        self.sent: list[tuple[bytes, dict]] = []
        self.flushes = 0

    def send(self, topic: str, value: bytes, headers: list) -> _Future:
        self.sent.append((value, dict(headers)))
        return _Future(self.error("refused") if len(value) > self.limit else None)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


def _rejection(size: int) -> Rejection:
    return Rejection("bad_label", "label 7 outside 0..2", 3, 42, b"x" * size)


@pytest.mark.parametrize("limit, sizes", [
    (10**9, [200_000]),                 # accepted as it is
    (100_000, [200_000, 65_536]),       # the topic takes less: cut to 64 KiB
    (1_000, [200_000, 65_536, 0]),      # even less: the headers alone
])
def test_too_large_is_retried_cut_down(limit: int, sizes: list[int]) -> None:
    broker = _Broker(limit)
    writer = DeadLetterWriter(broker, "in.dlq", "in", max_value_bytes=1_000_000)
    writer.send(_rejection(200_000))
    writer.flush()
    assert [len(v) for v, _ in broker.sent] == sizes and writer.pending == 0
    value, headers = broker.sent[-1]
    assert headers["reason"] == b"bad_label" and headers["source_offset"] == b"42"
    assert headers["source_partition"] == b"3" and headers["source_topic"] == b"in"
    assert headers.get("truncated") == (None if len(sizes) == 1 else b"200000")
    assert writer.truncated == len(sizes) - 1


def test_value_longer_than_max_value_bytes_is_cut_up_front() -> None:
    broker = _Broker(10**9)
    writer = DeadLetterWriter(broker, "in.dlq", "in", max_value_bytes=1_000)
    writer.send(_rejection(5_000))
    writer.flush()
    assert [(len(v), h["truncated"]) for v, h in broker.sent] == [(1_000, b"5000")]


def test_record_list_too_large_counts_as_too_large() -> None:
    broker = _Broker(100, RecordListTooLargeError)
    writer = DeadLetterWriter(broker, "in.dlq", "in", max_value_bytes=1_000)
    writer.send(_rejection(500))
    writer.flush()
    assert [len(v) for v, _ in broker.sent] == [500, 0]


def test_refused_even_empty_is_an_error() -> None:
    broker = _Broker(-1)
    writer = DeadLetterWriter(broker, "in.dlq", "in", max_value_bytes=1_000)
    writer.send(_rejection(500))
    with pytest.raises(DeadLetterError):
        writer.flush()


def test_other_failures_are_raised_not_retried() -> None:
    broker = _Broker(0, KafkaTimeoutError)
    writer = DeadLetterWriter(broker, "in.dlq", "in", max_value_bytes=1_000)
    writer.send(_rejection(500))
    with pytest.raises(DeadLetterError) as info:
        writer.flush()
    assert isinstance(info.value.__cause__, KafkaTimeoutError) and len(broker.sent) == 1
