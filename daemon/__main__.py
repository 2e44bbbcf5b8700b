"""Command line: ``python -m daemon run|demo|produce`` (also installed as ``gnpd``).

- ``run``: the daemon, configured from ``GNPD_*`` environment variables (and ``.env``);
  stops cleanly on SIGTERM/SIGINT. Invalid settings exit with code 2 and name the field.
- ``demo``: embedded broker + daemon + the reference producer streaming Fashion-MNIST
  (scikit-learn digits where Fashion-MNIST is not installed), or FSDD speech
  (``--dataset fsdd --data-dir DIR``: the tiny speech model, WER per version); prints a
  line per update and stops after ``--updates`` successful updates or on Ctrl-C.
- ``produce``: the reference producer (``daemon/producer.py``).
- ``store rebuild-manifest [--store PATH]``: write a new ``manifest.json`` from the chunk
  files when it is lost or corrupt (the daemon refuses to start then). Input shape, chunk
  size and validation share come from the ``GNPD_*`` settings; the store must not be in use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("daemon")

# Demo pacing for a 2-core CPU: a chunk seals every 10-20 s and a quick-schedule update
# of a few thousand samples takes 7-20 s there, so the first version appears after about
# 30 s and five updates take about two minutes (Fashion-MNIST: ~50% -> ~70% accuracy,
# 3-8x fewer active parameters). Chunks that seal during an update join the next one.
# Chunks big enough, and a validation share large enough, that the validation set holds
# 500+ samples from the first version on (one sample is 0.2%, not a percent): the
# accuracy the versions print is then a measurement, and it rises as data arrives.
_DEMO = {
    "fashion-mnist": {"chunk_size": 2500, "val_fraction": 0.2, "rate": 500.0,
                      "input_shape": [1, 28, 28]},
    "digits": {"chunk_size": 400, "val_fraction": 0.25, "rate": 80.0, "input_shape": [1, 8, 8]},
    # Speech: FSDD's 1,800 training recordings in 4 chunks of 450 (20% validation: 90+
    # utterances, WER steps of about 1%), deepspeech2-hlstm with the quick speech schedule:
    # 40-90 s an update on 2 cores. The tiny model (--model deepspeech2-hlstm-tiny) is
    # faster but learns nothing in the quick schedule (measured: 100% WER after 300-600
    # recordings; 70% took 48 epochs).
    "fsdd": {"chunk_size": 450, "val_fraction": 0.2, "rate": 40.0, "model": "deepspeech2-hlstm"},
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if level != "DEBUG":  # kafka-python narrates every connection at INFO
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _cmd_run(args: argparse.Namespace) -> int:
    from daemon.settings import SettingsError, load_settings

    _configure_logging(args.log_level)
    overrides = {"model": {"on_store_mismatch": args.on_store_mismatch}} \
        if args.on_store_mismatch else {}
    try:
        settings = load_settings(env_file=_env_file(args.env_file), **overrides)
    except SettingsError as e:
        print(f"gnpd: {e}", file=sys.stderr)
        return 2
    from daemon.app import Daemon

    try:
        daemon = Daemon(settings).start()
    except KeyboardInterrupt:  # Ctrl-C while starting: start() has stopped what it began
        print("gnpd: interrupted while starting", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - start-up failures: one clear line and exit 1
        log.debug("start-up failed", exc_info=True)
        in_data = isinstance(e, OSError) and str(getattr(e, "filename", "") or "").startswith(
            str(settings.data_dir))
        hint = (f" (the data directory is GNPD_DATA_DIR={settings.data_dir}: set it to a "
                f"writable folder)" if in_data else "")
        print(f"gnpd: could not start: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1
    return _exit(daemon.run())


def _env_file(path: str | None) -> str:
    """The dotenv file to read: ``.env`` when none is named (read only if it exists); a file
    named with --env-file must exist (a mistyped one must not start on the defaults)."""
    from daemon.settings import SettingsError

    if path is None:
        return ".env"
    if not Path(path).exists():  # exists, not is_file: /dev/null means "none"
        raise SettingsError(f"--env-file {path}: no such file")
    return path


def _exit(clean: bool) -> int:
    """Exit code 0; if an update thread is still inside torch, leave without finalizers.

    Interpreter shut-down with a thread still running torch code can abort the process
    ("terminate called without an active exception"); os._exit skips that, and nothing
    is lost: every durable write is atomic.
    """
    if not clean:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _demo_dataset(requested: str | None) -> str:
    if requested:
        return requested
    from gnp.data import fashion_mnist_available

    if fashion_mnist_available():
        return "fashion-mnist"
    print("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): "
          "streaming scikit-learn's 8x8 digits instead.")
    return "digits"


def _demo_settings(args: argparse.Namespace, dataset: str) -> Any:
    from daemon.settings import load_settings

    pace = _DEMO[dataset]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gnpd-demo-"))
    model = {"name": args.model or pace["model"]} if "model" in pace else {  # speech
        "name": "lenet-300-100", "input_shape": pace["input_shape"], "num_classes": 10}
    return load_settings(
        env_file=None,
        kafka={"bootstrap_servers": "", "topic": "samples"},
        store={"path": root / "store", "chunk_size": args.chunk_size or pace["chunk_size"],
               "val_fraction": pace["val_fraction"]},
        model={**model, "path": root / "models"},
        serve={"host": "127.0.0.1", "port": args.port},
        train={"schedule": args.schedule, "device": args.device})


def _print_update(result: Any) -> None:
    if result.outcome != "success":
        print(f"  update {result.outcome}: {result.reason or '-'} "
              f"(chunks {', '.join(result.chunk_ids)})", flush=True)
        return
    v = result.version
    from gnp.models import SPEECH_MODELS

    quality = (f"val WER {1.0 - v.val_accuracy:6.2%}" if v.model_name in SPEECH_MODELS else
               f"val accuracy {v.val_accuracy:6.2%}")
    print(f"  v{v.version:<3d} {quality}   params "
          f"{v.active_params:>7,} / {v.dense_params:,} ({v.compression:4.1f}x smaller)   "
          f"cost {v.cost.epochs:5.2f} epochs, {v.cost.wall_seconds:5.1f} s on {v.cost.device}"
          f"   chunks {', '.join(v.chunk_ids)}", flush=True)


def _stream(messages: Iterator[Any], stop: threading.Event) -> Iterator[Any]:
    for m in messages:
        if stop.is_set():
            return
        yield m


def _cmd_demo(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    if args.log_level != "DEBUG":  # the producer's idempotence notice is noise in a demo
        logging.getLogger("kafka").setLevel(logging.ERROR)
    dataset = _demo_dataset(args.dataset)
    problem = _demo_data_problem(dataset, args.data_dir)
    if args.model and dataset != "fsdd":
        problem = "--model chooses the speech model of --dataset fsdd"
    if problem:
        print(f"gnpd demo: {problem}", file=sys.stderr)
        return 2
    from daemon.settings import SettingsError

    try:
        settings = _demo_settings(args, dataset)
    except SettingsError as e:  # e.g. --port 70000, or a bad GNPD_* variable
        print(f"gnpd demo: {e}", file=sys.stderr)
        return 2
    from daemon.app import Daemon

    rate = args.rate or _DEMO[dataset]["rate"]
    successes: list[Any] = []
    fed = threading.Event()
    drained = _Drained(fed)
    daemon = Daemon(settings, on_update=lambda r: (
        _print_update(r), drained.note(), r.outcome == "success" and successes.append(r)))
    drained.daemon = daemon
    try:
        daemon.start()
    except Exception as e:  # noqa: BLE001 - e.g. the port is taken: say so and exit
        print(f"gnpd demo: could not start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    url = daemon.url
    print(f"\ngnpd demo: {dataset}, chunks of {settings.store.chunk_size} samples at "
          f"{rate:g} samples/s, schedule '{settings.train.schedule}'\n"
          f"  model      {url}/v1/model\n  metrics    {url}/metrics\n  API docs   {url}/docs\n"
          f"  data       {settings.store.path.parent}\n"
          f"Stops after {args.updates} updates (Ctrl-C to stop now). The first version "
          f"appears once the first chunk has sealed and trained.\n", flush=True)
    stop = threading.Event()
    _start_feed(daemon.bootstrap_servers, settings.kafka.topic, dataset, rate, stop,
                args.data_dir, fed)
    status = _Status(daemon)

    try:
        clean = daemon.run(until=lambda: len(successes) >= args.updates or drained()
                           or status.tick(),
                           before_stop=stop.set)  # quiet the producer before the broker goes
    finally:
        stop.set()
    print(f"gnpd demo: done after {len(successes)} update(s); checkpoints and chunks stay in "
          f"{settings.store.path.parent}", flush=True)
    return _exit(clean)


def _demo_data_problem(dataset: str, data_dir: str | None) -> str | None:
    """Why the demo cannot stream ``dataset`` (FSDD needs its recordings); None if it can."""
    if dataset != "fsdd":
        return None
    if not data_dir:
        return ("--dataset fsdd needs --data-dir DIR, the folder of FSDD's "
                "{digit}_{speaker}_{n}.wav recordings")
    from gnp.fsdd import fsdd_files

    try:
        fsdd_files(data_dir)  # raises when the folder is missing or holds no recordings
    except OSError as e:
        return f"{e} (--data-dir)"
    return None


def _start_feed(bootstrap: str, topic: str, dataset: str, rate: float,
                stop: threading.Event, data_dir: str | None = None,
                fed: threading.Event | None = None) -> None:
    """Stream the data set's training samples to the topic from a thread until ``stop``."""
    from daemon.producer import dataset_messages, fsdd_messages, produce

    messages = (fsdd_messages(data_dir, shuffle=True) if dataset == "fsdd" else
                dataset_messages(dataset, shuffle=True))

    def feed() -> None:
        try:
            n = produce(bootstrap, topic, _stream(messages, stop), rate)
            if not stop.is_set():
                print(f"  producer: all {n:,} {dataset} training samples sent", flush=True)
                if fed is not None:
                    fed.set()
        except Exception as e:  # noqa: BLE001 - after a stop the broker may be gone already
            if not stop.is_set():
                print(f"  producer failed: {type(e).__name__}: {e}", flush=True)

    threading.Thread(target=feed, name="demo-producer", daemon=True).start()


