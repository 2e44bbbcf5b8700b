"""Settings: defaults, env parsing with GNPD_ and __, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GNPD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env from the working directory


def test_defaults() -> None:
    s = Settings()
    assert s.kafka.bootstrap_servers == ""
    assert s.kafka.topic == "samples"
    assert s.kafka.effective_dlq_topic == "samples.dlq"
    assert s.kafka.group_id == "gnpd"
    assert s.store.chunk_size == 5000 and s.store.val_fraction == 0.1
    assert s.data_dir == Path("/var/lib/gnpd")  # one data folder, not the working directory
    assert s.store.path == Path("/var/lib/gnpd/store")
    assert s.model.path == Path("/var/lib/gnpd/models")
    assert s.model.on_store_mismatch == "refuse"
    assert s.model.input_shape == [1, 28, 28] and s.model.input_size == 784
    assert s.model.num_classes == 10
    assert s.serve.port == 8000
    assert s.train.device == "auto" and s.train.schedule == "paper"


def test_env_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNPD_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("GNPD_KAFKA__TOPIC", "digits")
    monkeypatch.setenv("GNPD_STORE__CHUNK_SIZE", "100")
    monkeypatch.setenv("GNPD_STORE__PATH", "/var/lib/gnpd")
    monkeypatch.setenv("GNPD_MODEL__INPUT_SHAPE", "[1,8,8]")
    monkeypatch.setenv("GNPD_TRAIN__DEVICE", "cpu")
    s = Settings()
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.kafka.effective_dlq_topic == "digits.dlq"
    assert s.store.chunk_size == 100
    assert s.store.path == Path("/var/lib/gnpd")
    assert s.model.input_shape == [1, 8, 8] and s.model.input_size == 64
    assert s.train.device == "cpu"


def test_data_dir_holds_store_and_models_unless_overridden(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNPD_DATA_DIR", "/srv/gnpd")
    s = Settings()
    assert (s.store.path, s.model.path) == (Path("/srv/gnpd/store"), Path("/srv/gnpd/models"))
    monkeypatch.setenv("GNPD_MODEL__PATH", "/elsewhere/models")
    s = Settings()
    assert (s.store.path, s.model.path) == (Path("/srv/gnpd/store"), Path("/elsewhere/models"))
    s = Settings(data_dir="/d", store={"chunk_size": 30})
    assert s.store.path == Path("/d/store") and s.store.chunk_size == 30


def test_short_shape_syntax_and_explicit_dlq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNPD_MODEL__INPUT_SHAPE", "3x32x32")
    monkeypatch.setenv("GNPD_KAFKA__DLQ_TOPIC", "rejects")
    s = Settings()
    assert s.model.input_shape == [3, 32, 32]
    assert s.kafka.effective_dlq_topic == "rejects"


def test_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / "gnpd.env"
    env.write_text("GNPD_STORE__CHUNK_SIZE=70\nUNRELATED=1\n")
    assert load_settings(env_file=env).store.chunk_size == 70


def test_kwargs_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNPD_STORE__CHUNK_SIZE", "100")
    s = Settings(store={"chunk_size": 30, "path": "x"})
    assert s.store.chunk_size == 30 and s.store.path == Path("x")


@pytest.mark.parametrize("env, value, text", [
    ("GNPD_STORE__CHUNK_SIZE", "0", "GNPD_STORE__CHUNK_SIZE: Input should be greater than 0"),
    ("GNPD_STORE__VAL_FRACTION", "0.5", "GNPD_STORE__VAL_FRACTION: Input should be less than 0.5"),
    ("GNPD_STORE__VAL_FRACTION", "0", "GNPD_STORE__VAL_FRACTION: Input should be greater than 0"),
    ("GNPD_MODEL__NUM_CLASSES", "1", "GNPD_MODEL__NUM_CLASSES: Input should be greater than"),
    ("GNPD_MODEL__INPUT_SHAPE", "[1,0]", "GNPD_MODEL__INPUT_SHAPE: input shape [1, 0]"),
    ("GNPD_MODEL__INPUT_SHAPE", "[1,8", "GNPD_MODEL__INPUT_SHAPE: input shape '[1,8' is not"),
    ("GNPD_TRAIN__DEVICE", "tpu", "GNPD_TRAIN__DEVICE: Input should be 'auto', 'cpu' or 'cuda'"),
    ("GNPD_STORE__CHUNKSIZE", "5", "GNPD_STORE__CHUNKSIZE: Extra inputs are not permitted"),
])
def test_load_settings_names_env_var(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                     text: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_settings_one_line_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNPD_STORE__CHUNK_SIZE", "-1")
    monkeypatch.setenv("GNPD_SERVE__PORT", "70000")
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    lines = str(info.value).splitlines()
    assert len(lines) == 3  # header + one per field
    assert any(line.strip().startswith("GNPD_SERVE__PORT:") for line in lines)


def test_direct_construction_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        Settings(store={"chunk_size": 0})


@pytest.mark.parametrize("env, text", [
    ({"GNPD_KAFKA__DLQ_TOPIC": "samples"},
     "GNPD_KAFKA: GNPD_KAFKA__DLQ_TOPIC is the input topic 'samples': rejected messages would "
     "be read again forever"),
    ({"GNPD_KAFKA__TOPIC": "in", "GNPD_KAFKA__DLQ_TOPIC": "in"}, "is the input topic 'in'"),
    ({"GNPD_KAFKA__TOPIC": "my samples"},
     "GNPD_KAFKA__TOPIC: 'my samples' is not a legal Kafka topic name: 1 to 249 characters "
     "from a-z, A-Z, 0-9, '.', '_' and '-', and not '.' or '..'"),
    ({"GNPD_KAFKA__DLQ_TOPIC": "dead/letters"}, "GNPD_KAFKA__DLQ_TOPIC: 'dead/letters' is not"),
    ({"GNPD_KAFKA__DLQ_TOPIC": ".."}, "GNPD_KAFKA__DLQ_TOPIC: '..' is not a legal"),
    ({"GNPD_KAFKA__TOPIC": "t" * 250}, "(250 characters) is not a legal Kafka topic name"),
    ({"GNPD_KAFKA__TOPIC": "t" * 246},
     "the default dead-letter topic (set GNPD_KAFKA__DLQ_TOPIC) "),
])
def test_topic_names_are_checked_at_start(monkeypatch: pytest.MonkeyPatch, env, text) -> None:
    """Issue 8, item 9: a DLQ equal to the input topic, or an illegal name, stopped ingestion."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    assert text in str(info.value)


