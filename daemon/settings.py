"""Daemon configuration: one pydantic-settings root with a section per component.

Every field can be set from the environment with the ``GNPD_`` prefix and ``__``
between section and field (``GNPD_STORE__CHUNK_SIZE=5000``,
``GNPD_MODEL__INPUT_SHAPE='[1,28,28]'``), from a ``.env`` file, or by keyword
arguments in tests (``Settings(store={"chunk_size": 10})``). Build it once in
``main()`` with :func:`load_settings` and pass the sections down.

Store and checkpoints live under one data directory (``GNPD_DATA_DIR``, default
``/var/lib/gnpd``: ``<data_dir>/store`` and ``<data_dir>/models``); an explicit
``GNPD_STORE__PATH`` / ``GNPD_MODEL__PATH`` overrides either. After validation both
paths are always set.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

__all__ = [
    "ENV_PREFIX",
    "KafkaSettings",
    "ModelSettings",
    "ServeSettings",
    "Settings",
    "SettingsError",
    "StoreSettings",
    "TrainSettings",
    "load_settings",
]

ENV_PREFIX = "GNPD_"
_NESTED = "__"
_MIN_TOKEN = 16
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
DEFAULT_DATA_DIR = Path("/var/lib/gnpd")


class _Section(BaseModel):
    # A typo inside a section (GNPD_STORE__CHUNKSIZE) is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(_Section):
    """Where samples come from and where rejected messages go, and how to authenticate."""

    bootstrap_servers: str = Field(
        "", description="host:port[,host:port]; empty = start the embedded Tansu broker")
    topic: str = Field("samples", min_length=1, description="topic the samples arrive on")
    dlq_topic: str | None = Field(None, description="dead-letter topic; default '<topic>.dlq'")
    group_id: str = Field("gnpd", min_length=1, description="offsets are committed under it")
    poll_timeout_ms: int = Field(500, gt=0, description="longest wait of one consumer poll")
    max_message_bytes: int = Field(
        1_000_000, gt=0, description="larger messages are dead-lettered as too_large")
    topic_partitions: int = Field(
        1, gt=0, description="partitions of the topic when gnpd has to create it")
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="how every Kafka client connects: TLS (SSL), SASL, or both")
    sasl_mechanism: SaslMechanism | None = Field(
        None, description="SASL mechanism; required with SASL_PLAINTEXT and SASL_SSL")
    sasl_username: str | None = Field(None, description="SASL user (with SASL_* protocols)")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (with SASL_* protocols; from a Secret)")
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates "
                          "(default: the system's trust store); SSL and SASL_SSL only")
    ssl_certfile: Path | None = Field(
        None, description="PEM client certificate for mutual TLS (may hold the key too)")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")

    @field_validator("topic", "dlq_topic")
    @classmethod
    def _legal_topic(cls, value: str | None) -> str | None:
        if value is not None:
            _check_topic_name(value)
        return value

    @model_validator(mode="after")
    def _check_topics(self) -> KafkaSettings:
        dlq = self.effective_dlq_topic
        if dlq == self.topic:
            raise ValueError(f"GNPD_KAFKA__DLQ_TOPIC is the input topic {dlq!r}: rejected "
                             f"messages would be read again forever; use e.g. {dlq + '.dlq'!r}")
        if self.dlq_topic is None:  # '<topic>.dlq' may be too long
            _check_topic_name(dlq, "the default dead-letter topic (set GNPD_KAFKA__DLQ_TOPIC)")
        return self

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} does not exist or is not a file")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        env, protocol = "GNPD_KAFKA__", self.security_protocol
        sasl = {"SASL_MECHANISM": self.sasl_mechanism, "SASL_USERNAME": self.sasl_username,
                "SASL_PASSWORD": self.sasl_password}
        ssl = {"SSL_CAFILE": self.ssl_cafile, "SSL_CERTFILE": self.ssl_certfile,
               "SSL_KEYFILE": self.ssl_keyfile}
        if protocol.startswith("SASL_"):
            missing = [env + k for k, v in sasl.items() if not v]
            if missing:
                raise ValueError(f"{env}SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}")
        elif any(sasl.values()):
            raise ValueError(f"{', '.join(env + k for k, v in sasl.items() if v)} set, but "
                             f"{env}SECURITY_PROTOCOL is {protocol}: use SASL_SSL or "
                             f"SASL_PLAINTEXT")
        if protocol not in ("SSL", "SASL_SSL") and any(ssl.values()):
            raise ValueError(f"{', '.join(env + k for k, v in ssl.items() if v)} set, but "
                             f"{env}SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(f"{env}SSL_KEYFILE needs {env}SSL_CERTFILE (the certificate)")
        return self

    @property
    def effective_dlq_topic(self) -> str:
        """The dead-letter topic actually used: ``dlq_topic`` or ``<topic>.dlq``."""
        return self.dlq_topic or f"{self.topic}.dlq"

    def client_kwargs(self) -> dict[str, Any]:
        """Broker address and security options for every kafka-python client gnpd makes.

        The consumer, the dead-letter producer, the admin client and the reference
        producer all take these, so one setting secures them all.
        """
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                  "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL_"):
            assert self.sasl_password is not None  # checked by _check_security
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password.get_secret_value())
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None:
                kwargs[name] = str(path)
        return kwargs


def _check_topic_name(name: str, what: str = "") -> None:
    """Kafka's rule for topic names (kafka.common.internals.Topic.validate)."""
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
        raise ValueError(f"{what + ' ' if what else ''}{shown} is not a legal Kafka topic name: "
                         f"1 to 249 characters from a-z, A-Z, 0-9, '.', '_' and '-', "
                         f"and not '.' or '..'")


