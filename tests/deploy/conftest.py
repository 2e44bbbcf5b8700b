"""Shared fixtures of the deployment checks (tests/deploy)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tools/ is imported by the tests, not installed
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def exported_names() -> set[str]:
    """Every sample name daemon.metrics.Metrics can export (from its definitions)."""
    from prometheus_client import CollectorRegistry

    from daemon.metrics import Metrics
    from tools.promql import exported_sample_names

    return exported_sample_names(Metrics(CollectorRegistry()).registry.collect())


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """Every GNPD_ environment variable daemon.settings.Settings reads."""
    from daemon.settings import Settings
    from tools.gen_docs import settings_rows

    config = Settings.model_config
    rows = settings_rows(Settings, config["env_prefix"], config["env_nested_delimiter"])
    return {row[0].strip("`") for row in rows}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package "
                    "(apt-get install -y prometheus) to check the Prometheus config and rules")
    return path


@pytest.fixture()
def settings_from_env(monkeypatch: pytest.MonkeyPatch):
    """Build daemon Settings from exactly the given GNPD_ variables (as a container would)."""
    import os

    from daemon.settings import load_settings

    def build(env: dict[str, str]):
        for name in list(os.environ):
            if name.upper().startswith("GNPD_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        return load_settings(env_file=None)

    return build
