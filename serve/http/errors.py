"""One error type for the HTTP edge, rendered in the shape of the API the client called.

Engine and queue errors map to status codes here (400 bad value, 429 queue full, 503 not ready, draining or
the GPU failed, 504 deadline); anything unexpected is a 500 whose body says only that, with the traceback in the server log.
Messages name the bad value and the fix, but never a server path: the runtime's messages are written for the
CLI (a LoRA's file, the engine directory in a rebuild command), so :func:`render` replaces each absolute path
on this machine by its last part, and logs the message as it was.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdxl_trt.errors import InvalidRequestError, NonFiniteOutputError

from ..apis import a1111_api, openai_api
from ..core.errors import (
    DeadlineExceededError,
    DeviceFailedError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)

log = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def from_exception(exc: BaseException) -> ApiError:
    """Our exceptions -> ApiError (status, OpenAI-style type and code); anything else is a logged 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, OverloadedError):
        return ApiError(429, str(exc), code="queue_full", type="rate_limit_error",
                        headers={"Retry-After": str(int(exc.retry_after_s))})
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc), code="deadline_exceeded", type="timeout_error")
    if isinstance(exc, ShuttingDownError):
        return ApiError(503, str(exc), code="shutting_down", type="server_error", headers={"Retry-After": "5"})
    if isinstance(exc, DeviceFailedError):
        return ApiError(503, str(exc), code="device_failed", type="server_error")
    if isinstance(exc, NotReadyError):
        return ApiError(503, str(exc), code="not_ready", type="server_error", headers={"Retry-After": "5"})
    if isinstance(exc, NonFiniteOutputError):
        log.error("generation produced non-finite values: %s", exc)
        return ApiError(500, str(exc), code="non_finite_output", type="server_error")
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, "internal error while generating; see the server log", code="internal_error",
                    type="server_error")


def from_validation(exc: RequestValidationError) -> ApiError:
    """FastAPI's request validation -> a 400 naming the first bad field (never a 422 or a 500)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    if first.get("type") == "missing":
        return ApiError(400, f"{param or 'the request body'} is required", param=param, code="missing_field")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the request body must be a JSON object (send Content-Type: application/json)",
                        code="invalid_json")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def api_of(path: str) -> str:
    if path.startswith("/sdapi/"):
        return "a1111"
    if path.startswith("/v1/"):
        return "openai"
    return "plain"


_ABSOLUTE = re.compile(r"(?<![\w./:~-])/[^\s'\"`,;()<>\[\]{}|]+")


def _is_server_path(token: str) -> bool:
    """An absolute path that exists here, or whose folder does (an URL path like /sdapi/v1/loras does not)."""
    text = token.rstrip(".:")
    parent = os.path.dirname(text)
    return len(text) > 1 and (os.path.exists(text) or (parent not in ("", "/") and os.path.isdir(parent)))


def redact_paths(message: str) -> str:
    """``message`` with each absolute path of this machine replaced by its last part (a file's name)."""
    def shorten(match: re.Match[str]) -> str:
        token = match.group(0)
        if not _is_server_path(token):
            return token
        trailing = token[len(token.rstrip(".:")):]
        return (os.path.basename(token.rstrip(".:").rstrip("/")) or "<path>") + trailing

    return _ABSOLUTE.sub(shorten, message) if "/" in message else message


def render(path: str, err: ApiError) -> JSONResponse:
    """``err`` in the shape of the API ``path`` belongs to, with no server path in its message."""
    api = api_of(path)
    message = redact_paths(err.message)
    if message != err.message:
        log.info("answered %d on %s (server paths left out of the answer): %s", err.status, path, err.message)
    body: dict[str, object]
    if api == "openai":
        body = openai_api.ErrorResponse(error=openai_api.ErrorDetail(
            message=message, type=err.type, param=err.param, code=err.code)).model_dump()
    elif api == "a1111":
        body = a1111_api.ErrorResponse(error=_a1111_error_name(err), detail=message,
                                       errors=message).model_dump()
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


def _a1111_error_name(err: ApiError) -> str:
    return {400: "InvalidRequestError", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 408: "RequestTimeout", 413: "RequestTooLarge",
            431: "RequestHeaderFieldsTooLarge", 429: "Overloaded", 503: "ServiceUnavailable",
            504: "DeadlineExceeded"}.get(err.status, "InternalError")


class ErrorGuardMiddleware:
    """Outermost of our middleware: an exception from anywhere inside (a route, a middleware, a bug) becomes a
    JSON error in the called API's shape, and the connection stays usable.

    Starlette's own last-resort handler answers 500 and then re-raises, and uvicorn closes a connection whose
    app raised after answering, so a client's next pooled request would fail too. Only an exception after
    the answer has started (nothing sane can be sent) is re-raised, and uvicorn closes that connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                log.error("error after the answer to %s %s had started", scope["method"], scope["path"], exc_info=exc)
                raise
            await render(scope["path"], from_exception(exc))(scope, receive, send)
