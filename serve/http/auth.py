"""API-key check, as pure ASGI middleware so it runs before any body is read.

Clients send the key as ``Authorization: Bearer KEY`` (the ``openai`` client) or as the password of HTTP
Basic auth (A1111 clients with ``--api-auth``, the ``webuiapi`` package). Keys are compared in constant time,
as the UTF-8 bytes of the key against the bytes the client sent on either scheme (a header's bytes for Bearer,
the base64-decoded ones for Basic), so a non-ASCII key works the same on both; they are never logged.
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


def key_matches(authorization: bytes | str | None, key: str) -> bool:
    """True when the ``Authorization`` header (its raw bytes) carries ``key`` (Bearer, or Basic with ``key``
    as password)."""
    if not authorization:
        return False
    raw = authorization.encode("utf-8") if isinstance(authorization, str) else authorization
    scheme, _, value = raw.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"basic":
        try:
            value = base64.b64decode(value, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(value, key.encode("utf-8"))


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
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if key_matches(header, self.key):
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s: %s API key", scope["method"], scope["path"], "wrong" if header else "no")
        err = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' or HTTP Basic auth "
                       "with the key as password", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="sdxl-trt", Bearer'})
        await render(scope["path"], err)(scope, receive, send)
