"""The Kafka clients the ingestor uses, made in one place from :class:`KafkaSettings`.

Every client gets ``KafkaSettings.client_kwargs()`` -- the broker address and the
security options (TLS, SASL) -- and bounded waits, so that an outage is a timeout
the ingest loop retries, never a hang.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from daemon.settings import KafkaSettings

__all__ = ["Clients", "close_quietly", "consumer_fetch_config", "create_topic", "open_clients",
           "topic_id"]

log = logging.getLogger(__name__)

HEADER_OVERHEAD = 64 * 1024  # producer request headroom over max_message_bytes


def _fast_crc() -> bool:
    try:
        from kafka.record import util
    except ImportError:
        return False
    return getattr(util, "crc32c_c", None) is not None


def _large_socket_reads() -> bool:
    """Make kafka-python read its TCP socket 1 MiB at a time instead of 4 KiB.

    kafka-python 3.0 (``kafka.net.transport.KafkaTCPTransport._sock_recv``) drains a
    socket with ``recv(4096)`` in a loop: an 800 KB Arrow batch message costs ~200
    system calls and Python iterations. Profiled consuming 80 MB of batch messages
    (``benchmarks/ingest_throughput.py``), the consumer's CPU time fell by ~30% with
    1 MiB reads. The replacement does the same thing (read until the socket would
    block; an empty read is a disconnect) with a larger buffer; it is applied only when
    the method is there (TLS sockets keep the original). Returns True if applied.
    """
    try:
        from kafka import errors
        from kafka.net.transport import KafkaTCPTransport
    except ImportError:  # another kafka-python layout: keep its own reads
        return False
    if not hasattr(KafkaTCPTransport, "_sock_recv"):
        return False

    def _sock_recv(self: Any, size: int = 1 << 20) -> tuple[bytes, Exception | None]:
        parts: list[bytes] = []
        while True:
            try:
                data = self._sock.recv(size)
            except (BlockingIOError, InterruptedError):
                break
            except Exception as e:  # noqa: BLE001 - as kafka-python: the connection is lost
                return b"".join(parts), errors.KafkaConnectionError(e)
            if not data:
                log.error("%s: socket disconnected", self)
                return b"".join(parts), errors.KafkaConnectionError("socket disconnected")
            parts.append(data)
            if len(data) < size:  # drained for now
                break
        return (parts[0] if len(parts) == 1 else b"".join(parts)), None

    ssl_class = None
    try:
        from kafka.net.transport import KafkaSSLTransport as ssl_class
    except ImportError:
        pass
    if ssl_class is not None and "_sock_recv" not in vars(ssl_class):
        return False  # TLS would inherit it: SSL sockets need their own error handling
    KafkaTCPTransport._sock_recv = _sock_recv
    return True


LARGE_SOCKET_READS = _large_socket_reads()

# kafka-python checks record CRC32Cs in pure Python unless the `crc32c` package is
# installed; that costs ~90% of consume time (~1,000 msg/s for 4 KB messages). So
# check only when it is cheap -- librdkafka does not check by default either; TCP
# checksums the transfer and the broker checked the CRC when the record was produced.
_FAST_CRC = _fast_crc()


class Clients(NamedTuple):
    """The admin client, the consumer and the dead-letter producer of one connection."""

    admin: KafkaAdminClient
    consumer: KafkaConsumer
    producer: KafkaProducer


def consumer_fetch_config(kafka: KafkaSettings) -> dict[str, int]:
    """How much one fetch may bring: room for several of the largest messages per partition."""
    per_partition = max(8 << 20, kafka.max_message_bytes + HEADER_OVERHEAD)
    return {"max_partition_fetch_bytes": per_partition,
            "fetch_max_bytes": max(50 << 20, per_partition)}


def open_clients(kafka: KafkaSettings, metadata_max_age_ms: int) -> Clients:
    """Connect the three clients (raises if the broker cannot be reached)."""
    common = {**kafka.client_kwargs(), "bootstrap_timeout_ms": 5_000,
              "reconnect_backoff_max_ms": 5_000}
    admin = KafkaAdminClient(client_id="gnpd-admin", **common)
    try:
        consumer = KafkaConsumer(
            client_id="gnpd-ingest", group_id=kafka.group_id, enable_auto_commit=False,
            auto_offset_reset="none",  # an offset out of range is the ingestor's to handle
            check_crcs=_FAST_CRC, metadata_max_age_ms=metadata_max_age_ms,
            **consumer_fetch_config(kafka), **common)
    except BaseException:
        close_quietly(admin)
        raise
    try:
        producer = KafkaProducer(
            client_id="gnpd-dlq", acks="all", linger_ms=5, max_block_ms=10_000,
            max_request_size=kafka.max_message_bytes + HEADER_OVERHEAD, **common)
    except BaseException:
        close_quietly(consumer, autocommit=False)
        close_quietly(admin)
        raise
    return Clients(admin, consumer, producer)


def close_quietly(client: Any, **kwargs: object) -> None:
    """Close a client (None is fine); log, never raise."""
    if client is None:
        return
    try:
        client.close(**kwargs)
    except Exception as exc:  # noqa: BLE001 - closing must not raise
        log.warning("closing %s failed: %r", type(client).__name__, exc)


def create_topic(admin: KafkaAdminClient, name: str, partitions: int) -> None:
    """Create ``name`` with the broker's replication; no error if it exists."""
    try:
        admin.create_topics([NewTopic(name, partitions, -1)])  # -1: the broker's replication
        log.info("created topic %s with %d partition(s)", name, partitions)
    except TopicAlreadyExistsError:
        pass


def topic_id(admin: KafkaAdminClient, topic: str) -> str | None:
    """The broker's id of ``topic`` (Kafka >= 2.8 and Tansu have one), or None."""
    try:
        (desc,) = admin.describe_topics([topic])
    except Exception as exc:  # noqa: BLE001 - unknown: nothing is rebased on it
        log.debug("describe_topics(%s) failed: %r", topic, exc)
        return None
    found = desc.get("topic_id")
    unset = (None, "", "00000000-0000-0000-0000-000000000000")
    return None if found in unset else str(found)
