"""Request-body limit, as pure ASGI middleware: Content-Length is checked first, then the streamed body.

A body over the limit gets a 413 in the called API's error shape. What the client already sent is read and
discarded (up to a bound) before answering, so it sees the 413 instead of a reset connection.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import ApiError, render

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 4 * max_bytes + 2**20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await render(scope["path"], ApiError(400, "Content-Length is not a number"))(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await self._refuse(scope, receive, send, declared=int(length))
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send, declared=None, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, for handlers that watch for it

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, declared: int | None,
                      more: bool = True) -> None:
        limit_mb = self.max_bytes / 2**20
        log.info("refused %s %s: body over %.1f MB", scope["method"], scope["path"], limit_mb)
        if (declared is None or declared <= self.drain_bytes) and more:
            drained = 0
            while drained <= self.drain_bytes:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        err = ApiError(413, f"the request body is over the {limit_mb:g} MB limit", code="request_too_large",
                       headers={"Connection": "close"})
        await render(scope["path"], err)(scope, receive, send)
