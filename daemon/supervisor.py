"""Runs one training child (:mod:`daemon.trainproc`) from the daemon: start, relay, bound, stop.

The child's log lines (``LEVEL logger: message`` on its stdout) are re-logged by the
daemon under ``daemon.trainproc`` at their level, so progress shows in the daemon's log.
The child is killed (SIGKILL) after ``timeout`` seconds; on :meth:`TrainingChild.stop`
it gets SIGTERM (it abandons between epochs) and SIGKILL after ``grace`` seconds.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import daemon
from daemon.trainproc import OUTCOME_EXIT

__all__ = ["ChildRun", "TrainingChild"]

log = logging.getLogger(__name__)
child_log = logging.getLogger("daemon.trainproc")

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


@dataclass(frozen=True)
class ChildRun:
    """How a child ended: its exit status, its result (None if it wrote none), why."""

    returncode: int
    result: dict[str, Any] | None
    timed_out: bool = False
    stopped: bool = False

    def verdict(self, timeout: float) -> tuple[str, str]:
        """(outcome, reason): the child's own verdict when its exit code agrees, else
        ``infra_error`` (killed by a signal, past the time limit, no result)."""
        result = self.result or {}
        if self.stopped:
            return "abandoned", "stop requested"
        if self.timed_out:
            return "infra_error", (f"the update ran past its time limit of {timeout:.0f}s "
                                   "and was killed")
        outcome = result.get("outcome")
        if outcome is None or OUTCOME_EXIT.get(outcome) != self.returncode:
            how = (f"killed by {self.signal}" + (" (out of memory?)"
                                                  if self.signal == "SIGKILL" else "")
                   if self.signal else f"exited with code {self.returncode}")
            return "infra_error", f"update child {how} without a result"
        return str(outcome), str(result.get("reason", ""))

    @property
    def signal(self) -> str | None:
        """The signal that killed the child, e.g. "SIGKILL"; None if it exited."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def _child_env() -> dict[str, str]:
    """The daemon's environment, with the folder holding this ``daemon`` package first."""
    root = str(Path(daemon.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class TrainingChild:
    """One ``python -m daemon.trainproc JOB`` process at a time.

    Args:
        timeout: seconds before a running child is killed (a hang).
        grace: seconds between SIGTERM and SIGKILL when stopping.
    """

    def __init__(self, timeout: float, grace: float = 10.0) -> None:
        self.timeout, self.grace = timeout, grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    @property
    def pid(self) -> int | None:
        """The running child's pid (None when none runs)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        """Ask the running child (if any) to stop; :meth:`run` returns soon after."""
        self._stop.set()

    def run(self, job_path: Path, result_path: Path) -> ChildRun:
        """Start the child on ``job_path`` and wait for it; never raises for its failure."""
        if self._stop.is_set():
            return ChildRun(-int(signal.SIGTERM), None, stopped=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.trainproc", str(job_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_child_env(), start_new_session=True)  # Ctrl-C goes to the daemon only
        self._proc = proc
        relay = threading.Thread(target=self._relay, args=(proc,), name="update-log",
                                 daemon=True)
        relay.start()
        log.info("update child started (pid %d)", proc.pid)
        timed_out, stopped = self._wait(proc)
        relay.join(5)
        self._proc = None
        return ChildRun(proc.returncode, _read_result(result_path), timed_out, stopped)

    def _wait(self, proc: subprocess.Popen[bytes]) -> tuple[bool, bool]:
        deadline = time.monotonic() + self.timeout
        while proc.poll() is None:
            if self._stop.wait(0.1):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.grace)
                except subprocess.TimeoutExpired:
                    log.warning("update child %d ignored SIGTERM for %.0fs: killing it",
                                proc.pid, self.grace)
                    proc.kill()
                    proc.wait()
                return False, True
            if time.monotonic() > deadline:
                log.error("update child %d ran past the %.0fs time limit: killing it",
                          proc.pid, self.timeout)
                proc.kill()
                proc.wait()
                return True, False
        return False, False

    @staticmethod
    def _relay(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        level = logging.INFO  # a line without a level (a traceback) keeps the last one's
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            head, _, rest = line.partition(" ")
            if head in _LEVELS:
                level, line = _LEVELS[head], rest.removeprefix("daemon.trainproc: ")
            if line:
                child_log.log(level, "[pid %d] %s", proc.pid, line)


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