class StoreSettings(_Section):
    """The on-disk Arrow chunk store."""

    path: Path | None = Field(
        None, description="folder of the Arrow chunks and manifest.json; default "
                          "<GNPD_DATA_DIR>/store")
    chunk_size: int = Field(5000, gt=0, description="samples per chunk; each sealed chunk triggers an update")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="share of each chunk held out for validation")
    write_behind: int = Field(
        0, ge=0, le=4,
        description="sealed chunks whose file and manifest may still be being written in a "
                    "background thread while ingestion reads on (0 = written on the ingest "
                    "thread: the faster on the 2-core benchmark machine; more may help where "
                    "fsync is slow); offsets are committed once a chunk is durable")

    @model_validator(mode="after")
    def _check_validation_rows(self) -> StoreSettings:
        if round(self.val_fraction * self.chunk_size) < 1:  # as daemon.store.val_mask counts
            raise ValueError(
                f"GNPD_STORE__CHUNK_SIZE={self.chunk_size} with GNPD_STORE__VAL_FRACTION="
                f"{self.val_fraction} holds out no sample of a chunk for validation "
                f"(round({self.val_fraction} x {self.chunk_size}) = 0), and an update needs "
                f"some: raise either, e.g. GNPD_STORE__CHUNK_SIZE="
                f"{math.ceil(0.5 / self.val_fraction) + 1}")
        return self


class ModelSettings(_Section):
    """What the model sees: architecture name, input shape, classes, checkpoints."""

    name: str = Field("lenet-300-100", min_length=1,
                      description="architecture from the gnp model registry (lenet-300-100, "
                                  "lenet-5, ...; speech: deepspeech2-hlstm, "
                                  "deepspeech2-hlstm-tiny)")
    input_shape: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 28, 28],
        description="shape of one sample's features (C, H, W): '[1,28,28]', '1,28,28' or "
                    "'1x28x28'; a speech model: [20] (MFCC coefficients), its default")
    num_classes: int = Field(10, ge=2, description="labels are integers in [0, num_classes); a "
                                                   "speech model: 28 CTC symbols, its default")
    path: Path | None = Field(
        None, description="folder of the checkpoints; default <GNPD_DATA_DIR>/models")
    keep_versions: int = Field(
        20, ge=1, description="checkpoints kept; older ones are deleted (never the served, "
                              "pinned or latest one)")
    on_store_mismatch: Literal["refuse", "fresh"] = Field(
        "refuse", description="latest checkpoint learnt from another store: refuse to start "
                              "(naming both paths), or fresh = ignore that store's checkpoints "
                              "and learn this store from scratch")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        # A typo would start a daemon whose every update fails in the training child.
        from gnp.models import MODELS

        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; the registry has {', '.join(sorted(MODELS))}")
        return value

    @field_validator("input_shape", mode="before")
    @classmethod
    def _parse_shape(cls, value: Any) -> Any:
        # Accept '[1,28,28]' (JSON) and the shorter '1,28,28' / '1x28x28' from env vars.
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"input shape {value!r} is not a JSON list: {exc.msg}") from None
        parts = [p.strip() for p in text.replace("x", ",").split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"input shape {value!r} is not like [1,28,28] or 1,28,28")
        return [int(p) for p in parts]

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, value: list[int]) -> list[int]:
        if not value or any(d <= 0 for d in value):
            raise ValueError(f"input shape {value} must be a non-empty list of positive sizes")
        return value

    @model_validator(mode="before")
    @classmethod
    def _speech_defaults(cls, data: Any) -> Any:
        # A speech model takes MFCC frames and outputs CTC symbols: both sizes are fixed by
        # gnp, so they default to them rather than to the image defaults.
        if not isinstance(data, dict):
            return data
        speech = _speech_io(str(data.get("name") or ""))
        if speech is None:
            return data
        return {"input_shape": list(speech[0]), "num_classes": speech[1], **data}

    @model_validator(mode="after")
    def _check_speech(self) -> ModelSettings:
        speech = _speech_io(self.name)
        if speech is not None and (list(speech[0]), speech[1]) != (self.input_shape,
                                                                     self.num_classes):
            raise ValueError(
                f"{self.name} is a speech model: it takes input_shape {list(speech[0])} (MFCC "
                f"coefficients) and num_classes {speech[1]} (CTC symbols), got "
                f"{self.input_shape} and {self.num_classes}; leave GNPD_MODEL__INPUT_SHAPE "
                f"and GNPD_MODEL__NUM_CLASSES unset")
        return self

    @property
    def speech(self) -> bool:
        """True for a speech model (learns speech samples, serves transcripts)."""
        return _speech_io(self.name) is not None

    @property
    def input_size(self) -> int:
        """Number of features in one sample, the product of ``input_shape``."""
        return math.prod(self.input_shape)