class _Drained:
    """True once the producer has sent everything and nothing is left to learn: no update
    runs and none is pending, or the last update ended after the last seal (it failed,
    and no new chunk will come to retry it). A grace period lets ingestion catch up."""

    def __init__(self, fed: threading.Event, grace: float = 10.0) -> None:
        self.fed, self.grace, self.daemon = fed, grace, None
        self.fed_at: float | None = None
        self.chunks_at_update = -1

    def note(self) -> None:
        """An update ended (called from the update thread)."""
        store = getattr(self.daemon, "store", None)
        self.chunks_at_update = len(store.chunks()) if store is not None else -1

    def __call__(self) -> bool:
        d = self.daemon
        if not self.fed.is_set() or d is None or d.updater is None or d.store is None:
            return False
        self.fed_at = self.fed_at or time.monotonic()
        if time.monotonic() - self.fed_at < self.grace or d.updater.busy:
            return False
        return not d.updater.pending() or self.chunks_at_update == len(d.store.chunks())


class _Status:
    """Prints what the daemon is doing every 15 s while the demo waits for updates."""

    def __init__(self, daemon: Any, every: float = 15.0) -> None:
        self.daemon, self.every, self.next = daemon, every, time.monotonic() + every

    def tick(self) -> bool:
        if time.monotonic() >= self.next:
            self.next += self.every
            m = self.daemon.metrics.registry.get_sample_value
            busy = self.daemon.updater is not None and self.daemon.updater.busy
            print(f"  ... {m('gnp_ingest_samples_total') or 0:,.0f} samples ingested, "
                  f"{m('gnp_store_chunks') or 0:.0f} chunks sealed, "
                  f"{m('gnp_store_buffered_samples') or 0:,.0f} not yet learnt"
                  f"{', update running' if busy else ''}", flush=True)
        return False


