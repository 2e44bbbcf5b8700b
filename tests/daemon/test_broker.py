"""EmbeddedBroker: starts Tansu, serves Kafka clients, stops; clear errors on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return status.split("State:")[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_broker_dies_when_its_parent_is_sigkilled():
    code = ("from daemon.broker import EmbeddedBroker; import time\n"
            "b = EmbeddedBroker(); b.start(); print(b._proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())
    assert _alive(broker_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(broker_pid)
