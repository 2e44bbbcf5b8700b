"""EmbeddedBroker: starts Tansu, serves Kafka clients, stops; clear errors on failure."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.broker import BrokerError, EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-broker"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_round_trip_and_clean_stop() -> None:
    with EmbeddedBroker() as broker:
        assert broker.running
        host, port = broker.bootstrap_servers.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == broker.port
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send("hello", b"world", partition=0).get(timeout=10)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
        tp = TopicPartition("hello", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records = consumer.poll(timeout_ms=5000, max_records=1)
        consumer.close()
        assert [r.value for r in records[tp]] == [b"world"]
        log_path = broker.log_path
    assert not broker.running
    assert log_path is not None and not log_path.exists()  # our temp log is cleaned up
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()


def test_log_file_kept_when_given(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        assert "tansu" in broker.log_tail().lower()
    assert log_path.exists()


def test_binary_that_exits_reports_its_output(tmp_path: Path) -> None:
    fake = script(tmp_path, 'echo "cannot bind: permission denied" >&2; exit 3')
    with pytest.raises(BrokerError, match=r"(?s)code 3.*cannot bind: permission denied"):
        EmbeddedBroker(binary=fake).start()


def test_binary_that_never_answers_times_out(tmp_path: Path) -> None:
    fake = script(tmp_path, 'echo "starting slowly"; exec sleep 30')
    broker = EmbeddedBroker(binary=fake, startup_timeout=0.5)
    with pytest.raises(BrokerError, match=r"(?s)did not answer.*starting slowly"):
        broker.start()
    assert not broker.running  # the stuck process was stopped


def test_arguments_validated_and_free_port() -> None:
    with pytest.raises(ValueError, match="startup_timeout"):
        EmbeddedBroker(startup_timeout=0)
    with pytest.raises(BrokerError, match="not started"):
        _ = EmbeddedBroker().bootstrap_servers
    assert 0 < free_port() < 65536
