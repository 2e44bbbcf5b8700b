"""Kafka TLS/SASL settings reach every client; the HTTP bearer token (issue 8, item 5)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import SecretStr, ValidationError

from daemon.auth import require_token
from daemon.ingest import Ingestor
from daemon.metrics import Metrics
from daemon.registry import ServedModel
from daemon.serving import HttpServer, create_app
from daemon.settings import KafkaSettings, ServeSettings, SettingsError, load_settings
from daemon.store import ChunkStore

TOKEN = "0123456789abcdef-test-token"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GNPD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-----BEGIN CERTIFICATE-----\n")
    return files


# ---- Kafka: settings --------------------------------------------------------------------------

def test_plaintext_by_default() -> None:
    kafka = KafkaSettings(bootstrap_servers="k:9092")
    assert kafka.client_kwargs() == {"bootstrap_servers": "k:9092",
                                     "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_from_the_environment(monkeypatch: pytest.MonkeyPatch, pem_files) -> None:
    env = {"BOOTSTRAP_SERVERS": "k1:9093", "SECURITY_PROTOCOL": "sasl_ssl",
           "SASL_MECHANISM": "scram-sha-512", "SASL_USERNAME": "gnpd",
           "SASL_PASSWORD": "pa55:word", "SSL_CAFILE": str(pem_files["ca"]),
           "SSL_CERTFILE": str(pem_files["cert"]), "SSL_KEYFILE": str(pem_files["key"])}
    for name, value in env.items():
        monkeypatch.setenv(f"GNPD_KAFKA__{name}", value)
    kafka = load_settings(env_file=None).kafka
    assert kafka.client_kwargs() == {
        "bootstrap_servers": "k1:9093", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "gnpd",
        "sasl_plain_password": "pa55:word", "ssl_cafile": str(pem_files["ca"]),
        "ssl_certfile": str(pem_files["cert"]), "ssl_keyfile": str(pem_files["key"])}
    assert "pa55:word" not in repr(kafka) and "pa55:word" not in str(kafka)


@pytest.mark.parametrize("env, message", [
    ({"SECURITY_PROTOCOL": "TLS"},
     "GNPD_KAFKA__SECURITY_PROTOCOL: Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or "
     "'SASL_SSL'"),
    ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "PLAIN"},
     "GNPD_KAFKA: GNPD_KAFKA__SECURITY_PROTOCOL=SASL_SSL needs GNPD_KAFKA__SASL_USERNAME, "
     "GNPD_KAFKA__SASL_PASSWORD"),
    ({"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_USERNAME": "u", "SASL_PASSWORD": "p"},
     "needs GNPD_KAFKA__SASL_MECHANISM"),
    ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI", "SASL_USERNAME": "u",
      "SASL_PASSWORD": "p"},
     "GNPD_KAFKA__SASL_MECHANISM: Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"),
    ({"SASL_USERNAME": "u", "SASL_PASSWORD": "p"},
     "GNPD_KAFKA__SASL_USERNAME, GNPD_KAFKA__SASL_PASSWORD set, but "
     "GNPD_KAFKA__SECURITY_PROTOCOL is PLAINTEXT: use SASL_SSL or SASL_PLAINTEXT"),
    ({"SSL_CAFILE": "/nonexistent/ca.pem", "SECURITY_PROTOCOL": "SSL"},
     "GNPD_KAFKA__SSL_CAFILE: /nonexistent/ca.pem does not exist or is not a file"),
    ({"SSL_CAFILE": "{ca}"}, "GNPD_KAFKA__SSL_CAFILE set, but GNPD_KAFKA__SECURITY_PROTOCOL "
                             "is PLAINTEXT: use SSL or SASL_SSL"),
    ({"SECURITY_PROTOCOL": "SSL", "SSL_KEYFILE": "{key}"},
     "GNPD_KAFKA__SSL_KEYFILE needs GNPD_KAFKA__SSL_CERTFILE"),
])
def test_security_misconfiguration_is_a_clear_settings_error(
        monkeypatch: pytest.MonkeyPatch, pem_files, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"GNPD_KAFKA__{name}",
                           value.format(ca=pem_files["ca"], key=pem_files["key"]))
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    assert message in str(info.value)
    assert "pa55" not in str(info.value)


# ---- Kafka: every client gets the options -------------------------------------------------------

class _Recorder:
    """Stands in for a kafka-python client class; records the keyword arguments."""

    made: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, **config: Any) -> None:
        self.made.append((type(self).__name__, config))

    def topics(self) -> set[str]:
        return {"samples", "samples.dlq"}

    def close(self, **kwargs: Any) -> None:
        pass


class KafkaConsumer(_Recorder):
    pass


class KafkaProducer(_Recorder):
    pass


class KafkaAdminClient(_Recorder):
    pass


def test_every_client_the_ingestor_makes_gets_the_security_options(
        monkeypatch: pytest.MonkeyPatch, pem_files, tmp_path: Path) -> None:
    _Recorder.made = []
    for cls in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        monkeypatch.setattr(f"daemon.kafka_clients.{cls.__name__}", cls)
    kafka = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SASL_SSL",
                          sasl_mechanism="SCRAM-SHA-256", sasl_username="gnpd",
                          sasl_password="secret", ssl_cafile=pem_files["ca"])
    ing = Ingestor(kafka, ChunkStore(tmp_path / "store", 5, (4,)), input_shape=(4,),
                   num_classes=3)
    ing.connect()
    ing.close()
    assert sorted(name for name, _ in _Recorder.made) == \
        ["KafkaAdminClient", "KafkaConsumer", "KafkaProducer"]
    for name, config in _Recorder.made:
        expected = kafka.client_kwargs()
        assert {k: config.get(k) for k in expected} == expected, name


def test_the_reference_producer_gets_the_security_options(
        monkeypatch: pytest.MonkeyPatch, pem_files) -> None:
    import kafka as kafka_python

    from daemon.producer import produce_main

    _Recorder.made = []

    class Producer(_Recorder):
        def send(self, topic, value):
            class Done:
                def add_errback(self, fn):
                    return self
            return Done()

        def flush(self):
            pass

    monkeypatch.setattr(kafka_python, "KafkaProducer", Producer)
    monkeypatch.setenv("GNPD_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("GNPD_KAFKA__SSL_CAFILE", str(pem_files["ca"]))
    lines = pem_files["ca"].parent / "m.jsonl"
    lines.write_text('{"features": [1], "label": 0}\n')
    assert produce_main(["--file", str(lines), "--bootstrap-servers", "k:9093", "--quiet"]) == 0
    ((_, config),) = _Recorder.made
    assert config["bootstrap_servers"] == "k:9093" and config["security_protocol"] == "SSL"
    assert config["ssl_cafile"] == str(pem_files["ca"])


# ---- HTTP bearer token ------------------------------------------------------------------------

@pytest.fixture
def closed_server():
    srv = HttpServer(create_app(ServedModel((1, 8, 8)), Metrics(),
                                serve=ServeSettings(api_token=TOKEN)), "127.0.0.1", 0)
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client
    srv.stop()


@pytest.mark.integration
def test_with_a_token_the_api_needs_it_and_the_probes_do_not(closed_server) -> None:
    client = closed_server
    body = {"instances": [[0.5] * 64]}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        for method, path in (("POST", "/v1/predict"), ("GET", "/v1/model")):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "GNPD_SERVE__API_TOKEN" in r.json()["detail"]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/predict", json=body, headers=good).status_code == 503  # no model yet
    assert client.get("/v1/model", headers=good).status_code == 503
    assert client.post("/v1/predict", json=body,
                       headers={"authorization": f"bearer  {TOKEN}"}).status_code == 503
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # open, and honest: no model yet
    assert client.get("/metrics").status_code == 200
    for path in ("/docs", "/openapi.json"):  # the schema is not served when the API is closed
        assert client.get(path, headers=good).status_code == 404


@pytest.mark.integration
def test_without_a_token_the_api_is_open() -> None:
    srv = HttpServer(create_app(ServedModel((1, 8, 8)), Metrics()), "127.0.0.1", 0)
    srv.start()
    try:
        r = httpx.post(f"{srv.url}/v1/predict", json={"instances": [[0.5] * 64]})
        assert r.status_code == 503
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 200
    finally:
        srv.stop()


@pytest.mark.integration
def test_require_token_is_reusable_for_new_endpoints() -> None:
    """The other /v1 endpoints (rollback, pin) declare the same dependency."""
    app = FastAPI()

    @app.post("/v1/model/rollback", dependencies=[Depends(require_token(SecretStr(TOKEN)))])
    async def rollback() -> dict[str, bool]:
        return {"rolled_back": True}

    srv = HttpServer(app, "127.0.0.1", 0)
    srv.start()
    try:
        assert httpx.post(f"{srv.url}/v1/model/rollback").status_code == 401
        r = httpx.post(f"{srv.url}/v1/model/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json() == {"rolled_back": True}
    finally:
        srv.stop()


@pytest.mark.parametrize("value, ok", [("", True), ("   ", True), ("short", False),
                                       ("x" * 16, True)])
def test_api_token_setting(monkeypatch: pytest.MonkeyPatch, value: str, ok: bool) -> None:
    monkeypatch.setenv("GNPD_SERVE__API_TOKEN", value)
    if ok:
        token = load_settings(env_file=None).serve.api_token
        assert (token is None) == (not value.strip())
        return
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    assert "GNPD_SERVE__API_TOKEN: the API token must be at least 16 characters" in str(info.value)
    assert "short" not in str(info.value)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValidationError):
        KafkaSettings(security_protocol="SSL", ssl_cafile=Path("/nonexistent.pem"))


# ---- Kafka over TLS end to end: a real broker behind a TLS terminator ---------------------------

def _make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=gnpd test CA")
    for name, usage, san in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
                             ("client", "clientAuth", "")):
        (folder / f"{name}.ext").write_text(f"{san}extendedKeyUsage={usage}\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                    "client.key")}


class _TlsTerminator:
    """Accepts mutual-TLS connections on `port` and pipes their bytes to a plaintext broker."""

    def __init__(self, port: int, upstream: tuple[str, int], certs: dict[str, Path]) -> None:
        self.port, self.upstream = port, upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                  cafile=str(certs["ca.pem"]))
        self.context.load_cert_chain(certs["server.pem"], certs["server.key"])
        self.context.verify_mode = ssl.CERT_REQUIRED  # clients must show their certificate
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _TlsTerminator:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)


@pytest.mark.integration
def test_mutual_tls_reaches_the_consumer_the_admin_and_the_dead_letter_producer(
        tmp_path: Path) -> None:
    """The broker is reachable only through mutual TLS: ingesting and dead-lettering work
    when the settings carry CA, certificate and key, and not in plaintext."""
    from kafka import KafkaProducer as RealProducer

    from daemon.broker import EmbeddedBroker, free_port

    certs = _make_certs(tmp_path)
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised=f"127.0.0.1:{proxy_port}")
    with _TlsTerminator(proxy_port, ("127.0.0.1", 0), certs) as proxy:
        broker.start()
        proxy.upstream = ("127.0.0.1", broker.port)
        try:
            kafka = KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{proxy_port}", topic="secure", group_id="g",
                poll_timeout_ms=100, max_message_bytes=2000, security_protocol="SSL",
                ssl_cafile=certs["ca.pem"], ssl_certfile=certs["client.pem"],
                ssl_keyfile=certs["client.key"])
            producer = RealProducer(**kafka.client_kwargs())
            for i in range(5):
                producer.send("secure", b'{"id": "good/%d", "features": [1, 2, 3, 4], '
                                        b'"label": 1}' % i)
            producer.send("secure", b'{"features": [1, 2, 3, 4], "label": 7}')
            producer.flush()
            producer.close()
            store = ChunkStore(tmp_path / "store", 5, (4,), 0.2)
            ing = Ingestor(kafka, store, input_shape=(4,), num_classes=3, lag_interval=0.0)
            try:
                deadline = time.monotonic() + 30
                while ing.stats.consumed < 6:
                    assert time.monotonic() < deadline, ing.stats
                    ing.poll_once(100)
                ing._flush_dead_letters()  # noqa: SLF001 - the DLQ send must have gone through
            finally:
                ing.stop()
            assert sorted(store.read_table()["id"].to_pylist()) == [f"good/{i}" for i in range(5)]
            dead = read_all_secure(kafka, "secure.dlq", 1)
            assert [dict(r.headers)["reason"] for r in dead] == [b"bad_label"]
            assert proxy.handshakes >= 3

            plain = kafka.model_copy(update={"security_protocol": "PLAINTEXT",
                                             "ssl_cafile": None, "ssl_certfile": None,
                                             "ssl_keyfile": None})
            ing = Ingestor(plain, ChunkStore(tmp_path / "plain", 5, (4,)), input_shape=(4,),
                           num_classes=3)
            with pytest.raises(Exception, match="bootstrap|NoBrokers|Timeout"):
                ing.connect()
            ing.close()
        finally:
            broker.stop()


def read_all_secure(kafka: KafkaSettings, topic: str, expect: int) -> list:
    from kafka import KafkaConsumer as RealConsumer
    from kafka import TopicPartition

    consumer = RealConsumer(**kafka.client_kwargs(), enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list = []
        for _ in range(50):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if len(records) >= expect:
                break
        return records
    finally:
        consumer.close()


def test_a_token_from_a_file_with_a_trailing_newline_works_and_a_non_ascii_one_is_refused(
        monkeypatch):
    # `kubectl create secret --from-file` keeps the newline, which no header can carry: the
    # token was accepted at start and every /v1 call answered 401 for good.
    from daemon.settings import SettingsError, load_settings

    monkeypatch.setenv("GNPD_SERVE__API_TOKEN", TOKEN + "\n")
    serve = load_settings(env_file=None).serve
    assert serve.api_token.get_secret_value() == TOKEN
    srv = HttpServer(create_app(ServedModel((1, 8, 8)), Metrics(), serve=serve), "127.0.0.1", 0)
    srv.start()
    try:
        r = httpx.get(f"{srv.url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code != 401
    finally:
        srv.stop()
    monkeypatch.setenv("GNPD_SERVE__API_TOKEN", "é" * 32)  # headers are latin-1, not UTF-8
    with pytest.raises(SettingsError, match="printable ASCII"):
        load_settings(env_file=None)
