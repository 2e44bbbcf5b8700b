"""The daemon: wires store, registry, serving, updater, ingestion (and a broker) together.

Start-up order puts serving first: the latest checkpoint is loaded and served, and
the HTTP server answers, before the broker, the updater and ingestion start. Shut-down
runs the other way: ingestion stops (its open buffer is simply read again from Kafka
next time), a running update finishes or is abandoned within
``settings.train.stop_timeout_seconds``, the HTTP server closes, the embedded broker
stops. Everything durable is written atomically, so a crash at any point loses nothing
that was durable.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from daemon.admin import admin_router
from daemon.control import ModelControl
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ModelVersion, ServedModel
from daemon.auth import require_token
from daemon.serving import HttpServer, create_app, freeze_heap
from daemon.settings import Settings
from daemon.store import ChunkStore
from daemon.updater import UpdatePolicy, UpdateResult, UpdateWorker

__all__ = ["Daemon", "StoreMismatchError"]

log = logging.getLogger(__name__)


def _set_torch_threads(threads: int) -> None:
    """Torch intra-op threads of this process (serving's forward pass); 0 = torch's default.

    The training child sets its own (``GNPD_TRAIN__TORCH_THREADS``); with one thread here a
    forward pass of a small model leaves the other cores to HTTP and ingestion.
    """
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        log.info("torch uses %d intra-op thread(s) for serving", threads)


class StoreMismatchError(RuntimeError):
    """The latest checkpoint learnt from another store than the one configured."""


class Daemon:
    """The gnpd service; a context manager (``with Daemon(settings) as d: d.run()``).

    Args:
        settings: all configuration.
        metrics: the metrics to record (a fresh set by default).
        policy: overrides the update policy built from ``settings.train`` (tests use a
            tiny schedule).
        on_update: called with every :class:`UpdateResult`, from the update thread.
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None,
                 policy: UpdatePolicy | None = None,
                 on_update: Callable[[UpdateResult], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.policy = policy or UpdatePolicy.from_settings(settings)
        self.on_update = on_update
        m = settings.model
        self.served = ServedModel(m.input_shape, settings.serve.model, m.name)
        self.registry = ModelRegistry(m.path, m.name, m.input_shape, m.num_classes)
        self.store: ChunkStore | None = None
        self.control: ModelControl | None = None
        self.http: HttpServer | None = None
        self.broker: Any = None
        self.updater: UpdateWorker | None = None
        self.ingestor: Any = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        """Base URL of the HTTP server (once started)."""
        if self.http is None:
            raise RuntimeError("daemon not started")
        return self.http.url

    @property
    def bootstrap_servers(self) -> str:
        """The broker the daemon consumes from (the embedded one if none is configured)."""
        return self.settings.kafka.bootstrap_servers

    def start(self) -> Daemon:
        """Serve the latest checkpoint, then start the broker, updater and ingestion."""
        s = self.settings
        _set_torch_threads(s.serve.torch_threads)
        try:
            try:  # the configured name, shape and classes must make a model, or every
                self.registry.build()  # update would fail in the training child
            except ValueError as e:
                raise ValueError(f"GNPD_MODEL__NAME={s.model.name}, GNPD_MODEL__INPUT_SHAPE="
                                 f"{s.model.input_shape}: {e}") from None
            from daemon.speech_store import codec_for  # a speech model keeps speech chunks

            self.store = ChunkStore(s.store.path, s.store.chunk_size, s.model.input_shape,
                                    s.store.val_fraction, s.store.write_behind,
                                    codec=codec_for(s.model.name))
            self.control = self._serve_latest()
            self.http = HttpServer(self._app(self.control), s.serve.host, s.serve.port)
            self.http.start()
            self._start_broker()
            self.updater = UpdateWorker(self.store, self.registry, self.served, self.metrics,
                                        self.policy, on_result=self.on_update,
                                        control=self.control)
            self.updater.prune()
            self.updater.start()
            self._start_ingestion()
        except BaseException:
            self.stop()
            raise
        log.debug("%d start-up objects kept off the garbage collector", freeze_heap())
        log.info("gnpd running: model %s %s, store %s, HTTP %s, Kafka %s topic %s",
                 s.model.name, s.model.input_shape, s.store.path, self.http.url,
                 self.bootstrap_servers, s.kafka.topic)
        return self

    def _same_store(self, version: ModelVersion) -> bool:
        """True if ``version`` learnt from this store (legacy versions: by their chunks)."""
        assert self.store is not None
        if version.store_id:
            return version.store_id == self.store.store_id
        return set(version.seen_chunk_ids) <= {str(c.id) for c in self.store.chunks()}

    def _check_store(self, latest: tuple[Any, ModelVersion] | None) -> bool:
        """Raise StoreMismatchError (or, when told, warn) if ``latest`` is another store's."""
        if latest is None or self._same_store(latest[1]):
            return True
        assert self.store is not None
        v = latest[1]
        what = (f"learnt from store {v.store_id}" if v.store_id else
                f"learnt chunks {list(v.seen_chunk_ids)[:5]}... that the store does not hold")
        text = (f"the latest checkpoint {self.registry.file(v.version)} (version {v.version}) "
                f"{what}, but the store at {self.store.path} is {self.store.store_id}: "
                f"checkpoints of another store would skip learning this store's chunks")
        if self.settings.model.on_store_mismatch == "refuse":
            raise StoreMismatchError(
                f"{text}. Point GNPD_DATA_DIR (or GNPD_STORE__PATH and GNPD_MODEL__PATH) at "
                f"matching folders, or set GNPD_MODEL__ON_STORE_MISMATCH=fresh (gnpd run "
                f"--on-store-mismatch fresh) to learn this store from scratch; the other "
                f"store's checkpoints stay on disk")
        log.warning("%s; GNPD_MODEL__ON_STORE_MISMATCH=fresh: ignoring checkpoints of other "
                    "stores", text)
        return False

    def _app(self, control: ModelControl) -> Any:
        """The HTTP app: serving routes plus the admin routes (rollback, pin), all but the
        probes and /metrics behind the API token when one is set."""
        serve = self.settings.serve
        admin = admin_router(self.served, self.registry, self.metrics, control=control,
                             auth=require_token(serve.api_token))
        return create_app(self.served, self.metrics, self.registry.history, serve=serve,
                          routers=[admin], model_status=control.status)

    def _serve_latest(self) -> ModelControl:
        """Serve the latest checkpoint of this store (or the pinned one)."""
        assert self.store is not None
        self.registry.clean()
        latest = self.registry.latest()
        if not self._check_store(latest):
            latest = self.registry.latest(accept=self._same_store)
        control = ModelControl(self.served, self.registry, self.metrics, self.store.store_id)
        control.start(latest)
        version = self.served.version
        if version is None:
            log.info("no checkpoint in %s: serving starts after the first update",
                     self.registry.path)
        else:
            log.info("serving checkpoint version %d (val accuracy %.4f)",
                     version.version, version.val_accuracy)
        return control

    def _start_broker(self) -> None:
        if self.settings.kafka.bootstrap_servers:
            return
        from daemon.broker import EmbeddedBroker

        self.broker = EmbeddedBroker().start()
        kafka = self.settings.kafka.model_copy(
            update={"bootstrap_servers": self.broker.bootstrap_servers})
        self.settings = self.settings.model_copy(update={"kafka": kafka})

    def _start_ingestion(self) -> None:
        from daemon.ingest import Ingestor

        assert self.store is not None and self.updater is not None
        self.ingestor = Ingestor.from_settings(self.settings, self.store, self.metrics,
                                               on_sealed=self.updater.notify)
        self.ingestor.start()

    def stop(self) -> bool:
        """Stop in order: ingestion, update (bounded), HTTP, broker. Safe to call twice.

        Returns False when ingestion or a running update did not stop within its bound
        (their threads are left behind; nothing durable is half written).
        """
        self._stop.set()
        clean = True
        ingestor, self.ingestor = self.ingestor, None
        if ingestor is not None and not ingestor.stop(timeout=15):
            log.warning("ingestion did not stop within 15s")
            clean = False
        updater, self.updater = self.updater, None
        if updater is not None:
            clean = updater.stop() and clean
        http, self.http = self.http, None
        if http is not None:
            http.stop()
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()
        store, self.store = self.store, None
        if store is not None:
            store.close()  # releases the store's lock for the next process
        gc.unfreeze()  # what start-up built may be garbage now (a process that goes on)
        log.info("gnpd stopped")
        return clean

    def request_stop(self) -> None:
        """Make :meth:`run` return (thread- and signal-safe)."""
        self._stop.set()

    def run(self, until: Callable[[], bool] | None = None, poll: float = 0.5,
            before_stop: Callable[[], None] | None = None) -> bool:
        """Block until SIGTERM/SIGINT, :meth:`request_stop` or ``until()``; then stop.

        Signal handlers are installed only when called from the main thread; a second
        signal while stopping exits the process at once (safe: every write is atomic).
        ``before_stop`` runs just before the components stop. Returns :meth:`stop`'s value.
        """
        restore = self._install_signal_handlers()
        try:
            while not self._stop.wait(poll):
                if until is not None and until():
                    break
        finally:
            if before_stop is not None:
                before_stop()
            clean = self.stop()
            for sig, handler in restore.items():
                signal.signal(sig, handler)
        return clean

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handle(sig: int, frame: FrameType | None) -> None:
            name = signal.Signals(sig).name
            if self._stop.is_set():
                log.warning("received %s again while stopping: exiting now", name)
                if self.broker is not None:  # an embedded broker must not outlive us
                    self.broker.stop(timeout=1)
                logging.shutdown()
                os._exit(128 + sig)
            log.info("received %s: stopping (send it again to exit at once)", name)
            self._stop.set()

        return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
