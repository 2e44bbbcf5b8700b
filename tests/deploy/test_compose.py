"""The Docker Compose demo stack: valid compose files whose parts point at each other."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
STACKS = [["docker-compose.yml"], ["docker-compose.yml", "fashion-mnist.yml"],
          ["docker-compose.yml", "gpu.yml"]]
# What an operator must set before `up` (the stack has no default passwords).
REQUIRED_ENV = {"GF_ADMIN_PASSWORD": "test-only-password"}


def _compose_config(files: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker-compose config` of the stack with exactly ``env`` (no .env file, no shell)."""
    with tempfile.NamedTemporaryFile("w", suffix=".env") as no_env_file:
        args = [shutil.which("docker-compose") or "docker-compose",
                "--project-directory", str(COMPOSE), "--env-file", no_env_file.name]
        for name in files:
            args += ["-f", str(COMPOSE / name)]
        return subprocess.run(args + ["config"], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", **env})


def _config(files: list[str], validate: bool = False) -> dict:
    """The merged stack, as `docker-compose config` resolves it.

    Without Debian's docker-compose, a plain merge in Python stands in (YAML anchors and
    merge keys, override files, ${VAR:-default}, ${VAR:?error}, relative bind mounts) so
    the structural checks still run; only ``validate=True`` (the compose schema check) then
    skips.
    """
    if shutil.which("docker-compose") is None:
        if validate:
            pytest.skip("docker-compose not found (Debian package docker-compose; it "
                        "validates offline, without a Docker engine)")
        return _merge_in_python(files, REQUIRED_ENV)
    proc = _compose_config(files, REQUIRED_ENV)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (ValueError when unset)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def _merge_in_python(files: list[str], env: dict[str, str]) -> dict:
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base[k], v) if k in base else v for k, v in over.items()}}
        return over

    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, str):
            return _interpolate(value, env)
        return value

    stack: dict = {}
    for name in files:
        stack = merge(stack, yaml.safe_load((COMPOSE / name).read_text()))
    stack = resolve(stack)
    for service in stack["services"].values():
        service["volumes"] = [str((COMPOSE / v.split(":", 1)[0]).resolve()) + ":" + v.split(":", 1)[1]
                              if v.startswith(".") else v for v in service.get("volumes", [])]
    return stack


def _raw(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text(encoding="utf-8"))


def _published(port: str | dict) -> tuple[str, int, int]:
    """(host address, host port, container port) of a ports entry in either syntax."""
    if isinstance(port, dict):
        return port.get("host_ip", ""), int(port["published"]), int(port["target"])
    parts = port.split("/")[0].split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return host_ip, int(parts[-2]), int(parts[-1])


def _bind(volume: str | dict) -> tuple[Path | None, str]:
    """(host path, container path) of a bind mount; (None, target) for a named volume."""
    if isinstance(volume, dict):
        source = volume["source"] if volume.get("type") == "bind" else None
        return (Path(source) if source else None), volume["target"]
    source, target = volume.split(":")[:2]
    return (Path(source) if source.startswith("/") else None), target


@pytest.fixture(scope="module")
def stack() -> dict:
    return _config(STACKS[0])


@pytest.mark.parametrize("files", STACKS, ids=["digits", "fashion-mnist", "gpu"])
def test_compose_files_are_valid(files):
    services = _config(files, validate=True)["services"]
    assert {"kafka", "gnpd", "producer", "prometheus", "grafana"} <= set(services)


def test_kafka_is_a_single_kraft_node(stack):
    kafka = stack["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka


def test_kafka_keeps_its_log_on_its_volume(stack):
    """apache/kafka configured by KAFKA_* variables writes to /tmp/kraft-combined-logs
    unless KAFKA_LOG_DIRS says otherwise: the topic would not outlive the container."""
    kafka = stack["services"]["kafka"]
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in kafka["volumes"]]
    log_dirs = kafka["environment"].get("KAFKA_LOG_DIRS", "/tmp/kraft-combined-logs")
    for d in log_dirs.split(","):
        assert any(Path(d).is_relative_to(t) for t in targets), (d, targets)


