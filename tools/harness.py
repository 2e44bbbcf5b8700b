"""Shared parts of the fault-injection and soak tools: a real ``gnpd`` process, probes, read-back.

- :class:`DaemonProc` runs ``python -m daemon run`` as a child process (its own process
  group is not needed: the training child dies with it, ``PR_SET_PDEATHSIG``), logging to
  a file, against a broker the caller started (so messages outlive the daemon).
- :class:`Prober` sends a request every ``interval`` seconds from a thread and records the
  time, outcome, latency and the phase the caller set.
- :func:`stored_ids` reads every chunk file of a store back (the Arrow files themselves).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

__all__ = ["DaemonProc", "LogSeen", "Probe", "Prober", "attribute_kills", "cpu_seconds", "daemon_env",
           "digits_messages", "percentile", "poison_messages", "stored_ids", "summarize"]

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads); 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LogSeen(logging.Handler):
    """Sets ``event`` when a log record's message contains ``text`` (e.g. a relayed line of
    the training child)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def daemon_env(root: Path, bootstrap: str, topic: str, port: int, chunk: int,
               **extra: str) -> dict[str, str]:
    """Environment for ``python -m daemon run``: 8x8 digits, LeNet-300-100, quick schedule."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "GNPD_DATA_DIR": str(root), "GNPD_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "GNPD_KAFKA__TOPIC": topic, "GNPD_KAFKA__POLL_TIMEOUT_MS": "200",
           "GNPD_STORE__PATH": str(root / "store"), "GNPD_STORE__CHUNK_SIZE": str(chunk),
           "GNPD_MODEL__PATH": str(root / "models"), "GNPD_MODEL__INPUT_SHAPE": "[1,8,8]",
           "GNPD_SERVE__HOST": "127.0.0.1", "GNPD_SERVE__PORT": str(port),
           "GNPD_TRAIN__DEVICE": "cpu", "GNPD_TRAIN__SCHEDULE": "quick",
           "GNPD_TRAIN__MAX_ACCURACY_DROP": "1.0"}
    env.update(extra)
    return env


class DaemonProc:
    """``python -m daemon run`` in a subprocess, appending to ``log``."""

    def __init__(self, env: dict[str, str], log: Path, cwd: Path) -> None:
        self.env, self.log, self.cwd = env, log, cwd
        self.url = f"http://127.0.0.1:{env['GNPD_SERVE__PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--env-file", "/dev/null"],
                env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        """Log written since the last start."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            return f.read().decode("utf-8", errors="replace")

    def wait_serving(self, timeout: float = 180) -> float:
        """Seconds until ``/readyz`` answers 200; raises if the daemon exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive:
                raise RuntimeError(f"daemon exited:\n{self.text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def model(self) -> dict[str, Any]:
        try:
            r = httpx.get(f"{self.url}/v1/model", timeout=5)
            return r.json() if r.status_code == 200 else {}
        except httpx.TransportError:
            return {}

    def metric(self, name: str, total: bool = False, **labels: str) -> float | None:
        """A sample of /metrics, or with ``total`` the sum of all matching ones (None if
        absent or the daemon does not answer)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.TransportError:
            return None
        found = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        if not found:
            return None
        return sum(found) if total else found[0]


@dataclass
class Probe:
    t: float  # seconds since the prober started
    phase: str
    ok: bool
    latency: float
    status: str  # HTTP status code or the transport error's class name


@dataclass
class Prober:
    """Sends ``POST /v1/predict`` (or GET ``path``) every ``interval`` s from a thread."""

    url: str
    interval: float = 0.2
    path: str = "/v1/predict"
    body: Any = None
    timeout: float = 5.0
    phase: str = "warmup"
    probes: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe{self.path}", daemon=True)
        self.t0 = time.monotonic()

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            nxt = time.monotonic()
            while not self._stop.is_set():
                phase, start = self.phase, time.monotonic()
                try:
                    r = (client.post(self.path, json=self.body) if self.body is not None
                         else client.get(self.path))
                    ok, status = r.status_code == 200, str(r.status_code)
                except httpx.HTTPError as e:
                    ok, status = False, type(e).__name__
                end = time.monotonic()
                self.probes.append(Probe(round(start - self.t0, 3), phase, ok,
                                         round(end - start, 5), status))
                nxt = max(nxt + self.interval, end)
                self._stop.wait(max(0.0, nxt - time.monotonic()))


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def attribute_kills(probes: list[Probe], kills: list[tuple[float, str]]) -> None:
    """Move a probe that was in flight when the daemon was killed to the kill's phase."""
    for p in probes:
        for t, phase in kills:
            if p.t <= t <= p.t + p.latency + 0.05:
                p.phase = phase


def summarize(probes: list[Probe]) -> dict[str, dict[str, Any]]:
    """Per phase: requests, failures (by status), latency p50/p99/max of successes."""
    out: dict[str, dict[str, Any]] = {}
    for phase in dict.fromkeys(p.phase for p in probes):
        mine = [p for p in probes if p.phase == phase]
        lat = [p.latency for p in mine if p.ok]
        out[phase] = {
            "requests": len(mine), "failed": sum(not p.ok for p in mine),
            "failed_by_status": dict(Counter(p.status for p in mine if not p.ok)),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "latency_max_s": max(lat) if lat else None}
    return out


def stored_ids(store: Path) -> tuple[list[str], list[str]]:
    """Every ``id`` in the store's chunk files, and the names of files that could not be read."""
    ids: list[str] = []
    unreadable: list[str] = []
    for path in sorted((store / "chunks").glob("*.arrow")):
        try:
            with pa.memory_map(str(path), "r") as src:
                ids += ipc.open_file(src).read_all().column("id").to_pylist()
        except (OSError, pa.ArrowException) as e:
            unreadable.append(f"{path.name}: {e}")
    return ids, unreadable


def manifest_files(store: Path) -> set[str]:
    try:
        return {c["file"] for c in json.loads((store / "manifest.json").read_text())["chunks"]}
    except (OSError, ValueError, KeyError):
        return set()


def digits_messages(prefix: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` valid messages drawn from the 8x8 digits, ids ``<prefix>/<k>`` (unique per prefix)."""
    from gnp.data import load_dataset

    data = load_dataset("digits").train
    x = data.x.reshape(len(data.x), -1).numpy().astype(np.float64)
    y = data.y.numpy()
    idx = rng.integers(0, len(y), n)
    rows = np.round(x[idx], 4).tolist()
    return [{"id": f"{prefix}/{k}", "features": row, "label": int(y[i]),
             "timestamp": time.time()} for k, (i, row) in enumerate(zip(idx.tolist(), rows))]


def poison_messages(prefix: str) -> list[tuple[str, bytes]]:
    """(kind, raw bytes) of messages the daemon must dead-letter, never store."""
    good = [0.5] * 64
    return [
        ("invalid_json", b'{"id": "' + prefix.encode() + b'/x", "features": [0.1, '),
        ("not_utf8", b"\xff\xfe\x00garbage"),
        ("lone_surrogate_id", json.dumps({"id": "\ud800", "features": good, "label": 1}).encode()),
        ("bad_shape", json.dumps({"id": f"{prefix}/shape", "features": good[:63],
                                  "label": 1}).encode()),
        ("bad_label", json.dumps({"id": f"{prefix}/label", "features": good,
                                  "label": 99}).encode()),
        ("non_finite", b'{"id": "' + prefix.encode() + b'/nan", "features": [NaN'
         + b", 0.5" * 63 + b'], "label": 1}'),
    ]
