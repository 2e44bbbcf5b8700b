"""HTTP serving on a real uvicorn server on 127.0.0.1: endpoints, errors, swaps under load."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gnp
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ModelVersion, ServedModel, UpdateCost
from daemon.serving import MAX_INSTANCES, HttpServer, create_app, freeze_heap
from daemon.settings import ServeSettings

pytestmark = pytest.mark.integration

SHAPE = (1, 8, 8)
REPO = Path(__file__).resolve().parents[2]


def _version(n: int, **kw) -> ModelVersion:
    return ModelVersion(version=n, parent=n - 1 or None, created=1.0e9 + n,
                        model_name="lenet-300-100", input_shape=SHAPE, num_classes=10,
                        chunk_ids=(f"c{n}",), seen_chunk_ids=tuple(f"c{i}" for i in range(1, n + 1)),
                        val_accuracy=kw.get("acc", 0.5), active_params=1000, dense_params=4000,
                        cost=UpdateCost(500, 1.5, 2.0, "cpu"))


@pytest.fixture
def server():
    served, metrics = ServedModel(SHAPE), Metrics()
    history: list[ModelVersion] = []
    srv = HttpServer(create_app(served, metrics, lambda: list(history)), "127.0.0.1", 0)
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        yield srv, served, metrics, history, client
    srv.stop()


def _metric(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_port_zero_binds_a_free_port_that_is_discoverable(server):
    srv, *_, client = server
    assert srv.port > 0 and srv.url == f"http://127.0.0.1:{srv.port}"
    assert client.get("/healthz").status_code == 200


def test_responses_are_not_delayed_by_nagle(server):
    """Without TCP_NODELAY on accepted sockets every answer took ~40 ms (delayed ACK)."""
    *_, client = server
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.02


def test_without_a_model_predict_and_readyz_answer_503(server):
    _, _, metrics, _, client = server
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    r = client.post("/v1/predict", json={"instances": [[0.0] * 64]})
    assert r.status_code == 503 and "no model" in r.json()["detail"]
    assert client.get("/v1/model").status_code == 503
    assert _metric(metrics, "gnp_predict_requests_total", {"status": "error"}) == 1


def test_predict_model_readyz_and_metrics_with_a_served_model(server):
    _, served, metrics, history, client = server
    torch.manual_seed(0)
    model = gnp.build_model("lenet-300-100", SHAPE, 10)
    history.extend([_version(1, acc=0.4), _version(2, acc=0.6)])
    served.publish(model, history[-1])

    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    r = client.post("/v1/predict", json={"instances": x.tolist()})
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == 2
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(x).reshape(4, *SHAPE)), 1)
    assert body["predictions"] == expected.argmax(1).tolist()
    np.testing.assert_allclose(body["probabilities"], expected.numpy(), rtol=1e-5, atol=1e-6)
    nested = client.post("/v1/predict", json={"instances": x.reshape(4, *SHAPE).tolist()})
    assert nested.json()["predictions"] == body["predictions"]

    assert client.get("/readyz").json() == {"ready": True, "model_version": 2}
    info = client.get("/v1/model").json()
    assert info["version"] == 2 and info["parent"] == 1 and info["val_accuracy"] == 0.6
    assert info["active_parameters"] == 1000 and info["dense_parameters"] == 4000
    assert info["compression"] == 4.0 and info["cost"]["epochs"] == 1.5
    assert [h["version"] for h in info["history"]] == [1, 2]
    assert info["history"][0]["val_accuracy"] == 0.4 and info["history"][0]["chunks"] == ["c1"]

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    ok = [s for s in families["gnp_predict_requests"].samples
          if s.name == "gnp_predict_requests_total" and s.labels == {"status": "ok"}]
    assert ok[0].value == 2
    count = [s for s in families["gnp_predict_duration_seconds"].samples
             if s.name.endswith("_count")]
    assert count[0].value == 2


_BAD = {
    "not json": (b'{"instances": [', "not valid JSON"),
    "not an object": (b"[[0.5]]", "JSON object"),
    "no instances": (b'{"inputs": [[0.5]]}', "JSON object"),
    "empty": (b'{"instances": []}', "empty"),
    "wrong size": (b'{"instances": [[0.5, 0.5]]}', "shape [1, 8, 8]"),
    "wrong nested shape": (b'{"instances": [[[0.5]]]}', "shape [1, 8, 8]"),
    "ragged": (b'{"instances": [[' + b"0," * 63 + b"0], [0]]}", "same shape"),
    "strings": (b'{"instances": [["a"]]}', "numbers"),
    # numbers written as strings, and booleans, are refused, not coerced (as in ingestion)
    "numeric strings": (b'{"instances": [[' + b'"0.5",' * 63 + b'"0.5"]]}', "numbers"),
    "booleans": (b'{"instances": [[' + b"true," * 63 + b"false]]}", "numbers"),
    "mixed booleans": (b'{"instances": [[true' + b",0.5" * 63 + b"]]}", "numbers"),
    "nan": (b'{"instances": [[NaN' + b",0" * 63 + b"]]}", "non-finite"),
    "infinity": (b'{"instances": [[1e999' + b",0" * 63 + b"]]}", "non-finite"),
    "too many": (b'{"instances": [' + b",".join([b"[" + b",".join([b"0"] * 64) + b"]"]
                                                 * (MAX_INSTANCES + 1)) + b"]}", "too many"),
}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((1, 64), np.float32))
    return buf.getvalue()


_BAD_NPY = {  # each was a 500: np.load opened the zip, or allocated what the header claimed
    "an .npz archive": (_npz(), "not a valid .npy"),
    "zip-like bytes": (b"PK\x03\x04" + b"garbage" * 10, "not a valid .npy"),
    "a header claiming a huge shape": (
        _npy(np.zeros((2, 64), np.float32)).replace(b"(2, 64)", b"(2000000000, 64)"), "bytes"),
    "a cut body": (_npy(np.zeros((2, 64), np.float32))[:-8], "the body holds"),
}


@pytest.mark.parametrize("kind, case", [("application/json", c) for c in sorted(_BAD)]
                         + [("application/x-npy", c) for c in sorted(_BAD_NPY)])
def test_bad_predict_requests_answer_400_with_a_clear_message(server, kind, case):
    _, served, metrics, _, client = server
    served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
    body, message = (_BAD if kind == "application/json" else _BAD_NPY)[case]
    r = client.post("/v1/predict", content=body, headers={"content-type": kind})
    assert r.status_code == 400 and message in r.json()["detail"], (r.status_code, r.text)
    assert _metric(metrics, "gnp_predict_requests_total", {"status": "error"}) == 1
    assert _metric(metrics, "gnp_predict_requests_total", {"status": "ok"}) == 0


def test_a_fortran_order_npy_body_answers_like_the_c_order_one(server):
    _, served, _, _, client = server
    served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
    x = np.asfortranarray(np.random.default_rng(0).random((3, 64), np.float32))
    want = client.post("/v1/predict", content=_npy(np.ascontiguousarray(x)),
                       headers={"content-type": "application/x-npy"})
    got = client.post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
    assert got.status_code == want.status_code == 200 and got.json() == want.json()


class _ConstantModel(nn.Module):
    """Answers class `label` for every input, after a short pause (so swaps hit mid-request)."""

    def __init__(self, label: int, classes: int = 64) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.0005)
        out = torch.zeros(x.shape[0], self.classes)
        out[:, self.label] = 10.0
        return out


def test_requests_during_repeated_swaps_never_fail_and_match_one_version(server):
    _, served, metrics, _, client = server
    versions = 50
    models = {n: _ConstantModel(label=n) for n in range(1, versions + 1)}
    served.publish(models[1], _version(1))
    stop, answers, errors = threading.Event(), [], []

    def client_loop() -> None:
        with httpx.Client(base_url=client.base_url, timeout=10) as c:
            x = [[0.1] * 64] * 3
            while not stop.is_set():
                try:
                    r = c.post("/v1/predict", json={"instances": x})
                    answers.append((r.status_code, r.json()))
                except Exception as e:  # noqa: BLE001 - any transport error is a failure
                    errors.append(repr(e))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    seen_during = set()
    for n in range(2, versions + 1):
        time.sleep(0.02)
        served.publish(models[n], _version(n))
        seen_during.add(n)
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()

    assert errors == []
    assert len(answers) > versions  # requests really overlapped the swaps
    assert all(code == 200 for code, _ in answers)
    for _, body in answers:
        v = body["model_version"]
        assert 1 <= v <= versions
        assert body["predictions"] == [v, v, v]  # every instance answered by that version
        assert all(max(range(64), key=p.__getitem__) == v for p in body["probabilities"])
    assert len({body["model_version"] for _, body in answers}) > 10
    assert _metric(metrics, "gnp_predict_requests_total", {"status": "error"}) == 0


def test_in_process_predictions_during_swaps_are_consistent():
    served = ServedModel(SHAPE)
    served.publish(_ConstantModel(1), _version(1))
    stop, bad, count = threading.Event(), [], [0]

    def loop() -> None:
        while not stop.is_set():
            labels, _, version = served.predict(np.zeros((2, 64), np.float32))
            count[0] += 1
            if labels.tolist() != [version % 64] * 2:
                bad.append((version, labels.tolist()))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(2, 202):
        served.publish(_ConstantModel(n % 64), _version(n))
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert bad == [] and count[0] > 200


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 8, 8), (8, 1, 8), (1, 64), (64, 1)])
def test_predict_accepts_the_input_shape_without_size_1_dims(server, shape):
    """Issue 8, item 12: an 8x8 list for input shape [1, 8, 8] was refused (400)."""
    _, served, _, _, client = server
    torch.manual_seed(0)
    served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    flat = client.post("/v1/predict", json={"instances": x.tolist()})
    r = client.post("/v1/predict", json={"instances": x.reshape(3, *shape).tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == flat.json()["predictions"]
    np.testing.assert_allclose(r.json()["probabilities"], flat.json()["probabilities"])


def test_predict_shape_error_states_the_rule(server):
    _, served, _, _, client = server
    served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
    r = client.post("/v1/predict", json={"instances": [[[0.5] * 4] * 16]})
    assert r.status_code == 400
    assert r.json()["detail"] == ("each instance must have shape [1, 8, 8] (size-1 dimensions "
                                  "optional, e.g. [8, 8]) or flat with 64 values; got instances "
                                  "of shape [16, 4]")


# ---- issue 8, item 4: body size, nesting depth, liveness under load ----------------------------

_SERVER = textwrap.dedent("""
    import sys
    from daemon.metrics import Metrics
    from daemon.registry import ServedModel
    from daemon.serving import HttpServer, create_app
    srv = HttpServer(create_app(ServedModel((1, 8, 8)), Metrics()), "127.0.0.1", 0)
    srv.start()
    print(srv.port, flush=True)
    sys.stdin.read()  # serve until the test closes stdin