@pytest.mark.parametrize("files", STACKS, ids=["digits", "fashion-mnist", "gpu"])
def test_daemon_and_producer_settings_are_valid(files, settings_from_env, settings_env_names):
    services = _config(files)["services"]
    shapes = {}
    for name in ("gnpd", "producer"):
        env = services[name]["environment"]
        assert set(env) <= settings_env_names, set(env) - settings_env_names
        settings = settings_from_env(env)
        assert settings.kafka.bootstrap_servers == "kafka:9092", "use the compose Kafka"
        shapes[name] = settings.model.input_shape
    assert shapes["gnpd"] == shapes["producer"], "producer and daemon must agree on the shape"
    command = " ".join(services["producer"]["command"])
    match = re.search(r"\bgnpd produce --dataset (\S+)", command)
    assert match, f"the producer does not run gnpd produce: {command}"
    dataset = match.group(1)
    if services["producer"].get("entrypoint") == ["/bin/sh", "-c"]:
        script = command.replace("$$", "$")  # compose's escape for a literal $
        proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, f"producer shell loop does not parse: {proc.stderr}"
    assert {"digits": [1, 8, 8], "fashion-mnist": [1, 28, 28]}[dataset] == shapes["gnpd"]
    if dataset == "fashion-mnist":
        mounts = [v if isinstance(v, str) else v["target"] for v in services["producer"]["volumes"]]
        assert any("/usr/share/datasets/fashion-mnist" in m for m in mounts)


def test_daemon_stops_gracefully_and_keeps_its_state(stack, settings_from_env):
    gnpd = stack["services"]["gnpd"]
    grace = re.fullmatch(r"(\d+)s", str(gnpd["stop_grace_period"]))
    settings = settings_from_env(gnpd["environment"])
    assert grace and int(grace.group(1)) > settings.train.stop_timeout_seconds
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in gnpd["volumes"]]
    # The store and the checkpoints (where the image puts them) lie on the data volume.
    image_env = {}
    for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        image_env.update(re.findall(r"\b(GNPD_\w+)=(\S+)", line))
    data = settings_from_env({k: v for k, v in image_env.items()
                              if k in ("GNPD_STORE__PATH", "GNPD_MODEL__PATH")})
    for path in (data.store.path, data.model.path):
        assert any(path.is_relative_to(t) for t in targets), f"{path} is on no volume"
    assert any(_published(p)[2] == 8000 for p in gnpd["ports"])
    assert stack["services"]["producer"]["image"] == gnpd["image"], "one image for both"


def test_no_default_passwords_or_tokens():
    """Every secret-like value in every compose file must be set by the operator."""
    secret = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)
    required = re.compile(r"^\$\{\w+:\?[^}]+\}$")
    found = 0
    for path in sorted(COMPOSE.glob("*.yml")):
        for name, service in (_raw(path.name).get("services") or {}).items():
            env = service.get("environment") or {}
            items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
            for key, value in items:
                if secret.search(key) and not key.endswith("__FILE"):
                    found += 1
                    assert required.match(str(value)), \
                        f"{path.name}: {name}.{key}={value!r}: use ${{VAR:?message}}, no default"
    assert found, "the Grafana admin password is expected among the checked values"


def test_compose_refuses_to_start_without_the_grafana_password():
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "GF_ADMIN_PASSWORD"}
    if shutil.which("docker-compose") is None:
        with pytest.raises(ValueError, match="GF_ADMIN_PASSWORD"):
            _merge_in_python(STACKS[0], env)
        return
    proc = _compose_config(STACKS[0], env)
    assert proc.returncode != 0 and "GF_ADMIN_PASSWORD" in proc.stderr, proc.stderr
    grafana = _config(STACKS[0])["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED_ENV["GF_ADMIN_PASSWORD"]


@pytest.mark.parametrize("files", STACKS, ids=["digits", "fashion-mnist", "gpu"])
def test_published_ports_listen_on_loopback_by_default(files):
    for name, service in _config(files)["services"].items():
        for port in service.get("ports", []):
            assert _published(port)[0] == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_prometheus_and_grafana_are_wired(stack):
    services = stack["services"]
    prom_cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom_cfg["scrape_configs"] if job["job_name"] == "gnpd"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["gnpd:8000"]
    mounts = {}
    for svc in ("prometheus", "grafana"):
        for vol in services[svc]["volumes"]:
            source, target = _bind(vol)
            if source is not None:
                assert source.exists(), f"{svc} mounts missing {source}"
                mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"].name == "prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"].name == "alerts.yml"
    datasource = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/gnpd.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert mounts[f"{dash_dir}/gnpd-dashboard.json"] == REPO / "deploy/grafana/gnpd-dashboard.json"
    assert mounts["/etc/grafana/provisioning"] == REPO / "deploy/grafana/provisioning"