def test_legal_topic_names() -> None:
    s = Settings(kafka={"topic": "a.b_c-D9", "dlq_topic": "a.b_c-D9-rejects"})
    assert s.kafka.effective_dlq_topic == "a.b_c-D9-rejects"
    assert Settings(kafka={"topic": "t" * 245}).kafka.effective_dlq_topic == "t" * 245 + ".dlq"


@pytest.mark.parametrize("field, default, value, bad", [
    ("method", "ours", "cgap", "tfs"),
    ("compile", "off", "reduce-overhead", "fast"),
])
def test_train_settings_from_env_reach_the_update_policy(
        monkeypatch: pytest.MonkeyPatch, field: str, default: str, value: str, bad: str) -> None:
    from daemon.updater import UpdatePolicy
    env = f"GNPD_TRAIN__{field.upper()}"
    assert getattr(UpdatePolicy.from_settings(Settings()), field) == default
    monkeypatch.setenv(env, value)
    assert getattr(UpdatePolicy.from_settings(Settings()), field) == value
    monkeypatch.setenv(env, bad)
    with pytest.raises(Exception, match=field):
        Settings()


def test_the_daemons_compile_modes_are_torch_compile_modes() -> None:
    from typing import get_args

    from daemon.settings import TrainSettings
    from gnp.train import COMPILE_MODES
    modes = set(get_args(TrainSettings.model_fields["compile"].annotation))
    assert "off" in modes and modes - {"off"} <= set(COMPILE_MODES)


def test_a_chunk_size_that_holds_out_no_validation_sample_is_refused() -> None:
    from daemon.settings import StoreSettings

    with pytest.raises(ValueError, match=r"round\(0.1 x 5\) = 0.*GNPD_STORE__CHUNK_SIZE=6"):
        StoreSettings(chunk_size=5, val_fraction=0.1)
    assert StoreSettings(chunk_size=6, val_fraction=0.1).chunk_size == 6


def test_an_unknown_model_name_is_refused_naming_the_registry(monkeypatch) -> None:
    # A typo started a daemon whose every update failed in the training child, as a training
    # failure: the chunks were quarantined for good.
    monkeypatch.setenv("GNPD_MODEL__NAME", "lenet-300")
    with pytest.raises(SettingsError, match=r"GNPD_MODEL__NAME: unknown model 'lenet-300'.*lenet-300-100"):
        load_settings(env_file=None)
