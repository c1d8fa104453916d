"""The edge limits uvicorn lacks: a deadline for a request's headers, and a cap on their bytes.

uvicorn already closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 past
``limit_concurrency``, and the body is bounded by ``limits.BodyLimitMiddleware`` (size, deadline, per-chunk
timeout). But a connection that sends nothing, or half its headers, stays open forever and holds one of the
``limit_concurrency`` slots, and httptools (uvicorn's parser where installed) buffers a header of any size:
one connection streaming an ``X-Big:`` header grows the process by hundreds of MB. h11 has a limit
(``max_incomplete_event_size``), but answers it with a plain 400.

:func:`header_deadline_protocol` returns uvicorn's own HTTP protocol class (httptools or h11) with two checks
on the bytes of a request's headers (the request line included), from the connection's start and from the
first byte of each later request on it:

* time: they must be complete within the deadline, or the connection gets a 408 and is closed;
* size: they may take at most ``max_header_bytes``; one more byte and the connection gets a 431 (in the
  called API's error shape, from the request line's path) and is closed, before any of it reaches the app,
  so before authentication. The bytes are counted as they arrive (a read is at most 256 KiB), and what was
  over the cap is never handed to the parser.

Nothing else of uvicorn's protocol changes. TLS belongs to a reverse proxy in front.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 38\r\nconnection: close\r\n\r\nthe request headers arrived too slowly")
_HEAD_KEPT = 2048
"""Bytes of a request's start kept to find its path (for the 431's error shape)."""
LINGER_S = 2.0
LINGER_BYTES = 16 * 2**20
"""After a 431 the connection is half-closed and what the client still sends is read and dropped, for at most
this long and this much, before it is closed: closing with unread bytes would reset the connection, and the
client could lose the answer."""
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


def uvicorn_protocol(kind: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's protocol class for ``kind`` (``auto``: httptools where installed, else h11, as uvicorn picks)."""
    if kind in ("auto", "httptools"):
        try:
            import httptools  # noqa: F401
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if kind == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def too_large_response(head: bytes, max_header_bytes: int) -> bytes:
    """The raw 431 for a request that began with ``head``, its body in the API's shape (plain without a path)."""
    from .errors import ApiError, render

    parts = head.split(b"\r\n", 1)[0].split(b" ")
    path = parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) >= 2 else "/"
    err = ApiError(431, f"the request headers are over the {max_header_bytes // 1024} KiB limit; send smaller "
                   "headers (or start the server with a larger --max-header-kb)", code="headers_too_large")
    body = render(path, err).body
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + bytes(body))


def header_deadline_protocol(timeout_s: float, base: type[asyncio.Protocol] | None = None, *,
                             max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (or ``base``) that closes a connection whose headers take over ``timeout_s``
    (408) or over ``max_header_bytes`` (431)."""
    parent: Any = base or uvicorn_protocol()
    h11_based = hasattr(parent, "handle_events")  # uvicorn's H11Protocol; HttpToolsProtocol has parser callbacks
    if h11_based:
        import h11

        h11_send_body = h11.SEND_BODY

    class HeaderDeadlineProtocol(parent):
        """Arms a timer when a request may begin; a request whose headers completed is left alone."""

        _header_timer: asyncio.TimerHandle | None = None
        _armed_after: object = None  # the cycle that had finished when the timer was armed
        _header_bytes = 0  # bytes of the current request's headers so far
        _head = b""  # their first bytes (the request line), for the 431's error shape
        _tail = b""  # their last 3 bytes, to see a header end split across two reads
        _in_headers = True  # httptools: between a message's begin (or the previous one's end) and its headers' end
        _dropping: int | None = None  # after a 431: bytes read and dropped since

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._dropping is not None:
                self._dropping += len(data)
                if self._dropping > LINGER_BYTES:
                    self.transport.close()
                return
            if self._between_requests() and (self._header_timer is None or self._armed_after is not self.cycle):
                self._arm()  # the first bytes of a new request on a kept-alive connection
            cycle = self.cycle
            counting = self._receiving_headers()
            if counting:
                if len(self._head) < _HEAD_KEPT:
                    self._head += data[:_HEAD_KEPT - len(self._head)]
                if self._over_cap(data):
                    self._refuse_too_large()
                    return
                self._header_bytes += len(data)
                self._tail = (self._tail + data)[-3:]
            super().data_received(data)
            if self.cycle is not cycle or not self._receiving_headers():
                self._header_bytes, self._head, self._tail = 0, b"", b""  # a request's headers completed

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        if h11_based:
            def _receiving_headers(self) -> bool:
                """True while the bytes arriving belong to a request's headers (not to a body)."""
                return self.conn.their_state is not h11_send_body
        else:
            # httptools' callbacks (the parser calls the protocol's methods): where a message's headers start
            # and end
            def on_message_begin(self) -> None:
                self._in_headers = True
                super().on_message_begin()

            def on_headers_complete(self) -> None:
                self._in_headers = False
                super().on_headers_complete()

            def on_message_complete(self) -> None:
                super().on_message_complete()
                self._in_headers = True  # whatever comes next starts the next request

            def _receiving_headers(self) -> bool:
                """True while the bytes arriving belong to a request's headers (not to a body)."""
                return self._in_headers

        def _over_cap(self, data: bytes) -> bool:
            if self._header_bytes + len(data) <= max_header_bytes:
                return False
            end = (self._tail + data).find(b"\r\n\r\n")  # the headers may end inside this read
            return end < 0 or self._header_bytes - len(self._tail) + end + 4 > max_header_bytes

        def _refuse_too_large(self) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("closed the connection from %s: request headers over %d bytes", client, max_header_bytes)
            if not self._between_requests():  # an answer is being written on this connection: just close it
                self.transport.close()
                return
            self.transport.write(too_large_response(self._head, max_header_bytes))
            self._dropping = 0
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

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