""")


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a process, bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _post_raw(port: int, size: int, chunked: bool) -> tuple[bytes, int]:
    """POST `size` bytes of '[' to /v1/predict; returns (status line, bytes sent).

    Sends from this thread while another reads, so a response that comes before the
    body is finished (the point of the test) is seen.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    sock.sendall(head + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked
                         else b"Content-Length: %d\r\n\r\n" % size))
    answer = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer and (data := sock.recv(4096)):
                answer.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    block, sent = b"[" * (1 << 20), 0
    with contextlib.suppress(OSError):  # the server may close the connection on us
        while sent < size and reader.is_alive():
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked and sent >= size:
            sock.sendall(b"0\r\n\r\n")
    reader.join(30)
    sock.close()
    return bytes(answer).split(b"\r\n")[0], sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_over_limit_body_is_refused_while_streaming(chunked: bool) -> None:
    """A 256 MB body cost +516 MB RSS (read whole, then refused). Now: 413 from the
    Content-Length before reading, or once the streamed bytes pass the limit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        port = int(proc.stdout.readline())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.post("/v1/predict", json={"instances": [[0.5] * 64]}).status_code == 503
            before = _peak_rss(proc.pid)
            status, sent = _post_raw(port, 256 << 20, chunked)
            grown = _peak_rss(proc.pid) - before
            assert client.get("/healthz").status_code == 200
    finally:
        proc.stdin.close()
        proc.wait(10)
    limit = 16 << 20  # ServeSettings().max_body_bytes, the default
    print(f"peak RSS grew {grown / 2**20:.1f} MiB for a 256 MiB body ({status.decode()})")
    assert grown < limit + (16 << 20), f"peak RSS grew {grown >> 20} MiB for a 256 MiB body"
    assert status == b"HTTP/1.1 413 Request Entity Too Large", status
    assert limit == ServeSettings().max_body_bytes
    assert sent < 256 << 20  # refused before the client finished sending


def test_deep_nesting_is_a_400_never_a_500(server):
    _, served, metrics, _, client = server
    served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
    for depth in (1_100, 100_000):
        body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["detail"] or "recursion" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


class _GatedModel(nn.Module):
    """Blocks every forward pass until `gate` is set: predict load that never finishes."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(30)
        return torch.zeros(x.shape[0], 10)


