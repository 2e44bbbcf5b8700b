"""HTTP serving: predictions from the served model, model metadata, health and metrics.

Endpoints (see :func:`create_app`)::

    POST /v1/predict  {"instances": [[...], ...]} -> predictions, probabilities, model_version
                      (or a .npy body, Content-Type application/x-npy, or an Arrow IPC
                      stream with a ``features`` column, application/vnd.apache.arrow.stream)
                      speech model: {"sample_rate": R, "instances": [{"audio": [...]} or
                      {"audio_pcm16": "<base64>"}]} -> transcripts, confidence, model_version
    GET  /v1/model    served version, accuracy, parameters, compression, cost, update history
    GET  /healthz     200 while the process is alive
    GET  /readyz      200 once a model is served, else 503
    GET  /metrics     Prometheus text format

With ``GNPD_SERVE__API_TOKEN`` set, ``/v1/*`` need ``Authorization: Bearer <token>``
(:mod:`daemon.auth`); the probes and ``/metrics`` stay open, and the generated API
docs (``/docs``, ``/openapi.json``) are switched off.

Predict scales with concurrency through a dynamic batcher (:mod:`daemon.batching`):
concurrent requests are joined into one forward pass (up to ``batch_max_rows``
instances, waiting at most ``batch_wait_ms`` for more while others are on their way),
run on the batcher's thread -- never on the event loop -- and every caller gets its own
rows, all from the one model version the answer names. JSON is parsed and written with
orjson. A classifier's predict is answered by a bare ASGI handler before FastAPI's
middleware and routing (:class:`_App`; the answers are the route's, tested side by
side), so middleware added to the app does not see those requests. A speech model's
request is not batched (its instances differ in length): its body is read under the
same limits and transcribed on the ``predict_workers`` pool.

Load cannot take the process down or starve the probes: a predict body over
``max_body_bytes`` is refused (413) from its Content-Length or while it streams in,
never read whole; JSON nesting is bounded (400); a small body is parsed on the event
loop (tens of microseconds), a large one (over 256 KiB) on a small executor of
``predict_workers`` threads, with at most twice that many large bodies in memory; past
``max_queued_requests`` requests waiting for the model the answer is 503 with
``Retry-After`` at once; ``/healthz``, ``/readyz`` and ``/metrics`` answer on the event
loop, never queued behind predict.

:class:`HttpServer` runs uvicorn in a background thread on a socket it binds itself, so
the bound port is known (port 0 picks a free one) and bind errors surface at once.
"""

from __future__ import annotations

import asyncio
import gc
import io
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from daemon.arrow_batch import ARROW_CONTENT_TYPE
from daemon.auth import UNAUTHORIZED_DETAIL, Dependency, bearer_check, require_token
from daemon.batching import DynamicBatcher, Overloaded
from daemon.messages import (load_json, matches_input_shape, may_hold_bools, numeric_array,
                             shape_rule)
from daemon.metrics import Metrics
from daemon.registry import ModelVersion, NoModelError, ServedModel
from daemon.settings import ServeSettings

__all__ = ["MAX_INSTANCES", "NPY_CONTENT_TYPES", "HttpServer", "PredictRequest", "create_app",
           "freeze_heap"]

log = logging.getLogger(__name__)

MAX_INSTANCES = 1024
SPEECH_MAX_SECONDS = 30.0  # longest audio instance a speech model transcribes per request
NPY_CONTENT_TYPES = ("application/x-npy", "application/npy")
_NUMERIC_JSON = b"0123456789.,-+eE[] \n\r\t}"  # what flat rows of numbers are made of
_INLINE_BODY = 256 * 1024  # bodies up to this are parsed on the event loop (tens of µs)


class PredictRequest(BaseModel):
    """Body of ``POST /v1/predict``."""

    instances: list[Any] = Field(
        description="Instances to classify; each is a flat list of numbers or a nested list "
                    "of the model's input shape, size-1 dimensions optional (a 28x28 list "
                    "for [1, 28, 28]); pixels scaled to 0..1.")


_PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "application/x-npy": {"schema": {"type": "string", "format": "binary",
                                     "description": "numpy .npy of shape (N, *input_shape) "
                                                    "or (N, D), any float or int dtype"}},
    ARROW_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary",
                                    "description": "Arrow IPC stream with a 'features' "
                                                   "fixed_size_list<float32>[D] column"}}}}}


class _BadRequest(ValueError):
    """A predict request that cannot be answered as sent (HTTP 400)."""


class _TooLarge(ValueError):
    """A predict body over the limit (HTTP 413)."""


async def _read_body(declared: str | None, chunks: AsyncIterator[bytes],
                     limit: int) -> bytearray:
    """The request body, refused (_TooLarge) as soon as it is known to exceed ``limit``.

    A Content-Length (``declared``) over the limit is refused before reading anything; a
    chunked body is refused once the bytes read so far pass the limit, so at most
    ``limit`` bytes (plus one network chunk) are ever held.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} "
                        f"bytes (GNPD_SERVE__MAX_BODY_BYTES): send fewer instances")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"request body is over the limit of {limit} bytes "
                            f"(GNPD_SERVE__MAX_BODY_BYTES): send fewer instances")
    return body


async def _receive_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The body of an ASGI request, as it arrives; ClientDisconnect if the client leaves."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _parse(body: bytes | bytearray, input_shape: tuple[int, ...], limit: int,
           content_type: str = "application/json") -> np.ndarray:
    """The body's instances as float32 (N, *input_shape); raises _BadRequest naming the problem.

    ``content_type`` picks the decoder: JSON (the default for anything else), .npy, or
    an Arrow IPC stream.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind in NPY_CONTENT_TYPES:
        return _checked(_from_npy(body), input_shape, limit)
    if kind == ARROW_CONTENT_TYPE:
        return _checked(_from_arrow(body), input_shape, limit)
    return _parse_json(body, input_shape, limit)


def _from_npy(body: bytes | bytearray) -> np.ndarray:
    """The array of a .npy body, read from its header: a number dtype (never an object array,
    never unpickled) whose shape accounts for exactly the bytes sent. np.load would open a
    zip (.npz) body, or allocate whatever shape a short body's header claims."""
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version,
                                                                  np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError) as e:
        raise _BadRequest(f"body is not a valid .npy array: {e}") from None
    if dtype.kind not in "iuf":
        raise _BadRequest(f"the .npy array must hold numbers, got dtype {dtype}")
    count, data = math.prod(shape), len(body) - f.tell()
    if count * dtype.itemsize != data:
        raise _BadRequest(f"the .npy header says shape {list(shape)} of {dtype} "
                          f"({count * dtype.itemsize} bytes), the body holds {data}")
    arr = np.frombuffer(body, dtype, count, offset=f.tell())  # a read-only view of the body
    return arr.reshape(shape, order="F" if fortran else "C").copy()  # writable, as np.load's


def _from_arrow(body: bytes | bytearray) -> np.ndarray:
    try:
        table = ipc.open_stream(pa.py_buffer(bytes(body))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise _BadRequest(f"body is not an Arrow IPC stream: {e}") from None
    if "features" not in table.column_names:
        raise _BadRequest("the Arrow stream needs a 'features' column "
                          "(fixed_size_list<float32>[D])")
    col = table.column("features").combine_chunks()
    t = col.type
    if not pa.types.is_fixed_size_list(t) or not (pa.types.is_floating(t.value_type)
                                                   or pa.types.is_integer(t.value_type)):
        raise _BadRequest(f"'features' must be fixed_size_list<float32>[D], got {t}")
    if col.null_count or col.flatten().null_count:
        raise _BadRequest("'features' holds nulls")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), t.list_size)


