"""Errors of the serving layer. Each HTTP API turns them into its own status code and error shape."""

from __future__ import annotations

from sdxl_trt.errors import SdxlTrtError


class ServeError(SdxlTrtError):
    """Base class: the request was not run, for a reason the client can act on (retry, wait, go elsewhere)."""


class OverloadedError(ServeError):
    """The queue is full; refused at once (HTTP 429) so a client can back off instead of piling up."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(ServeError):
    """The request waited in the queue past its deadline and was dropped unrun (HTTP 504)."""


class ShuttingDownError(ServeError):
    """The service is draining: no new work is accepted (HTTP 503)."""


class NotReadyError(ServeError):
    """Engines are still loading or warming up, or failed to load (HTTP 503)."""