def test_liveness_answers_while_predict_load_fills_every_thread(server):
    """Before, /healthz ran in the same thread pool (40 threads) as predict: 50 stuck
    predicts made liveness time out, and Kubernetes would restart a busy pod."""
    _, served, _, _, client = server
    gate = threading.Event()
    served.publish(_GatedModel(gate), _version(1))
    codes: list[int] = []
    clients = [httpx.Client(base_url=client.base_url, timeout=60) for _ in range(50)]

    def predict(c: httpx.Client) -> None:
        codes.append(c.post("/v1/predict", json={"instances": [[0.5] * 64]}).status_code)

    threads = [threading.Thread(target=predict, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # every request is in: in the model, or waiting for a slot
        assert codes == []
        for path in ("/healthz", "/readyz", "/metrics") * 3:
            t0 = time.perf_counter()
            r = client.get(path, timeout=3.0)
            assert r.status_code == 200 and time.perf_counter() - t0 < 0.5, path
    finally:
        gate.set()
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
    assert codes == [200] * 50


def test_serving_the_compact_model_answers_like_the_recoverable_one_and_reports_both_sizes():
    """GNPD_SERVE__MODEL=compact: a cgap model's inactive units are sliced away for serving;
    predictions match the recoverable model's; /v1/model and the metrics give the served
    module's size and measured latency beside the recoverable model's parameters."""
    from daemon.control import record_served
    from gnp.units import UnitMasks, seed_units
    model = gnp.build_model("lenet-300-100", SHAPE, 10)
    seed_units(UnitMasks.attach(model), gnp.Masks(model), 0.2, torch.Generator().manual_seed(0))
    served, metrics = ServedModel(SHAPE, "compact"), Metrics()
    version = _version(1)
    served.publish(model, version)
    record_served(metrics, version, served.info())
    info = served.info()
    assert info["variant"] == "compact" and info["parameters"] == sum(
        p.numel() for p in served.current()[0].parameters())
    assert info["parameters"] < 0.3 * sum(p.numel() for p in model.parameters())
    assert 0 < info["latency_seconds_batch1"] < 1.0
    x = np.random.default_rng(1).random((6, 64), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(x).reshape(6, *SHAPE)), 1)
    np.testing.assert_allclose(served.predict(x).probabilities, expected.numpy(), atol=1e-6)
    assert _metric(metrics, "gnp_model_served_parameters") == info["parameters"]
    assert _metric(metrics, "gnp_model_parameters") == version.active_params
    srv = HttpServer(create_app(served, metrics, lambda: [version]), "127.0.0.1", 0)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            body = client.get("/v1/model").json()
        assert body["serving"] == info and body["active_parameters"] == version.active_params
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="variant"):
        ServedModel(SHAPE, "tiny")