def _checked(arr: np.ndarray, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """A binary body's array, checked as JSON instances are."""
    if arr.ndim < 1 or len(arr) == 0:
        raise _BadRequest("no instances: send at least one")
    if len(arr) > limit:
        raise _BadRequest(f"too many instances: {len(arr)} > {limit} per request")
    if arr.ndim < 2 or not matches_input_shape(arr.shape[1:], input_shape):
        raise _BadRequest(f"each instance must have shape {shape_rule(input_shape)}; "
                          f"got instances of shape {list(arr.shape[1:])}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():
        raise _BadRequest("instances contain non-finite values (NaN or infinity)")
    return x.reshape(x.shape[0], *input_shape)


def _flat_rows(instances: list, body: bytes | bytearray) -> np.ndarray | None:
    """Fast path for the common body, flat rows of numbers: float32 (N, D), or None.

    ``np.asarray`` of 784 Python floats costs ~3x what ``np.fromiter`` does. Only a body
    whose instances are written with number characters and brackets alone takes it, so
    nothing is coerced that :func:`numeric_array` would refuse; anything else (nested
    instances, ragged rows, null) returns None and takes the general path.
    """
    start = body.find(b"[")
    if start < 0 or bytes(memoryview(body)[start:]).translate(None, _NUMERIC_JSON) or (
            type(instances[0]) is not list):
        return None  # a string, true/false/null/NaN, or another key after the instances
    width = len(instances[0])
    if not width or any(type(r) is not list or len(r) != width for r in instances):
        return None
    try:
        flat = np.fromiter(itertools.chain.from_iterable(instances), np.float64,
                           count=width * len(instances))
    except (TypeError, ValueError):
        return None
    with np.errstate(over="ignore"):
        return flat.astype(np.float32).reshape(len(instances), width)


def _parse_json(body: bytes | bytearray, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    try:
        doc = load_json(body)
    except ValueError as e:  # invalid JSON or nested too deeply
        raise _BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise _BadRequest('body must be a JSON object {"instances": [instance, ...]}')
    instances = doc["instances"]
    if not instances:
        raise _BadRequest("'instances' is empty: send at least one instance")
    if len(instances) > limit:
        raise _BadRequest(f"too many instances: {len(instances)} > {limit} per request")
    arr = _flat_rows(instances, body)
    if arr is None:
        try:  # the same rule as ingestion: numbers only, never coerced from strings or booleans
            with np.errstate(over="ignore"):
                arr = numeric_array(instances, may_hold_bools(body)).astype(np.float32)
        except ValueError as e:
            raise _BadRequest(f"instances must be lists of numbers, all of the same shape "
                              f"{shape_rule(input_shape)} ({e})") from None
    if arr.ndim < 2 or not matches_input_shape(arr.shape[1:], input_shape):
        raise _BadRequest(f"each instance must have shape {shape_rule(input_shape)}; "
                          f"got instances of shape {list(arr.shape[1:])}")
    if not np.isfinite(arr).all():
        raise _BadRequest("instances contain non-finite values (NaN or infinity)")
    return arr.reshape(arr.shape[0], *input_shape)


def _version_summary(v: ModelVersion) -> dict[str, Any]:
    return {
        "version": v.version, "parent": v.parent, "created": v.created,
        "val_accuracy": v.val_accuracy, "active_parameters": v.active_params,
        "dense_parameters": v.dense_params, "compression": round(v.compression, 3),
        "chunks": list(v.chunk_ids),
        "cost": {"sample_passes": v.cost.sample_passes, "epochs": v.cost.epochs,
                 "wall_seconds": v.cost.wall_seconds, "device": v.cost.device},
    }


def create_app(served: ServedModel, metrics: Metrics,
               history: Callable[[], list[ModelVersion]] = list,
               max_instances: int = MAX_INSTANCES, *,
               serve: ServeSettings | None = None, routers: Sequence[APIRouter] = (),
               model_status: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The FastAPI application answering from ``served``.

    Args:
        served: the model to answer with (swapped by the updater).
        metrics: records predict requests and latency; ``/metrics`` exports its registry.
        history: returns every saved version (for ``/v1/model``).
        max_instances: most instances per predict request.
        serve: API token, body limit and predict threads (defaults: ``ServeSettings()``).
        routers: more routes (the admin routes of daemon.admin), added as they are: they
            carry their own dependencies (the token).
        model_status: extra fields for ``/v1/model`` (pin and head, from daemon.control).

    ``app.state.require_token`` is the token dependency, for endpoints added later.
    """
    serve = serve if serve is not None else ServeSettings()
    closed = serve.api_token is not None
    app = _App(title="gnpd", summary="Continual-learning model server (grow and prune)",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if closed else {}))
    app.state.require_token = auth = require_token(serve.api_token)
    _add_predict(app, served, metrics, max_instances, serve, auth)
    _add_status(app, served, metrics, history, auth, model_status)
    for router in routers:
        app.include_router(router)
    return app


def _parse_audio(body: bytes | bytearray, limit: int) -> tuple[list[np.ndarray], int]:
    """A speech model's predict body: {"sample_rate": R, "instances": [{"audio": [...]} or
    {"audio_pcm16": "<base64>"}, ...]}, the audio forms of a speech sample message."""
    from daemon.speech_messages import _check_audio
    try:
        doc = load_json(body)
    except ValueError as e:
        raise _BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list) or not doc["instances"]:
        raise _BadRequest('body must be a JSON object {"sample_rate": R, "instances": '
                          '[{"audio": [...]} or {"audio_pcm16": "<base64>"}, ...]}')
    if len(doc["instances"]) > limit:
        raise _BadRequest(f"too many instances: {len(doc['instances'])} > {limit} per request")
    rate = doc.get("sample_rate")
    if type(rate) is not int or rate < 1:
        raise _BadRequest(f"sample_rate must be a positive integer, got {rate!r}")
    audios = []
    for i, inst in enumerate(doc["instances"]):
        if not isinstance(inst, dict) or not ("audio" in inst or "audio_pcm16" in inst):
            raise _BadRequest(f"instance {i} must be an object with audio or audio_pcm16")
        try:
            audios.append(_check_audio(inst, bytes(body), rate, SPEECH_MAX_SECONDS))
        except ValueError as e:
            raise _BadRequest(f"instance {i}: {e}") from None
    return audios, rate


def _transcribe(served: ServedModel, body: bytes | bytearray,
                limit: int) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON payload of one speech predict request (run on the predict pool)."""
    try:
        audios, rate = _parse_audio(body, limit)
        texts, confidence, version = served.transcribe(audios, rate)
    except _BadRequest as e:
        return 400, {"detail": str(e)}
    except ValueError as e:  # a sample rate other than the model's
        return 400, {"detail": str(e)}
    except NoModelError as e:
        return 503, {"detail": f"{e}: the first update has not finished"}
    return 200, {"transcripts": texts, "confidence": confidence, "model_version": version}


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _add_predict(app: FastAPI, served: ServedModel, metrics: Metrics, limit: int,
                 serve: ServeSettings, auth: Dependency) -> None:
    # Large bodies are parsed on their own bounded executor, at most 2 per thread in memory.
    pool = ThreadPoolExecutor(serve.predict_workers, thread_name_prefix="gnpd-predict")
    slots = asyncio.Semaphore(2 * serve.predict_workers)
    batcher = DynamicBatcher(served.predict, serve.batch_max_rows, serve.batch_wait_ms / 1000,
                             serve.max_queued_requests,
                             on_batch=metrics.predict_batch_rows.observe)
    app.state.predict_pool, app.state.batcher = pool, batcher
    shape = served.input_shape
    counted = {s: metrics.predict_requests.labels(status=s) for s in ("ok", "error", "overloaded")}

    async def parse(kind: str, declared: str | None, chunks: AsyncIterator[bytes]) -> np.ndarray:
        if declared is not None and declared.isdigit() and int(declared) <= _INLINE_BODY:
            return _parse(await _read_body(declared, chunks, serve.max_body_bytes), shape, limit,
                          kind)
        async with slots:
            body = await _read_body(declared, chunks, serve.max_body_bytes)
            if len(body) <= _INLINE_BODY:
                return _parse(body, shape, limit, kind)
            return await asyncio.get_running_loop().run_in_executor(
                pool, _parse, body, shape, limit, kind)

    async def classify(kind: str, declared: str | None,
                       chunks: AsyncIterator[bytes]) -> tuple[int, Any, dict[str, str] | None]:
        """HTTP status, payload and extra headers of one classifier predict request."""
        start = time.perf_counter()
        status, code, payload, headers = "error", 500, {"detail": "internal error"}, None
        arrival = batcher.arrive()
        try:
            x = await parse(kind, declared, chunks)
            answer = await batcher.predict(x, arrival)
            status, code = "ok", 200
            payload = {"predictions": answer.labels, "probabilities": answer.probabilities,
                       "model_version": answer.version}
        except _BadRequest as e:
            code, payload = 400, {"detail": str(e)}
        except _TooLarge as e:
            code, payload = 413, {"detail": str(e)}
        except ClientDisconnect:
            code, payload = 400, {"detail": "the client went away before sending the body"}
        except NoModelError as e:
            code, payload = 503, {"detail": f"{e}: the first update has not finished"}
        except Overloaded as e:
            status, code, headers = "overloaded", 503, {"Retry-After": "1"}
            payload = {"detail": f"overloaded, retry shortly: {e}"}
        finally:
            arrival.leave()
            counted[status].inc()
            metrics.predict_duration.observe(time.perf_counter() - start)
        return code, payload, headers

    async def transcribe(request: Request) -> Response:
        # A speech model's answer: never batched (instances differ in length); the body is
        # read under the same limits and transcribed on the pool, never on the event loop.
        start = time.perf_counter()
        code, payload = 500, {"detail": "internal error"}
        try:
            async with slots:
                body = await _read_body(request.headers.get("content-length"),
                                        request.stream(), serve.max_body_bytes)
                code, payload = await asyncio.get_running_loop().run_in_executor(
                    pool, _transcribe, served, body, limit)
        except _TooLarge as e:
            code, payload = 413, {"detail": str(e)}
        except ClientDisconnect:
            code, payload = 400, {"detail": "the client went away before sending the body"}
        finally:
            counted["ok" if code == 200 else "error"].inc()
            metrics.predict_duration.observe(time.perf_counter() - start)
        return _json(payload, code)

    @app.post("/v1/predict", openapi_extra=_PREDICT_OPENAPI, dependencies=[Depends(auth)])
    async def predict(request: Request) -> Response:
        """Classify instances (a speech model: transcribe audio); every answer comes from
        the one model version it names."""
        if served.speech:
            return await transcribe(request)
        code, payload, headers = await classify(
            request.headers.get("content-type", "application/json"),
            request.headers.get("content-length"), request.stream())
        return _json(payload, code, headers)

    app.predict_fast_path = _PredictFastPath(served, classify, bearer_check(serve.api_token))


_FAST_PATH_HEADERS = (b"content-type", b"content-length", b"authorization")


class _App(FastAPI):
    """FastAPI, with a classifier's ``POST /v1/predict`` answered before its middleware.

    The request gets exactly the answer of the FastAPI route (which stays, for the API
    docs, a speech model's predict, and anything that reaches it), without FastAPI's
    per-request work: its middleware stack, routing, resolving the token dependency,
    building Request and Response objects. Under load that work was about a tenth of the
    HTTP thread's time (``py-spy --gil`` during ``benchmarks/predict_latency.py``), and
    that thread, which holds the GIL ~90% of the time at 32 connections, is what limits
    the request rate. Every other request goes through FastAPI as usual.
    """

    predict_fast_path: _PredictFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.predict_fast_path
        if (fast is not None and scope["type"] == "http" and scope["path"] == "/v1/predict"
                and scope["method"] == "POST" and not fast.served.speech):
            await fast(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _PredictFastPath:
    """The ASGI handler of a classifier's ``POST /v1/predict`` (see :class:`_App`)."""

    def __init__(self, served: ServedModel, classify: Callable[..., Any],
                 allowed: Callable[[str], bool] | None) -> None:
        self.served, self._classify, self._allowed = served, classify, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in _FAST_PATH_HEADERS}
        if self._allowed is not None and not self._allowed(headers.get("authorization", "")):
            await _send_json(send, 401, {"detail": UNAUTHORIZED_DETAIL},
                             {"WWW-Authenticate": "Bearer"})
            return
        code, payload, extra = await self._classify(
            headers.get("content-type", "application/json"), headers.get("content-length"),
            _receive_chunks(receive))
        await _send_json(send, code, payload, extra)


async def _send_json(send: Send, code: int, payload: Any,
                     headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _add_status(app: FastAPI, served: ServedModel, metrics: Metrics,
                history: Callable[[], list[ModelVersion]], auth: Dependency,
                model_status: Callable[[], dict[str, Any]] | None = None) -> None:
    @app.get("/v1/model", dependencies=[Depends(auth)])
    def model_info() -> JSONResponse:
        """The served version, its accuracy, size and cost, and the update history."""
        v = served.version
        if v is None:
            return JSONResponse({"detail": "no model is served yet"}, status_code=503)
        info = _version_summary(v)
        info.update(model_name=v.model_name, input_shape=list(v.input_shape),
                    num_classes=v.num_classes, seen_chunks=len(v.seen_chunk_ids),
                    history=[_version_summary(h) for h in history()])
        info.update(model_status() if model_status is not None else {})
        info["serving"] = served.info()
        return JSONResponse(info)

    # The probes and /metrics are `async def`: they run on the event loop itself, so no
    # thread pool that request load can fill ever delays them.
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 once a model is served."""
        v = served.version
        if v is None:
            return JSONResponse({"ready": False, "model_version": 0}, status_code=503)
        return JSONResponse({"ready": True, "model_version": v.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus exposition of the daemon's metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def freeze_heap() -> int:
    """Keep the cyclic garbage collector off every object alive now; returns how many.

    A full (generation 2) collection walks every object the collector tracks: with torch,
    FastAPI and a model loaded that took 110-310 ms on the 2-core benchmark machine, a
    stall for every request in flight -- the predict p99 at 32 connections. Objects built
    at start-up live as long as the process, so they are moved out of its reach
    (``gc.freeze``), once start-up is done; cyclic garbage is collected first, so none of
    it is kept for good. ``gc.unfreeze()`` hands them back (the daemon's stop does).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class HttpServer:
    """uvicorn serving ``app`` from a background thread.

    Args:
        app: the ASGI application.
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only
        # when the socket says it is TCP; without it every response waits ~40 ms (Nagle).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
        self.host = host
        self._app = app
        self.port: int = self._sock.getsockname()[1]
        # proxy_headers=False: X-Forwarded-For only rewrites the client address of the
        # access log, which is off; it cost ~4% of the HTTP thread's time per request.
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off",
                                proxy_headers=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # noqa: BLE001 - a dying server thread must leave a trace
            log.exception("HTTP server stopped with an error")

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.url} did not start")
            time.sleep(0.01)
        log.info("serving on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, finish those in flight, and join the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        pool = getattr(self._app.state, "predict_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        batcher = getattr(self._app.state, "batcher", None)
        if batcher is not None:
            batcher.stop(timeout=1.0)

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
