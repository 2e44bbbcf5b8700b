"""HTTP serving: predictions from the served model, model metadata, health and metrics.

Endpoints (see :func:`create_app`)::

    POST /v1/predict  {"instances": [[...], ...]} -> predictions, probabilities, model_version
    GET  /v1/model    served version, accuracy, parameters, compression, cost, update history
    GET  /healthz     200 while the process is alive
    GET  /readyz      200 once a model is served, else 503
    GET  /metrics     Prometheus text format

With ``GNPD_SERVE__API_TOKEN`` set, ``/v1/*`` need ``Authorization: Bearer <token>``
(:mod:`daemon.auth`); the probes and ``/metrics`` stay open, and the generated API
docs (``/docs``, ``/openapi.json``) are switched off.

Load cannot take the process down or starve the probes: a predict body over
``max_body_bytes`` is refused (413) from its Content-Length or while it streams in,
never read whole; JSON nesting is bounded (400); parsing and inference run on a
small executor of ``predict_workers`` threads, with at most twice that many bodies
in memory, while ``/healthz``, ``/readyz`` and ``/metrics`` answer on the event loop.

:class:`HttpServer` runs uvicorn in a background thread on a socket it binds itself, so
the bound port is known (port 0 picks a free one) and bind errors surface at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from daemon.auth import Dependency, require_token
from daemon.messages import (load_json, matches_input_shape, may_hold_bools, numeric_array,
                             shape_rule)
from daemon.metrics import Metrics
from daemon.registry import ModelVersion, NoModelError, ServedModel
from daemon.settings import ServeSettings

__all__ = ["MAX_INSTANCES", "HttpServer", "PredictRequest", "create_app"]

log = logging.getLogger(__name__)

MAX_INSTANCES = 1024


class PredictRequest(BaseModel):
    """Body of ``POST /v1/predict``."""

    instances: list[Any] = Field(
        description="Instances to classify; each is a flat list of numbers or a nested list "
                    "of the model's input shape, size-1 dimensions optional (a 28x28 list "
                    "for [1, 28, 28]); pixels scaled to 0..1.")


_PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()}}}}


class _BadRequest(ValueError):
    """A predict request that cannot be answered as sent (HTTP 400)."""


class _TooLarge(ValueError):
    """A predict body over the limit (HTTP 413)."""


async def _read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused (_TooLarge) as soon as it is known to exceed ``limit``.

    A Content-Length over the limit is refused before reading anything; a chunked body
    is refused once the bytes read so far pass the limit, so at most ``limit`` bytes
    (plus one network chunk) are ever held.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} "
                        f"bytes (GNPD_SERVE__MAX_BODY_BYTES): send fewer instances")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"request body is over the limit of {limit} bytes "
                            f"(GNPD_SERVE__MAX_BODY_BYTES): send fewer instances")
    return body


def _parse(body: bytes | bytearray, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """The body's instances as float32 (N, *input_shape); raises _BadRequest naming the problem."""
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
    app = FastAPI(title="gnpd", summary="Continual-learning model server (grow and prune)",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if closed else {}))
    app.state.require_token = auth = require_token(serve.api_token)
    _add_predict(app, served, metrics, max_instances, serve, auth)
    _add_status(app, served, metrics, history, auth, model_status)
    for router in routers:
        app.include_router(router)
    return app


def _answer(served: ServedModel, body: bytes | bytearray,
            limit: int) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON payload of one predict request."""
    try:
        x = _parse(body, served.input_shape, limit)
        labels, probs, version = served.predict(x)
    except _BadRequest as e:
        return 400, {"detail": str(e)}
    except NoModelError as e:
        return 503, {"detail": f"{e}: the first update has not finished"}
    return 200, {"predictions": labels.tolist(), "probabilities": probs.tolist(),
                 "model_version": version}


def _add_predict(app: FastAPI, served: ServedModel, metrics: Metrics, limit: int,
                 serve: ServeSettings, auth: Dependency) -> None:
    # Its own bounded executor: predict load cannot take the threads other endpoints use.
    pool = ThreadPoolExecutor(serve.predict_workers, thread_name_prefix="gnpd-predict")
    slots = asyncio.Semaphore(2 * serve.predict_workers)  # bodies held in memory at once
    app.state.predict_pool = pool

    @app.post("/v1/predict", openapi_extra=_PREDICT_OPENAPI, dependencies=[Depends(auth)])
    async def predict(request: Request) -> JSONResponse:
        """Classify instances; every answer comes from the one model version it names."""
        start = time.perf_counter()
        code, payload = 500, {"detail": "internal error"}
        try:
            async with slots:
                body = await _read_body(request, serve.max_body_bytes)
                code, payload = await asyncio.get_running_loop().run_in_executor(
                    pool, _answer, served, body, limit)
        except _TooLarge as e:
            code, payload = 413, {"detail": str(e)}
        except ClientDisconnect:
            code, payload = 400, {"detail": "the client went away before sending the body"}
        finally:
            metrics.predict_requests.labels(status="ok" if code == 200 else "error").inc()
            metrics.predict_duration.observe(time.perf_counter() - start)
        return JSONResponse(payload, status_code=code)


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
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off")
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

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
