"""Reference producer: message building, rate schedule, CLI against a real broker."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from daemon.messages import Sample, parse_message
from daemon.producer import (
    add_produce_args,
    dataset_messages,
    file_messages,
    produce,
    produce_main,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_errback(self, fn) -> FakeFuture:
        if self.error is not None:
            fn(self.error)
        return self


class FakeProducer:
    """Records sends with the (fake) time they happened."""

    def __init__(self, clock: FakeClock, fail_every: int = 0) -> None:
        self.clock, self.fail_every = clock, fail_every
        self.sent: list[tuple[float, str, bytes]] = []
        self.flushed = False

    def send(self, topic: str, value: bytes) -> FakeFuture:
        self.sent.append((self.clock.now, topic, value))
        failing = self.fail_every and len(self.sent) % self.fail_every == 0
        return FakeFuture(RuntimeError("boom") if failing else None)

    def flush(self) -> None:
        self.flushed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def run(messages, rate=None, **kw) -> tuple[int, FakeProducer]:
    clock = FakeClock()
    producer = FakeProducer(clock, kw.pop("fail_every", 0))
    n = produce("unused", "samples", messages, rate, producer=producer, sleep=clock.sleep,
                clock=clock, **kw)
    return n, producer


def test_rate_schedule() -> None:
    n, producer = run(({"i": i} for i in range(50)), rate=10.0)
    assert n == 50 and producer.flushed
    times = [t - 100.0 for t, _, _ in producer.sent]
    assert times == pytest.approx([i / 10 for i in range(50)])


def test_unlimited_rate_never_sleeps_and_limit() -> None:
    n, producer = run(({"i": i} for i in range(1000)), rate=0, limit=7)
    assert n == 7 and {t for t, _, _ in producer.sent} == {100.0}


def test_encoding_of_dicts_bytes_and_str() -> None:
    _, producer = run([{"a": 1.5}, b"raw", "text"])
    assert [v for _, _, v in producer.sent] == [b'{"a":1.5}', b"raw", b"text"]
    assert {t for _, t, _ in producer.sent} == {"samples"}


def test_failed_sends_raise_after_flush() -> None:
    with pytest.raises(RuntimeError, match="2 of 6 sends failed"):
        run([{}] * 6, fail_every=3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rate"):
        run([], rate=-1)
    with pytest.raises(ValueError, match="limit"):
        run([], limit=-1)


def test_progress_line() -> None:
    out = io.StringIO()
    run([{}] * 3, progress=out)
    assert "sent 3 messages" in out.getvalue()


def test_file_messages_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \nnot json\n')
    assert list(file_messages(path)) == [b'{"a": 1}', b"not json"]


@pytest.fixture
def fake_gnp_data(monkeypatch: pytest.MonkeyPatch):
    """A stand-in for gnp.data with the contract's shape (2 x 2 images, 3 classes)."""
    x = torch.tensor([[[[0.0, 1 / 3], [0.5, 1.0]]], [[[0.123456, 0.2], [0.3, 0.4]]],
                      [[[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float32)
    data = types.SimpleNamespace(x=x, y=torch.tensor([2, 0, 1]))
    ds = types.SimpleNamespace(train=data, test=data, input_shape=(1, 2, 2), num_classes=3)
    module = types.ModuleType("gnp.data")
    module.load_dataset = lambda name, root=None: ds  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gnp.data", module)
    return ds


def test_dataset_messages_follow_the_schema(fake_gnp_data) -> None:
    msgs = list(dataset_messages("toy"))
    assert [m["id"] for m in msgs] == ["toy/train/0", "toy/train/1", "toy/train/2"]
    assert msgs[0]["features"] == [0.0, 0.3333, 0.5, 1.0]  # rounded to 4 decimals
    assert msgs[1]["features"][0] == 0.1235
    assert [m["label"] for m in msgs] == [2, 0, 1]
    for m in msgs:
        raw = json.dumps(m).encode()
        assert len(raw) < 200  # no float32 noise like 0.12349999696016312
        s = parse_message(raw, 0, 0, (1, 2, 2), 3, 10_000)
        assert isinstance(s, Sample)


def test_dataset_messages_shuffle_is_seeded(fake_gnp_data) -> None:
    a = [m["id"] for m in dataset_messages("toy", "test", shuffle=True, seed=1)]
    b = [m["id"] for m in dataset_messages("toy", "test", shuffle=True, seed=1)]
    assert a == b and sorted(a) == ["toy/test/0", "toy/test/1", "toy/test/2"]
    with pytest.raises(ValueError, match="split"):
        next(dataset_messages("toy", "val"))


def test_real_digits_dataset_if_available() -> None:
    pytest.importorskip("sklearn")
    data = pytest.importorskip("gnp.data")
    if not hasattr(data, "load_dataset"):
        pytest.skip("gnp.data.load_dataset not written yet")
    first = next(dataset_messages("digits"))
    assert first["id"] == "digits/train/0" and len(first["features"]) == 64
    assert isinstance(parse_message(json.dumps(first).encode(), 0, 0, (1, 8, 8), 10, 10**6),
                      Sample)


def test_cli_args() -> None:
    parser = add_produce_args(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", "digits", "--rate", "50", "--limit", "10",
                              "--shuffle", "--seed", "3", "--topic", "x"])
    assert (args.dataset, args.rate, args.limit, args.shuffle, args.seed, args.topic) == \
        ("digits", 50.0, 10, True, 3, "x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "digits", "--file", "x.jsonl"])
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_cli_without_broker_fails_clearly(monkeypatch: pytest.MonkeyPatch, capsys,
                                          tmp_path: Path) -> None:
    monkeypatch.delenv("GNPD_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert produce_main(["--file", str(SCHEMAS / "examples.jsonl")]) == 2
    assert "--bootstrap-servers" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_file_to_real_broker(kafka_bootstrap: str, topic: str, capsys) -> None:
    lines = (SCHEMAS / "examples.jsonl").read_bytes().splitlines()
    code = produce_main(["--file", str(SCHEMAS / "examples.jsonl"), "--bootstrap-servers",
                         kafka_bootstrap, "--topic", topic, "--rate", "100"])
    assert code == 0
    assert f"sent {len(lines)} messages" in capsys.readouterr().err
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: list[bytes] = []
        for _ in range(50):
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(r.value for r in batch)
            if len(got) >= len(lines):
                break
    finally:
        consumer.close()
    assert sorted(got) == sorted(lines)


@pytest.mark.integration
def test_produce_rate_is_respected(kafka_bootstrap: str, topic: str) -> None:
    import time

    t0 = time.monotonic()
    n = produce(kafka_bootstrap, topic, ({"i": i} for i in range(21)), rate=20)
    elapsed = time.monotonic() - t0
    assert n == 21 and 0.95 <= elapsed < 5, elapsed  # 20 intervals of 1/20 s


@pytest.mark.integration
def test_cli_arrow_batches_to_real_broker(kafka_bootstrap: str, topic: str,
                                          fake_gnp_data) -> None:
    from daemon.arrow_batch import is_arrow, parse_arrow_batch

    code = produce_main(["--dataset", "toy", "--format", "arrow", "--batch", "2",
                         "--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--quiet"])
    assert code == 0
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: list = []
        for _ in range(50):
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(batch)
            if len(got) >= 2:
                break
    finally:
        consumer.close()
    assert len(got) == 2 and all(is_arrow(r.headers) for r in got)  # 3 samples in 2 + 1
    batches = sorted((parse_arrow_batch(r.value, 0, r.offset, 4, 3)[0] for r in got),
                     key=lambda b: b.ids[0].as_py())  # partitions may interleave them
    assert [b.ids.to_pylist() for b in batches] == [["toy/train/0", "toy/train/1"],
                                                     ["toy/train/2"]]
    assert [b.labels.tolist() for b in batches] == [[2, 0], [1]]
    assert batches[0].features[0].tolist() == pytest.approx([0.0, 1 / 3, 0.5, 1.0])


def test_cli_arrow_needs_a_dataset(capsys) -> None:
    assert produce_main(["--file", str(SCHEMAS / "examples.jsonl"), "--format", "arrow",
                         "--bootstrap-servers", "127.0.0.1:1"]) == 2
    assert "--format arrow" in capsys.readouterr().err


def test_cli_arrow_refuses_speech_samples(capsys) -> None:
    assert produce_main(["--dataset", "fsdd", "--format", "arrow",
                         "--bootstrap-servers", "127.0.0.1:1"]) == 2
    assert "JSON messages" in capsys.readouterr().err


def test_cli_reads_fsdd_from_data_dir(tmp_path, capsys) -> None:
    """--data-dir, as for `gnpd demo` and `gnp.experiments` (--data-root: the older name)."""
    for flag in ("--data-dir", "--data-root"):
        assert produce_main(["--dataset", "fsdd", flag, str(tmp_path / "none"),
                             "--bootstrap-servers", "127.0.0.1:1"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "none") in err, err
