"""A real gnpd + Prometheus stack on loopback, for the live test and the dashboard rendering.

:class:`LiveStack` starts, as child processes:

- ``python -m daemon run`` with an empty ``GNPD_KAFKA__BOOTSTRAP_SERVERS``, so the daemon
  starts its embedded Kafka-protocol broker (Tansu); tiny settings (LeNet-300-100 on 8x8
  digits, chunks of 200 samples, the quick schedule) so updates take seconds on a CPU;
- ``python -m daemon produce --dataset digits`` against that broker, again and again, plus a
  few invalid messages so the rejection panels have something to show;
- ``/usr/bin/prometheus`` (Debian's package) scraping the daemon every second and loading
  deploy/prometheus/alerts.yml, with a temporary storage folder.

With ``speech_dir`` (FSDD's WAV folder) the daemon learns speech instead: the
``deepspeech2-hlstm`` model, the producer streams FSDD recordings, and the predict
requests carry audio, so the speech panels (word error rate) have data.

A background thread sends predict requests so the latency panels have data. Every process
listens on 127.0.0.1 only, and :meth:`LiveStack.stop` ends exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["LiveStack", "StackError", "prometheus_binary"]

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"

# Invalid messages the producer's --file mode sends as they are: one per rejection reason
# that a JSON line can trigger without a huge payload.
_BAD_MESSAGES = [
    "this is not json",
    "[1, 2, 3]",
    '{"features": [0.5, 0.5]}',
    '{"id": "bad/1", "features": [0.5, 0.5], "label": 1}',
    '{"id": "bad/2", "features": [' + ", ".join(["0.1"] * 64) + '], "label": 99}',
]


class StackError(RuntimeError):
    """A part of the live stack did not start or answer in time."""


def prometheus_binary() -> str | None:
    """Path of the Prometheus server binary (Debian package ``prometheus``), if installed."""
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class LiveStack:
    """Daemon, producer loop, predict traffic and Prometheus; a context manager.

    Args:
        workdir: folder for the store, checkpoints, Prometheus' storage and the logs.
        rate: samples per second the producer sends.
        chunk_size: samples per chunk (an update runs per sealed chunk).
        predict_rate: predict requests per second.
        python: interpreter that runs the daemon (default: this one).
        speech_dir: FSDD's folder of WAV recordings: learn speech (deepspeech2-hlstm).
    """

    def __init__(self, workdir: str | Path, *, rate: float = 100.0, chunk_size: int = 200,
                 predict_rate: float = 5.0, python: str = sys.executable,
                 speech_dir: str | Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.speech_dir = Path(speech_dir) if speech_dir is not None else None
        self.rate, self.chunk_size, self.predict_rate = rate, chunk_size, predict_rate
        self.python = python
        self.daemon_url = ""
        self.prometheus_url = ""
        self.bootstrap = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.predictions = 0

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> LiveStack:
        """Start everything; returns once the daemon and Prometheus answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_daemon(timeout)
            self._start_prometheus(timeout)
            for target in (self._produce_loop, self._predict_loop):
                thread = threading.Thread(target=target, name=target.__name__, daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the traffic threads, then every process this stack started."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        for name in ("producer", "prometheus", "daemon"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LiveStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, name: str) -> str:
        """The tail of a component's log (``daemon``, ``prometheus``, ``producer``)."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # ---- processes ---------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self._procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                 cwd=self.workdir, env=env)

    def _start_daemon(self, timeout: float) -> None:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GNPD_")}
        env.update({
            "GNPD_KAFKA__BOOTSTRAP_SERVERS": "",        # the daemon starts its embedded broker
            "GNPD_MODEL__NAME": "lenet-300-100",
            "GNPD_MODEL__INPUT_SHAPE": "[1,8,8]",
            "GNPD_STORE__CHUNK_SIZE": str(self.chunk_size),
            "GNPD_STORE__PATH": str(self.workdir / "store"),
            "GNPD_MODEL__PATH": str(self.workdir / "models"),
            "GNPD_SERVE__HOST": "127.0.0.1",
            "GNPD_SERVE__PORT": str(port),
            "GNPD_TRAIN__SCHEDULE": "quick",
            "GNPD_TRAIN__DEVICE": "cpu",
        })
        if self.speech_dir is not None:
            del env["GNPD_MODEL__INPUT_SHAPE"]
            env.update({"GNPD_MODEL__NAME": "deepspeech2-hlstm", "GNPD_STORE__VAL_FRACTION": "0.2"})
        self._spawn("daemon", [self.python, "-m", "daemon", "run", "--env-file", "/dev/null"],
                    {**env, "PYTHONPATH": str(REPO)})
        # The daemon logs "gnpd running: ... Kafka <bootstrap> topic <topic>" once started.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"gnpd running: .* Kafka (\S+) topic", self.log("daemon"))
            if match:
                self.bootstrap = match.group(1)
                break
            self._check_alive("daemon")
            time.sleep(0.2)
        else:
            raise StackError(f"daemon did not start in {timeout:.0f}s:\n{self.log('daemon')}")
        self.daemon_url = f"http://127.0.0.1:{port}"
        if _get(self.daemon_url + "/healthz")[0] != 200:
            raise StackError(f"daemon /healthz is not 200:\n{self.log('daemon')}")

    def _start_prometheus(self, timeout: float) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise StackError("prometheus not installed (apt-get install -y prometheus)")
        port = _free_port()
        target = self.daemon_url.removeprefix("http://")
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
            "scrape_configs:\n  - job_name: gnpd\n    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n")
        self._spawn("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
            "--log.level=warn"])
        self.prometheus_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("prometheus")
            try:
                if _get(self.prometheus_url + "/-/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise StackError(f"prometheus not ready in {timeout:.0f}s:\n{self.log('prometheus')}")

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def _produce_loop(self) -> None:
        """A few bad messages, then the digits (a new order each pass), over and over."""
        bad = self.workdir / "bad.jsonl"
        bad.write_text("\n".join(_BAD_MESSAGES) + "\n")
        base = [self.python, "-m", "daemon", "produce", "--bootstrap-servers", self.bootstrap,
                "--quiet"]
        data = (["--dataset", "digits"] if self.speech_dir is None else
                ["--dataset", "fsdd", "--data-dir", str(self.speech_dir)])
        rounds = 0
        while not self._stop.is_set():
            args = base + (["--file", str(bad)] if rounds % 2 == 0 else
                           [*data, "--shuffle", "--seed", str(rounds), "--rate", str(self.rate)])
            self._spawn("producer", args, {**os.environ, "PYTHONPATH": str(REPO)})
            while self._procs["producer"].poll() is None:
                if self._stop.wait(0.5):
                    return
            rounds += 1

    def _predict_body(self) -> dict[str, Any]:
        if self.speech_dir is not None:  # two recordings of FSDD's test split, as sent
            from daemon.producer import fsdd_messages

            test = fsdd_messages(self.speech_dir, "test")
            first = [next(test), next(test)]
            return {"sample_rate": first[0]["sample_rate"],
                    "instances": [{"audio_pcm16": m["audio_pcm16"]} for m in first]}
        from sklearn.datasets import load_digits

        images = (load_digits().data / 16.0).round(4)  # pixels scaled to 0..1
        return {"instances": images[:8].tolist()}

    def _predict_loop(self) -> None:
        request = json.dumps(self._predict_body()).encode()
        while not self._stop.wait(1.0 / self.predict_rate):
            req = urllib.request.Request(self.daemon_url + "/v1/predict", data=request,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback only
                    self.predictions += 1
            except (urllib.error.HTTPError, OSError):
                pass  # 503 before the first model: counted by the daemon as an error

    # ---- Prometheus' HTTP API ------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``, raises StackError on an API error."""
        url = f"{self.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = _get(url, timeout=30)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise StackError(f"{path} {params}: HTTP {status}: {payload.get('error', body[:300])}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector (a list of {metric, value})."""
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query: a list of {metric, values: [[t, "v"], ...]}."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for(self, expr: str, timeout: float) -> list[dict[str, Any]]:
        """Poll an instant query until it returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in ("daemon", "prometheus"):
                self._check_alive(name)
            result = self.query(expr)
            if result:
                return result
            time.sleep(1.0)
        raise StackError(f"{expr!r} still empty after {timeout:.0f}s; daemon log:\n"
                         f"{self.log('daemon')}")
