"""The CLI's answers to bad user input: one line and an exit code, never a traceback, and
never a daemon started on settings the user did not mean (found by review)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import daemon.app
from daemon.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _gnpd(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GNPD_")}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**clean, "PYTHONPATH": str(ROOT), **env})


def test_demo_with_an_invalid_port_is_one_line(tmp_path):
    r = _gnpd(["demo", "--dataset", "digits", "--port", "70000", "--dir", str(tmp_path / "d")],
              tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "GNPD_SERVE__PORT" in r.stderr


@pytest.mark.parametrize("cmd", [["run"], ["store", "rebuild-manifest"],
                                 ["produce", "--file", "x.jsonl", "--bootstrap-servers", "h:1"]])
def test_a_dotenv_file_that_is_not_utf8_is_one_line(tmp_path, cmd):
    (tmp_path / ".env").write_bytes(b"# caf\xe9\nGNPD_STORE__CHUNK_SIZE=100\n")  # Latin-1
    (tmp_path / "x.jsonl").write_text('{"features": [1], "label": 0}\n')
    r = _gnpd(cmd, tmp_path, GNPD_DATA_DIR=str(tmp_path / "data"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not UTF-8" in r.stderr


class _Started(Exception):
    pass


class _FakeDaemon:
    def __init__(self, settings, **kw):
        self.settings = settings

    def start(self):
        raise _Started(self.settings.kafka.bootstrap_servers or "<embedded broker>")


@pytest.fixture
def no_gnpd_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("GNPD_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)


def test_a_missing_env_file_named_on_the_command_line_is_an_error(no_gnpd_env, monkeypatch,
                                                                   tmp_path, capsys):
    # It was skipped silently: the daemon started on the defaults (an embedded broker).
    monkeypatch.setattr(daemon.app, "Daemon", _FakeDaemon)
    assert main(["run", "--env-file", str(tmp_path / "prod.env.typo")]) == 2
    err = capsys.readouterr().err
    assert "prod.env.typo: no such file" in err and "_Started" not in err
    assert main(["run", "--env-file", ".env"]) == 2  # named: it must exist, even this name
    assert ".env: no such file" in capsys.readouterr().err
    assert main(["run"]) == 1  # the default .env may be absent: on to the start
    assert "_Started" in capsys.readouterr().err


def test_ctrl_c_while_starting_is_one_line(no_gnpd_env, monkeypatch, tmp_path, capsys):
    class _Interrupted(_FakeDaemon):
        def start(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(daemon.app, "Daemon", _Interrupted)
    assert main(["run"]) == 130 and "interrupted while starting" in capsys.readouterr().err


def test_a_model_that_does_not_fit_the_input_shape_stops_the_start(no_gnpd_env, monkeypatch,
                                                                   tmp_path, capsys):
    monkeypatch.setenv("GNPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GNPD_MODEL__NAME", "lenet-5")
    monkeypatch.setenv("GNPD_MODEL__INPUT_SHAPE", "3,4")
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "could not start" in err and "GNPD_MODEL__NAME=lenet-5, GNPD_MODEL__INPUT_SHAPE=[3, 4]" in err
    assert not (tmp_path / "data" / "store").exists()  # refused before anything was made
