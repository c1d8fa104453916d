"""The one edge limit uvicorn lacks: a deadline for a request's headers.

uvicorn already closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 past
``limit_concurrency``, and the body is bounded by ``limits.BodyLimitMiddleware`` (size, deadline, per-chunk
timeout). But a connection that sends nothing, or half its headers, stays open forever and holds one of the
``limit_concurrency`` slots. :func:`header_deadline_protocol` returns uvicorn's own HTTP protocol class
(httptools where installed, else h11) with one timer: from the connection's start, and from the first byte
of each later request on it, the headers must be complete within the deadline, or the connection gets a
408 and is closed. Nothing else of uvicorn's protocol changes. TLS and header-size limits belong to a
reverse proxy in front.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 38\r\nconnection: close\r\n\r\nthe request headers arrived too slowly")


def _uvicorn_protocol() -> type[asyncio.Protocol]:
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def header_deadline_protocol(timeout_s: float, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (or ``base``) that closes a connection whose headers take over ``timeout_s``."""
    parent: Any = base or _uvicorn_protocol()

    class HeaderDeadlineProtocol(parent):
        """Arms a timer when a request may begin; a request whose headers completed is left alone."""

        _header_timer: asyncio.TimerHandle | None = None
        _armed_after: object = None  # the cycle that had finished when the timer was armed

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests() and (self._header_timer is None or self._armed_after is not self.cycle):
                self._arm()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._armed_after = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self._between_requests() or self._armed_after is not self.cycle:
                return  # the headers arrived; a request is running or done
            if self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("closed the connection from %s: no complete request headers within %g s", client, timeout_s)
            self.transport.write(_TIMEOUT_408)
            self.transport.close()

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{parent.__name__}"
    return HeaderDeadlineProtocol
