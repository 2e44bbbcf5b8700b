"""Reference producer: stream a data set or a JSON-lines file to the samples topic.

``python -m daemon produce --dataset fashion-mnist --rate 200`` sends one message
per training sample (see ``schemas/sample.schema.json``)::

    {"id": "fashion-mnist/train/123", "features": [0.0, 0.0039, ...], "label": 9,
     "timestamp": 1718000000.123}

``--file PATH.jsonl`` sends each non-blank line as it is -- including invalid
ones, which is how to exercise the dead-letter topic by hand.

``--format arrow --batch N`` sends the data set as Arrow batch messages instead: N
samples per message as an Arrow IPC stream, with the header
``content-type: application/vnd.apache.arrow.stream`` (``schemas/arrow-batch.md``).
Keep a message under the broker's ``max.message.bytes`` (1 MB by default: N <= 300 for
784 float32 features) and ``GNPD_KAFKA__MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = [
    "ARROW_HEADERS",
    "add_produce_args",
    "arrow_batches",
    "dataset_messages",
    "file_messages",
    "fsdd_messages",
    "produce",
    "produce_main",
    "run_produce",
]

log = logging.getLogger(__name__)

Message = dict[str, Any] | bytes | str
_BLOCK = 1024  # dataset rows converted to lists at a time


def dataset_messages(name: str, split: str = "train", *, shuffle: bool = False, seed: int = 0,
                     root: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Messages for every sample of ``gnp.data.load_dataset(name)``'s ``split``.

    Features are flattened and rounded to 4 decimals (pixels / 255 for images);
    ``id`` is ``"<name>/<split>/<index>"``; ``timestamp`` is the send time.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fsdd":
        yield from fsdd_messages(root, split, shuffle=shuffle, seed=seed)
        return
    from gnp.data import load_dataset  # torch is imported only when a data set is used

    data = getattr(load_dataset(name, root=root), split)
    x = data.x.reshape(len(data.x), -1).numpy()
    y = data.y.numpy()
    order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
    for start in range(0, len(order), _BLOCK):
        idx = order[start:start + _BLOCK]
        # float64 before rounding: float32 0.1235 would print as 0.12349999696016312
        rows = np.round(x[idx].astype(np.float64), 4).tolist()
        for i, row, label in zip(idx.tolist(), rows, y[idx].tolist(), strict=True):
            yield {"id": f"{name}/{split}/{i}", "features": row, "label": label,
                   "timestamp": time.time()}


def fsdd_messages(root: str | Path | None, split: str = "train", *, shuffle: bool = False,
                  seed: int = 0) -> Iterator[dict[str, Any]]:
    """Speech messages (``schemas/speech-sample.schema.json``) for the FSDD recordings in
    ``root``: base64 16-bit PCM as recorded, the digit's word as transcript. ``split``
    is FSDD's official one (test: recordings 0-4 of every speaker and digit)."""
    if root is None:
        raise ValueError("fsdd: pass --data-dir, the directory of the FSDD WAV files")
    import base64
    import wave

    from gnp.fsdd import DIGIT_WORDS, OFFICIAL_TEST, fsdd_files

    files = [f for f in fsdd_files(root) if (f[3] in OFFICIAL_TEST) == (split == "test")]
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else range(len(files))
    for i in order:
        path, digit, speaker, index = files[int(i)]
        with wave.open(str(path), "rb") as w:
            rate, pcm = w.getframerate(), w.readframes(w.getnframes())
        yield {"id": f"fsdd/{path.stem}", "sample_rate": rate, "transcript": DIGIT_WORDS[digit],
               "audio_pcm16": base64.b64encode(pcm).decode("ascii"), "timestamp": time.time()}


ARROW_HEADERS = [("content-type", b"application/vnd.apache.arrow.stream")]