class _Node:
    pass


def test_freeze_heap_keeps_start_up_objects_off_the_collector_and_frees_garbage_first():
    live, dead = _Node(), _Node()
    live.me, dead.me = live, dead  # cycles: only the cyclic collector frees them
    gone = weakref.ref(dead)
    del dead
    try:
        assert freeze_heap() == gc.get_freeze_count() > 0
        assert gone() is None  # collected, not kept for good
        assert not any(o is live for o in gc.get_objects())  # full collections skip it
    finally:
        gc.unfreeze()
    assert any(o is live for o in gc.get_objects())


def test_the_predict_fast_path_answers_exactly_as_the_fastapi_route() -> None:
    """A classifier's predict skips FastAPI (daemon.serving._App); the route stays for the
    docs and speech. Both must give the same status, body and headers for every kind of
    request: good JSON and .npy, each bad body, an over-limit body, a wrong token."""
    import io

    token = "0123456789abcdef-fast-path"
    serve = ServeSettings(api_token=token, max_body_bytes=256 * 1024)
    served = ServedModel(SHAPE)
    torch.manual_seed(0)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    npy = io.BytesIO()
    np.save(npy, x)
    good = {"authorization": f"Bearer {token}"}
    requests = [(b'{"instances": %s}' % str(x.tolist()).encode(), "application/json", good),
                (npy.getvalue(), "application/x-npy", good),
                (b'{"instances": [[0.5]]}', "application/json", {}),
                (b'{"instances": [[0.5]]}', "application/json",
                 {"authorization": f"Basic {token}"}),
                (b"[" * (512 * 1024), "application/json", good)]
    requests += [(body, "application/json", good) for body, _ in _BAD.values()]
    answers = []
    for fast in (True, False):
        app = create_app(served, Metrics(), serve=serve)
        assert app.predict_fast_path is not None
        if not fast:
            app.predict_fast_path = None  # every request through FastAPI and the route
        with HttpServer(app, "127.0.0.1", 0) as srv, httpx.Client(base_url=srv.url,
                                                                  timeout=10) as client:
            if fast:
                assert client.post("/v1/predict", content=requests[0][0],
                                   headers=good).status_code == 503  # no model yet
                served.publish(gnp.build_model("lenet-300-100", SHAPE, 10), _version(1))
            answers.append([(r.status_code, r.json(), r.headers.get("www-authenticate"),
                             r.headers["content-type"])
                            for body, kind, headers in requests
                            for r in [client.post("/v1/predict", content=body,
                                                  headers={**headers, "content-type": kind})]])
    fast, routed = answers
    assert [a[0] for a in fast] == [200, 200, 401, 401, 413] + [400] * len(_BAD)
    assert fast == routed