def _cmd_produce(args: argparse.Namespace) -> int:
    from daemon.producer import run_produce

    _configure_logging(args.log_level)
    return run_produce(args)


def _cmd_store_rebuild(args: argparse.Namespace) -> int:
    from daemon.manifest import StoreError
    from daemon.rebuild import rebuild_manifest
    from daemon.settings import SettingsError, load_settings

    _configure_logging(args.log_level)
    try:
        settings = load_settings(env_file=_env_file(args.env_file))
    except SettingsError as e:
        print(f"gnpd: {e}", file=sys.stderr)
        return 2
    store = Path(args.store) if args.store else settings.store.path
    if not (store / "chunks").is_dir():
        print(f"gnpd: {store} is not a store (no chunks/ folder)", file=sys.stderr)
        return 1
    try:
        done = rebuild_manifest(store, tuple(settings.model.input_shape),
                                settings.store.chunk_size, settings.store.val_fraction,
                                store_id=args.store_id,
                                adopt_store_id=lambda chunks: _checkpoint_store_id(
                                    settings.model.path, {str(c.id) for c in chunks}),
                                kind="speech" if settings.model.speech else "image")
    except (StoreError, OSError) as e:
        print(f"gnpd: {e}", file=sys.stderr)
        return 1
    m = done.manifest
    if done.old_manifest is not None:
        print(f"moved the old manifest to {done.old_manifest}")
    print(f"rebuilt {store / 'manifest.json'}: {len(m.chunks)} chunk(s), "
          f"{sum(c.rows for c in m.chunks):,} samples, next offsets "
          f"{ {p: o for p, o in sorted(m.next_offsets.items())} }, store id {m.store_id} "
          f"({done.store_id_source})")
    for name, reason in done.skipped:
        print(f"  left out {name}: {reason} (the file stays where it is)")
    return 0


