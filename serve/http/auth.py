"""API-key check, as pure ASGI middleware so it runs before any body is read.

Clients send the key as ``Authorization: Bearer KEY`` (the ``openai`` client) or as the password of HTTP
Basic auth (A1111 clients with ``--api-auth``, the ``webuiapi`` package). Keys are compared in constant time
and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, render

log = logging.getLogger(__name__)


def key_matches(authorization: str | None, key: str) -> bool:
    """True when the ``Authorization`` header carries ``key`` (Bearer, or Basic with ``key`` as password)."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        value = decoded.partition(":")[2]
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


class ApiKeyMiddleware:
    """Refuses requests without the key (401, in the called API's error shape), except ``open_paths``."""

    def __init__(self, app: ASGIApp, *, key: str | None, open_paths: Collection[str]) -> None:
        self.app = app
        self.key = key
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if key_matches(header, self.key):
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s: %s API key", scope["method"], scope["path"], "wrong" if header else "no")
        err = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' or HTTP Basic auth "
                       "with the key as password", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="sdxl-trt", Bearer'})
        await render(scope["path"], err)(scope, receive, send)
