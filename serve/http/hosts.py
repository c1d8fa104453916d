"""Which names the server answers to (``--allowed-hosts``), as pure ASGI middleware before the API key.

Without it, a keyless server on loopback can be reached by any web page its user visits: DNS rebinding makes
the page's own name resolve to 127.0.0.1, and the browser then sends the page's requests, and reads the
answers, as same-origin. Checking ``Host`` stops that, with the rules of Starlette's ``TrustedHostMiddleware``
(exact names or ``*.domain`` for its subdomains, ``*`` for any, the port ignored; a 400 otherwise), but not
Starlette's class: its 400 is plain text, not the called API's error shape, and it has no ``Origin`` check. A
browser request from a page elsewhere that names an allowed host (a form posted cross-site to 127.0.0.1: a
multipart edit needs no preflight) carries that page's ``Origin``; an ``Origin`` whose host is not allowed (or
``null``) is a 403. Clients other than browsers send no ``Origin``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, render

log = logging.getLogger(__name__)


def host_name(value: str) -> str:
    """A ``Host`` value without its port, lower-case; IPv6 literals lose their brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def host_allowed(name: str, patterns: Collection[str]) -> bool:
    """``name`` (no port) matches one of ``patterns``: exact, ``*.domain`` (subdomains), or ``*``."""
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern == "*" or name == pattern.strip("[]"):
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class AllowedHostsMiddleware:
    """Refuses a ``Host`` outside ``allowed`` (400) and an ``Origin`` outside it (403); ``*`` allows any."""

    def __init__(self, app: ASGIApp, *, allowed: Collection[str]) -> None:
        self.app = app
        self.allowed = tuple(allowed)
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if not host_allowed(host, self.allowed):
            log.info("refused %s %s: Host %r is not in --allowed-hosts", scope["method"], scope["path"], host[:100])
            err = ApiError(400, "Invalid host header: this server answers only to the names in its --allowed-hosts",
                           code="invalid_host")
            await render(scope["path"], err)(scope, receive, send)
            return
        origin = headers.get(b"origin")
        if origin is not None:  # "null" (a sandboxed frame, a file) is refused too: any page can send it
            origin_host = urlsplit(origin.decode("latin-1")).hostname or ""
            if not host_allowed(origin_host, self.allowed):
                log.info("refused %s %s: a request from the page at %r (not in --allowed-hosts)", scope["method"],
                         scope["path"], origin[:100])
                err = ApiError(403, "cross-site request refused: pages served from other hosts may not call this "
                               "server (add their host to --allowed-hosts to allow them)", code="cross_site")
                await render(scope["path"], err)(scope, receive, send)
                return
        await self.app(scope, receive, send)