def _checkpoint_store_id(models: Path, chunk_ids: set[str]) -> str | None:
    """The store id of the newest checkpoint in ``models`` if it learnt only ``chunk_ids``."""
    import json

    for meta in sorted(models.glob("v*.json"), reverse=True):
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        seen = {str(c) for c in doc.get("seen_chunk_ids", ())}
        if doc.get("store_id") and seen <= chunk_ids:
            print(f"taking the store id of checkpoint {meta}: every chunk it learnt is here")
            return str(doc["store_id"])
        return None
    return None


def _add_store_commands(sub: Any, common: Any) -> None:
    store = sub.add_parser("store", help="maintenance of the chunk store")
    cmds = store.add_subparsers(dest="store_command", required=True)
    rebuild = cmds.add_parser(
        "rebuild-manifest", parents=[common("INFO")],
        help="write manifest.json anew from the chunk files (a lost or corrupt manifest)")
    rebuild.add_argument("--store", default=None,
                         help="the store folder (default: the configured store path)")
    rebuild.add_argument("--store-id", default=None, help="the store identity to record "
                         "(default: the old manifest's when it can be read, else the newest "
                         "checkpoint's when it learnt only chunks found here, else a new one)")
    rebuild.add_argument("--env-file", default=None,
                        help="dotenv file to read (default: .env, if there is one)")
    rebuild.set_defaults(func=_cmd_store_rebuild)


def _parser() -> argparse.ArgumentParser:
    def common(default: str) -> argparse.ArgumentParser:
        c = argparse.ArgumentParser(add_help=False)
        c.add_argument("--log-level", type=str.upper, default=os.environ.get(
            "GNPD_LOG_LEVEL", default), choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help=f"logging level (default $GNPD_LOG_LEVEL or {default})")
        return c

    p = argparse.ArgumentParser(prog="gnpd", description="gnpd: a streaming continual-learning "
                                "daemon (Kafka -> Arrow chunks -> grow-and-prune -> HTTP serving)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common("INFO")],
                         help="run the daemon (settings from GNPD_* env vars)")
    run.add_argument("--env-file", default=None,
                        help="dotenv file to read (default: .env, if there is one)")
    run.add_argument("--on-store-mismatch", choices=["refuse", "fresh"], default=None,
                     help="the latest checkpoint learnt from another store: refuse to start "
                     "(default) or learn this store from scratch (GNPD_MODEL__ON_STORE_MISMATCH)")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", parents=[common("WARNING")],
                          help="broker + daemon + producer: watch the model learn")
    demo.add_argument("--updates", type=int, default=5, help="stop after N updates (default 5)")
    demo.add_argument("--dataset", choices=sorted(_DEMO), default=None,
                      help="default fashion-mnist when installed, else digits; fsdd: spoken "
                      "digits learnt by the tiny speech model (needs --data-dir)")
    demo.add_argument("--data-dir", default=None,
                      help="fsdd: the folder of the FSDD WAV recordings")
    demo.add_argument("--model", default=None,
                      choices=["deepspeech2-hlstm", "deepspeech2-hlstm-tiny"],
                      help="fsdd: the speech model (default deepspeech2-hlstm)")
    demo.add_argument("--rate", type=float, default=None, help="samples per second")
    demo.add_argument("--chunk-size", type=int, default=None, help="samples per chunk")
    demo.add_argument("--schedule", choices=["quick", "paper"], default="quick")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    demo.add_argument("--dir", default=None, help="folder for chunks and checkpoints "
                      "(default a new temp folder)")
    demo.set_defaults(func=_cmd_demo)

    from daemon.producer import add_produce_args

    produce = sub.add_parser("produce", parents=[common("WARNING")],
                             help="stream labelled samples to the topic")
    add_produce_args(produce)
    produce.set_defaults(func=_cmd_produce)
    _add_store_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gnpd`` and ``python -m daemon``; returns the exit code."""
    args = _parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
