"""Request-body limits, as pure ASGI middleware: size (Content-Length first, then the streamed body), a deadline
for the whole body and a timeout per chunk.

A body over the limit gets a 413 in the called API's error shape. What the client already sent is read and
discarded (up to a bound) before answering, so it sees the 413 instead of a reset connection. A body that
arrives too slowly (the whole of it past ``body_timeout_s``, or nothing for ``chunk_timeout_s``) gets a 408
with ``Connection: close``: the connection is closed and what was buffered is dropped at once, so stalled
uploads cannot pile up in memory. :class:`BodyStats` counts the bytes held for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, render

log = logging.getLogger(__name__)


@dataclass
class BodyStats:
    """Bytes of request bodies being read right now, and bodies refused as too slow (for metrics and tests)."""

    buffered_bytes: int = 0
    timed_out: int = 0


class _TooSlow(Exception):
    pass


TRIM_BYTES = 2**20
"""A refused body at least this large hands the freed heap back to the OS (see :func:`release_memory`)."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def release_memory() -> None:
    """glibc keeps freed heap pages for reuse, so the RSS of a server that dropped 300 MB of stalled bodies
    would stay 300 MB higher; ``malloc_trim(0)`` returns them (a few ms; only after a large refused body)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


class BodyLimitMiddleware:
    """``max_bytes`` per body; ``text_max_bytes`` for ``text_paths`` (endpoints that take no images) while
    ``text_only()`` says so: engines with ControlNets take control images on those endpoints too."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, drain_bytes: int | None = None,
                 body_timeout_s: float | None = None, chunk_timeout_s: float | None = None,
                 stats: BodyStats | None = None, text_paths: Collection[str] = (),
                 text_max_bytes: int | None = None, text_only: Callable[[], bool] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.text_paths = frozenset(text_paths)
        self.text_max_bytes = text_max_bytes if text_max_bytes is not None else max_bytes
        self.text_only = text_only
        self.drain_bytes = drain_bytes if drain_bytes is not None else 4 * max_bytes + 2**20
        self.body_timeout_s = body_timeout_s
        self.chunk_timeout_s = chunk_timeout_s
        self.stats = stats or BodyStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        text = scope["path"] in self.text_paths and (self.text_only is None or self.text_only())
        limit = self.text_max_bytes if text else self.max_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await render(scope["path"], ApiError(400, "Content-Length is not a number"))(scope, receive, send)
                return
            if len(length) > 18 or int(length) > limit:
                await self._refuse(scope, receive, send, declared=int(length) if len(length) <= 18 else None,
                                   more=len(length) <= 18, limit=limit)
                return
        chunks: list[bytes] = []
        total = 0
        deadline = None if self.body_timeout_s is None else time.monotonic() + self.body_timeout_s
        refused = False
        try:
            while True:
                try:
                    message = await self._receive(receive, deadline)
                except _TooSlow as e:
                    refused = True
                    chunks.clear()
                    await self._too_slow(scope, receive, send, str(e), total)
                    return
                if message["type"] == "http.disconnect":
                    refused = True
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                self.stats.buffered_bytes += len(chunk)
                if total > limit:
                    refused = True
                    chunks.clear()
                    await self._refuse(scope, receive, send, declared=None, more=message.get("more_body", False),
                                       limit=limit)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        finally:
            self.stats.buffered_bytes -= total
            if refused and total >= TRIM_BYTES:
                chunks.clear()
                release_memory()
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, for handlers that watch for it

        await self.app(scope, replay, send)

    async def _receive(self, receive: Receive, deadline: float | None) -> Message:
        """The next message, or :class:`_TooSlow` past the per-chunk timeout or the body's deadline."""
        timeout, by_deadline = self.chunk_timeout_s, False
        if deadline is not None:
            left = deadline - time.monotonic()
            if timeout is None or left <= timeout:  # the body's deadline comes first (decided now: timers may
                timeout, by_deadline = left, True  # fire a little early, so not by the clock afterwards)
        if timeout is None:
            return await receive()
        try:
            return await asyncio.wait_for(receive(), max(0.0, timeout))
        except asyncio.TimeoutError:
            if by_deadline:
                raise _TooSlow(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
            raise _TooSlow(f"no part of the request body arrived for {self.chunk_timeout_s:g} s") from None

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send, why: str, received: int) -> None:
        self.stats.timed_out += 1
        log.info("refused %s %s after %d bytes: %s; closing the connection", scope["method"], scope["path"],
                 received, why)
        err = ApiError(408, f"{why}; send the whole body promptly", code="request_timeout",
                       headers={"Connection": "close"})
        await render(scope["path"], err)(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, declared: int | None,
                      more: bool = True, limit: int) -> None:
        limit_mb = limit / 2**20
        log.info("refused %s %s: body over %.1f MB", scope["method"], scope["path"], limit_mb)
        if (declared is None or declared <= self.drain_bytes) and more:
            drained = 0
            deadline = time.monotonic() + (self.body_timeout_s or 60.0)
            while drained <= self.drain_bytes:
                try:
                    message = await self._receive(receive, deadline)
                except _TooSlow:
                    break
                if message["type"] == "http.disconnect":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        why = f"the request body is over the {limit_mb:g} MB limit"
        if limit < self.max_bytes:
            why += " of an endpoint that takes only text (each text field at most --max-prompt-chars characters)"
        err = ApiError(413, why, code="request_too_large", headers={"Connection": "close"})
        await render(scope["path"], err)(scope, receive, send)