def _speech_io(name: str) -> tuple[tuple[int, ...], int] | None:
    """(input_shape, num_classes) of a speech model; None for any other name."""
    from gnp.models import SPEECH_MODELS  # lazily: torch is imported only to validate

    if name not in SPEECH_MODELS:
        return None
    from gnp.audio import FeatureConfig
    from gnp.transcripts import NUM_SYMBOLS

    return (FeatureConfig().n_mfcc,), NUM_SYMBOLS


class ServeSettings(_Section):
    """The HTTP server (predict, health, metrics)."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = any free port)")
    model: Literal["recoverable", "compact"] = Field(
        "recoverable", description="recoverable: serve the model that keeps learning (full "
                                   "width, masked); compact: serve its physical compaction "
                                   "(inactive units sliced away, plain dense layers)")
    max_body_bytes: int = Field(
        16 * 2**20, gt=0,
        description="largest POST /v1/predict body; larger ones get 413 without being read "
                    "(Content-Length checked up front, chunked bodies while streaming)")
    api_token: SecretStr | None = Field(
        None,
        description="bearer token every endpoint but /healthz, /readyz and /metrics requires "
                    "(Authorization: Bearer ...); unset = the API is open. From a Secret")
    predict_workers: int = Field(
        2, ge=1, le=64,
        description="threads that parse large predict bodies (over 256 KiB); at most twice "
                    "as many large bodies are held in memory, the others wait")
    batch_max_rows: int = Field(
        64, ge=1, le=4096,
        description="dynamic batching: most instances in one forward pass; concurrent "
                    "predict requests are joined up to it (a bigger request runs alone)")
    batch_wait_ms: float = Field(
        1.5, ge=0.0, le=100.0,
        description="dynamic batching: longest wait for more requests to join a forward "
                    "pass, once one is waiting (0 = run at once with whatever is queued)")
    max_queued_requests: int = Field(
        256, ge=1,
        description="predict requests waiting for the model at most; beyond it the answer "
                    "is 503 with Retry-After at once (health checks are never queued)")
    torch_threads: int = Field(
        1, ge=0, le=256,
        description="torch intra-op threads of the daemon process (the serving forward "
                    "pass); 0 = torch's default (every core). 1 leaves the other cores to "
                    "HTTP, ingestion and the training child")


    @field_validator("api_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # An empty key of a Kubernetes Secret arrives as "": that means "no token". A Secret
        # made from a file keeps its trailing newline, which no HTTP header can carry: strip.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("api_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        if len(secret) < _MIN_TOKEN:
            raise ValueError(f"the API token must be at least {_MIN_TOKEN} characters "
                             f"(e.g. the output of `openssl rand -hex 32`)")
        if not (secret.isascii() and secret.isprintable()):  # what a header carries as sent
            raise ValueError("the API token must be printable ASCII (e.g. the output of "
                             "`openssl rand -hex 32`)")
        return value


class TrainSettings(_Section):
    """How updates run and when a finished update is refused."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where updates train; auto = cuda when available")
    method: Literal["ours", "cgap"] = Field(
        "ours", description="ours: connection grow-and-prune (unstructured masks); cgap: "
                            "whole-unit grow-and-prune (neurons, filters), a physically "
                            "smaller model")
    schedule: Literal["paper", "quick"] = Field(
        "paper", description="paper: 15/20/60 epochs; quick: 3/4/12 (demos, small CPUs)")
    stop_timeout_seconds: float = Field(
        30.0, gt=0.0, description="bound on finishing or abandoning an update at SIGTERM")
    min_accuracy: float = Field(
        0.0, ge=0.0, le=1.0, description="an update below this validation accuracy fails")
    max_accuracy_drop: float = Field(
        0.03, ge=0.0, le=1.0,
        description="an update more than this below the best reference accuracy fails (the "
                    "served, head and recent versions, on the same validation set)")
    gate_versions: int = Field(
        5, ge=0, description="recent versions (besides the served and head ones) an update "
                             "is compared with")
    max_attempts: int = Field(
        2, ge=1, description="failed updates a chunk may be part of before it is quarantined")
    update_timeout_seconds: float = Field(
        6 * 3600.0, gt=0.0, description="the training child is killed past this (a hang); "
                                        "counted as an infrastructure error")
    replay_memory_bytes: int = Field(
        2 * 2**30, gt=0, description="samples the training child keeps resident on its "
                                     "device (validation, then replay, then new data); a data "
                                     "set beyond it streams from the memory-mapped chunks "
                                     "(speech: from the store's MFCC cache)")
    augment: bool = Field(
        False, description="random affine distortions of image samples while training (off: "
                           "measured worse on Fashion-MNIST; the paper used them for MNIST)")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile mode of the training forward (reduce-overhead: CUDA "
                           "graphs); off = eager, which trains faster on CPU (python -m "
                           "gnp.bench measures both on your device). Compiling costs each "
                           "update's child seconds to a minute")
    torch_threads: int = Field(
        0, ge=0, le=256,
        description="torch intra-op threads of the training child; 0 = torch's default "
                    "(every core). Lower it to leave cores to serving and ingestion")
    nice: int = Field(
        10, ge=0, le=19,
        description="niceness the training child adds to the daemon's (as `nice -n`), "
                    "applied before torch starts its threads: serving and ingestion get a "
                    "busy CPU first; 0 = the daemon's priority")
    child_memory_bytes: int = Field(
        0, ge=0, description="private memory the training child may allocate beyond its "
                             "start-up (Linux RLIMIT_DATA; the memory-mapped store does not "
                             "count); 0 = no limit")


