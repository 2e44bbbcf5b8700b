"""Optional bearer-token authentication of the HTTP API, as a FastAPI dependency.

With ``GNPD_SERVE__API_TOKEN`` set, every endpoint that declares the dependency answers
401 unless the request carries ``Authorization: Bearer <token>``::

    auth = require_token(settings.serve.api_token)
    @app.post("/v1/model/rollback", dependencies=[Depends(auth)])
    async def rollback(): ...

``/healthz``, ``/readyz`` and ``/metrics`` stay open (:data:`OPEN_PATHS`): probes and
Prometheus must work without the secret, and they expose no samples or weights. The
comparison takes the same time whatever the token sent (both sides are hashed first,
then compared with :func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request, status
from pydantic import SecretStr

__all__ = ["OPEN_PATHS", "UNAUTHORIZED_DETAIL", "bearer_check", "require_token"]

OPEN_PATHS = ("/healthz", "/readyz", "/metrics")

Dependency = Callable[[Request], Awaitable[None]]


UNAUTHORIZED_DETAIL = ("missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                       "with the value of GNPD_SERVE__API_TOKEN")


def bearer_check(token: SecretStr | str | None) -> Callable[[str], bool] | None:
    """``authorization header value -> allowed``, or None when the API is open.

    For code that reads headers itself (the predict fast path of daemon.serving); the
    routes use :func:`require_token`, which applies the same check.
    """
    if token is None:
        return None
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not secret:
        raise ValueError("the API token is empty: pass None for an open API")
    expected = _digest(secret)

    def allowed(authorization: str) -> bool:
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(given.strip()),
                                                                  expected)

    return allowed


def require_token(token: SecretStr | str | None) -> Dependency:
    """A dependency that refuses (401) requests without ``Authorization: Bearer <token>``.

    Args:
        token: the expected token; None lets every request through (the API is open).
    """
    allowed = bearer_check(token)
    if allowed is None:
        async def open_api(request: Request) -> None:
            return None

        return open_api

    async def check_token(request: Request) -> None:
        if not allowed(request.headers.get("authorization", "")):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=UNAUTHORIZED_DETAIL,
                                headers={"WWW-Authenticate": "Bearer"})

    return check_token


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