def arrow_batches(name: str, split: str = "train", batch: int = 256, *, shuffle: bool = False,
                  seed: int = 0, root: str | Path | None = None) -> Iterator[bytes]:
    """Arrow batch messages of ``batch`` samples each for ``load_dataset(name)``'s ``split``.

    Same ids as :func:`dataset_messages`; features float32 as loaded (pixels / 255).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if batch <= 0:
        raise ValueError(f"batch must be > 0 samples, got {batch}")
    from daemon.arrow_batch import encode_arrow_batch
    from gnp.data import load_dataset

    data = getattr(load_dataset(name, root=root), split)
    x = data.x.reshape(len(data.x), -1).numpy().astype(np.float32, copy=False)
    y = data.y.numpy()
    order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        yield encode_arrow_batch(x[idx], y[idx], [f"{name}/{split}/{i}" for i in idx.tolist()],
                                 np.full(len(idx), time.time()))


def file_messages(path: str | Path) -> Iterator[bytes]:
    """The non-blank lines of a JSON-lines file, as raw bytes (not validated)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _encode(message: Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


class _Progress:
    """Prints ``sent N (R msg/s)`` to a stream at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None, interval: float = 2.0) -> None:
        self.stream, self.interval = stream, interval
        self.start = self.last = time.monotonic()

    def update(self, sent: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < self.interval):
            return
        self.last = now
        rate = sent / max(now - self.start, 1e-9)
        end = "\n" if final else "\r"
        print(f"sent {sent} messages ({rate:,.0f} msg/s)", end=end, file=self.stream, flush=True)


def produce(bootstrap: str, topic: str, messages: Iterable[Message], rate: float | None = None,
            *, limit: int | None = None, progress: TextIO | None = None,
            producer: Any = None, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic,
            client_config: dict[str, Any] | None = None,
            headers: list[tuple[str, bytes]] | None = None) -> int:
    """Send messages to ``topic`` and wait until all are acknowledged.

    Args:
        bootstrap: Kafka bootstrap servers (ignored when ``producer`` is given).
        topic: destination topic.
        messages: dicts (sent as compact JSON) or bytes/str (sent as they are).
        rate: messages per second, kept to a schedule; None or 0 = as fast as possible.
        limit: send at most this many.
        progress: stream for a progress line every 2 s (e.g. ``sys.stderr``); None = quiet.
        producer: a KafkaProducer-like object to use instead of creating one.
        client_config: extra KafkaProducer arguments, e.g. the security options of
            ``KafkaSettings.client_kwargs()`` (``bootstrap`` wins over theirs).
        headers: Kafka headers of every message (e.g. :data:`ARROW_HEADERS`).

    Returns:
        Number of messages acknowledged by the broker.

    Raises:
        ValueError: for a negative rate or limit.
        RuntimeError: if some sends failed (after the rest were flushed).
    """
    if rate is not None and rate < 0:
        raise ValueError(f"rate must be >= 0 messages/s, got {rate}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    own = producer is None
    if own:
        from kafka import KafkaProducer

        config = {**(client_config or {}), "bootstrap_servers": bootstrap}
        producer = KafkaProducer(client_id="gnpd-producer", linger_ms=20,
                                 batch_size=512 * 1024, acks=1,
                                 **{"max_request_size": 4 << 20, **config})
    failures: list[BaseException] = []
    meter = _Progress(progress)
    start, sent = clock(), 0
    try:
        for message in itertools.islice(messages, limit):
            if rate:
                delay = start + sent / rate - clock()
                if delay > 0:
                    sleep(delay)
            extra = {"headers": headers} if headers else {}
            producer.send(topic, value=_encode(message), **extra).add_errback(failures.append)
            sent += 1
            meter.update(sent)
        producer.flush()
    finally:
        if own:
            producer.close()
    meter.update(sent, final=True)
    if failures:
        raise RuntimeError(f"{len(failures)} of {sent} sends failed; first: {failures[0]!r}")
    return sent


def add_produce_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``produce`` command's options to ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="data set name for gnp.data.load_dataset, "
                        "e.g. fashion-mnist or digits")
    source.add_argument("--file", type=Path, help="JSON-lines file; each line is sent as is")
    parser.add_argument("--format", choices=("json", "arrow"), default="json",
                        help="json: one message per sample (default); arrow: Arrow batch "
                             "messages of --batch samples (--dataset only)")
    parser.add_argument("--batch", type=int, default=256,
                        help="samples per Arrow batch message (default 256)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="which part of the data set (default train)")
    parser.add_argument("--data-dir", "--data-root", dest="data_root", type=Path, default=None,
                        help="data set directory (fsdd: the folder of its WAV recordings; "
                             "--data-root is the older name)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages per second (default 0 = as fast as possible)")
    parser.add_argument("--limit", type=int, default=None, help="send at most this many")
    parser.add_argument("--bootstrap-servers", default=None,
                        help="Kafka bootstrap servers (default GNPD_KAFKA__BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=None,
                        help="topic (default GNPD_KAFKA__TOPIC or samples)")
    parser.add_argument("--shuffle", action="store_true", help="send the data set in random order")
    parser.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def run_produce(args: argparse.Namespace) -> int:
    """Run the ``produce`` command; returns the process exit code."""
    from daemon.settings import SettingsError, load_settings

    try:
        kafka = load_settings().kafka
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    bootstrap = args.bootstrap_servers or kafka.bootstrap_servers
    if not bootstrap:
        print("error: no broker: pass --bootstrap-servers or set GNPD_KAFKA__BOOTSTRAP_SERVERS",
              file=sys.stderr)
        return 2
    headers = None
    if args.format == "arrow":
        if args.file is not None:
            print("error: --format arrow streams a --dataset; --file lines are sent as they "
                  "are", file=sys.stderr)
            return 2
        if args.batch <= 0:
            print(f"error: --batch must be > 0, got {args.batch}", file=sys.stderr)
            return 2
        if args.dataset == "fsdd":
            print("error: --format arrow carries fixed-size features; FSDD speech samples "
                  "are sent as JSON messages (leave --format out)", file=sys.stderr)
            return 2
        messages: Iterable[Message] = arrow_batches(
            args.dataset, args.split, args.batch, shuffle=args.shuffle, seed=args.seed,
            root=args.data_root)
        headers = ARROW_HEADERS
    elif args.file is not None:
        messages = file_messages(args.file)
    else:
        messages = dataset_messages(args.dataset, args.split, shuffle=args.shuffle,
                                    seed=args.seed, root=args.data_root)
    # Read the first message before connecting: a missing data set or folder is bad input
    # (exit 2, at once), not a broker error after the connection timeout.
    messages = iter(messages)
    try:
        first = next(messages, None)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if first is not None:
        messages = itertools.chain([first], messages)
    try:
        sent = produce(bootstrap, args.topic or kafka.topic, messages, args.rate,
                       limit=args.limit, progress=None if args.quiet else sys.stderr,
                       client_config=kafka.client_kwargs(), headers=headers)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - kafka errors: one line, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    log.info("sent %d messages to %s", sent, args.topic or kafka.topic)
    return 0


def produce_main(argv: list[str] | None = None) -> int:
    """Entry point: ``produce_main(["--file", "x.jsonl", "--bootstrap-servers", "h:9092"])``."""
    parser = argparse.ArgumentParser(prog="gnpd produce", description=__doc__.splitlines()[0])
    return run_produce(add_produce_args(parser).parse_args(argv))