class Settings(BaseSettings):
    """All daemon settings; environment variables ``GNPD_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=_NESTED,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",  # a .env file may hold other programs' variables
        frozen=True,
    )

    data_dir: Path = Field(
        DEFAULT_DATA_DIR, description="where the store and the checkpoints live by default "
                                      "(<data_dir>/store, <data_dir>/models)")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="before")
    @classmethod
    def _paths_under_data_dir(cls, data: Any) -> Any:
        # Fill store.path / model.path from data_dir unless given (env vars, .env, kwargs).
        if not isinstance(data, dict):
            return data
        root = Path(data.get("data_dir") or DEFAULT_DATA_DIR)
        out = dict(data)
        for section, sub in (("store", "store"), ("model", "models")):
            value = out.get(section)
            if isinstance(value, BaseModel):
                if value.path is None:  # type: ignore[attr-defined]
                    out[section] = value.model_copy(update={"path": root / sub})
            else:
                value = dict(value or {})
                if value.get("path") in (None, ""):
                    value["path"] = root / sub
                out[section] = value
        return out


class SettingsError(ValueError):
    """Invalid configuration; the message has one line per bad field, named as its env var."""


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Build :class:`Settings` from keyword overrides, the environment and ``env_file``.

    Raises:
        SettingsError: with lines like
            ``GNPD_STORE__CHUNK_SIZE: Input should be greater than 0``.
    """
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [f"{_env_name(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                 for err in exc.errors()]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    except _SourceError as exc:  # e.g. an env var for a list that is not JSON
        raise SettingsError(f"invalid settings: {exc}") from None
    except UnicodeDecodeError as exc:  # the dotenv file is read as UTF-8
        raise SettingsError(f"invalid settings: {env_file} is not UTF-8 text ({exc.reason} at "
                            f"byte {exc.start}): save it as UTF-8") from None


def _env_name(loc: tuple[int | str, ...]) -> str:
    """('store', 'chunk_size') -> 'GNPD_STORE__CHUNK_SIZE'; list items get '[i]'."""
    name = ENV_PREFIX.rstrip("_")
    sep = "_"
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += sep + str(part).upper()
            sep = _NESTED
    return name
