"""The container image, built and run for real with buildah (opt-in: ``pytest -m slow``).

tools/build_image.sh builds the image (the first build takes tens of minutes and ~6 GB;
later ones reuse the cached layers and take seconds). The run test starts the image's own
ENTRYPOINT/CMD with ``buildah run`` the way Kubernetes runs it: as uid 10001, root
filesystem read-only, a data volume at /var/lib/gnpd and a writable /tmp, and asks
``/healthz`` on loopback. ``buildah run`` has no --read-only flag, so the test remounts the
working container's root read-only before the run; the running daemon's own
/proc/<pid>/mountinfo and status then prove what it ran with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GNPD_TEST_IMAGE", "localhost/gnpd:0.1.0")
UID = 10001
# Files and folders `buildah run` mounts over; they must exist before the root is read-only.
RUN_MOUNT_POINTS = ("run/.containerenv", "etc/hosts", "etc/resolv.conf", "etc/hostname")

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _buildah(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("buildah") is None:
        pytest.skip("buildah not found (Debian: apt-get install -y buildah)")
    if os.geteuid() != 0:
        pytest.skip("needs root: buildah mounts the image and remounts its root read-only")
    proc = subprocess.run(["nice", "-n", "10", str(REPO / "tools/build_image.sh"), IMAGE],
                          capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, f"tools/build_image.sh failed:\n{proc.stderr[-4000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def config(image: str) -> dict:
    """The image's Docker-format config (User, Env, Volumes, Healthcheck, ...)."""
    return json.loads(_buildah("inspect", "--type", "image", image))["Docker"]["config"]


@pytest.fixture()
def read_only_container(image: str) -> Iterator[tuple[str, str]]:
    """(working container, its root on the host), the root mounted read-only."""
    container = _buildah("from", "--pull-never", "--quiet", image)
    root = ""
    try:
        root = _buildah("mount", container)
        for name in RUN_MOUNT_POINTS:
            (Path(root) / name).touch()
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
        yield container, root
    finally:
        if root:  # buildah's clean-up after a run writes there: give it back
            subprocess.run(["mount", "-o", "remount,bind,rw", root], check=False)
            subprocess.run(["buildah", "umount", container], capture_output=True, check=False)
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _gnpd_pid(buildah_pid: int) -> int | None:
    for pid in _descendants(buildah_pid):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The console script: /opt/gnpd/bin/python /opt/gnpd/bin/gnpd run
        if len(argv) > 2 and b"python" in argv[0] and argv[1].endswith(b"/gnpd"):
            return pid
    return None


def _mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> per-mount options, as the process sees them (last mount wins)."""
    out = {}
    for line in (Path("/proc") / str(pid) / "mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = set(fields[5].split(","))
    return out


def _healthz(port: int, deadline: float, proc: subprocess.Popen, log: Path) -> int:
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gnpd exited with {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return r.status
        except OSError:
            time.sleep(1)
    raise AssertionError("no answer from /healthz within the deadline")


@pytest.mark.timeout(3 * 3600)
def test_image_config_matches_the_deployments(config):
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["gnpd"] and config["Cmd"] == ["run"]
    assert set(config["Volumes"]) == {"/var/lib/gnpd"}
    env = dict(e.split("=", 1) for e in config["Env"])
    for name in ("GNPD_STORE__PATH", "GNPD_MODEL__PATH"):
        assert Path(env[name]).is_relative_to("/var/lib/gnpd"), f"{name}={env[name]}"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "python", "-c"], "docker format keeps it"
    assert not any(k.startswith("PIP_") for k in env), "build-time pip settings leaked"


@pytest.mark.timeout(3 * 3600)
def test_gnpd_runs_as_non_root_on_a_read_only_root_and_answers_healthz(
        config, read_only_container, kafka_bootstrap, topic, tmp_path):
    container, root = read_only_container
    data, tmp = tmp_path / "data", tmp_path / "tmp"
    data.mkdir()
    tmp.mkdir()
    os.chown(data, UID, UID)
    tmp.chmod(0o1777)
    port = _free_port()
    settings = {"GNPD_SERVE__HOST": "127.0.0.1", "GNPD_SERVE__PORT": str(port),
                "GNPD_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "GNPD_KAFKA__TOPIC": topic,
                "GNPD_MODEL__INPUT_SHAPE": "[1,8,8]"}
    argv = ["buildah", "run", "--isolation", "chroot", "--user", config["User"],
            "--volume", f"{data}:/var/lib/gnpd", "--volume", f"{tmp}:/tmp"]
    for name, value in settings.items():
        argv += ["--env", f"{name}={value}"]
    argv += [container, "--", *config["Entrypoint"], *config["Cmd"]]
    log = tmp_path / "gnpd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _healthz(port, time.monotonic() + 300, proc, log) == 200
        pid = _gnpd_pid(proc.pid)
        assert pid is not None, "no gnpd process under buildah run"
        uids = (Path("/proc") / str(pid) / "status").read_text().split("Uid:")[1].split()[:4]
        assert uids == [str(UID)] * 4, f"gnpd runs as uids {uids}"
        mounts = _mounts(pid)
        assert "ro" in mounts["/"], f"root mounted {mounts['/']}"
        assert "rw" in mounts["/var/lib/gnpd"] and "rw" in mounts["/tmp"]
        # It wrote its state to the data volume, as its own user.
        for sub in ("store", "models"):
            path = data / sub
            assert path.is_dir() and path.stat().st_uid == UID, f"{path} not made by gnpd"
        # Stop it once fully started (Kafka reached: "gnpd running"); its SIGTERM handler is
        # installed right after that line.
        deadline = time.monotonic() + 120
        while "gnpd running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
        assert "gnpd running" in log.read_text(), log.read_text()
        time.sleep(2)
        # buildah cleans up in the root after the run; the daemon keeps its own read-only
        # mount of it (a remount on the host does not change a mount already made).
        subprocess.run(["mount", "-o", "remount,bind,rw", root], check=True)
        assert "ro" in _mounts(pid)["/"]
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=90)
        text = log.read_text()
        assert proc.returncode == 0, f"gnpd did not stop cleanly ({proc.returncode}):\n{text}"
        assert "received SIGTERM" in text and "gnpd stopped" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
