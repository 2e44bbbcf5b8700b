"""Admin HTTP routes: roll back and pin the served model (see :mod:`daemon.control`).

    POST   /v1/model/rollback   {} or {"version": N}  serve a copy of N (default: the
                                                      served version's parent)
    POST   /v1/model/pin        {"version": N}        serve N until unpinned (persisted)
    DELETE /v1/model/pin                              serve the newest version again

Each answers ``{"served_version", "pinned", "head_version", "restored_from"}``; 404 for
an unknown or unloadable version, 409 when the change does not apply (pinned, nothing to
roll back to, another store's version). Build with :func:`admin_router` and include it
in the app (``serving.create_app(..., routers=[...])``); ``auth`` is a FastAPI
dependency (e.g. the bearer-token check) applied to every route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from daemon.control import ControlError, ModelControl
from daemon.metrics import Metrics
from daemon.registry import ModelRegistry, ServedModel

__all__ = ["PinRequest", "RollbackRequest", "admin_router"]


class RollbackRequest(BaseModel):
    """Body of ``POST /v1/model/rollback`` (optional)."""

    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, description="version to serve again; default: "
                                                        "the served version's parent")


class PinRequest(BaseModel):
    """Body of ``POST /v1/model/pin``."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, description="version to serve until DELETE /v1/model/pin")


def admin_router(served: ServedModel, registry: ModelRegistry, metrics: Metrics, *,
                 control: ModelControl | None = None,
                 auth: Callable[..., Any] | None = None) -> APIRouter:
    """The rollback and pin routes.

    Args:
        served, registry, metrics: the daemon's.
        control: the pin/head state shared with the update worker (the daemon passes
            ``updater.control``); default: a new one over ``served``/``registry``.
        auth: a FastAPI dependency every route requires (None: open).
    """
    ctl = control or ModelControl(served, registry, metrics)
    router = APIRouter(prefix="/v1/model", tags=["admin"],
                       dependencies=[Depends(auth)] if auth is not None else [])

    async def answer(change: Callable[[], Any]) -> JSONResponse:
        try:
            await run_in_threadpool(change)  # loads and saves checkpoints: off the loop
        except ControlError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        version = served.version
        return JSONResponse({"served_version": getattr(version, "version", None),
                             **ctl.status()})

    @router.post("/rollback")
    async def rollback(body: RollbackRequest | None = Body(None)) -> JSONResponse:
        """Serve the previous version again (or the one named); learning continues from it."""
        return await answer(lambda: ctl.rollback(body.version if body else None))

    @router.post("/pin")
    async def pin(body: PinRequest) -> JSONResponse:
        """Serve this version until unpinned; updates are still trained and saved."""
        return await answer(lambda: ctl.pin(body.version))

    @router.delete("/pin")
    async def unpin() -> JSONResponse:
        """Serve the newest version again."""
        return await answer(ctl.unpin)

    return router
