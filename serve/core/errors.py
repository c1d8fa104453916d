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


class DeviceFailedError(ServeError):
    """The GPU hit an unrecoverable ("sticky") CUDA error: every later call in this process would fail, so the
    process stops serving and exits to be replaced (HTTP 503: retry, another replica will answer)."""


STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",  # cudaErrorIllegalAddress (700)
    "the launch timed out and was terminated",  # cudaErrorLaunchTimeout (702)
    "device-side assert triggered",  # cudaErrorAssert (710)
    "hardware stack error",  # cudaErrorHardwareStackError (714)
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction (715)
    "misaligned address",  # cudaErrorMisalignedAddress (716)
    "invalid address space",  # cudaErrorInvalidAddressSpace (717)
    "invalid program counter",  # cudaErrorInvalidPc (718)
    "unspecified launch failure",  # cudaErrorLaunchFailure (719)
    "uncorrectable ECC error encountered",  # cudaErrorECCUncorrectable (214)
    "cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorAssert", "cudaErrorMisalignedAddress",
    "cudaErrorIllegalInstruction", "cudaErrorECCUncorrectable", "cudaErrorLaunchTimeout",
)
"""CUDA's errors that corrupt the context for good (cudaGetErrorString's words, and the names TensorRT and ONNX
Runtime print): after one, every kernel launch and copy in the process fails until it exits."""


def sticky_device_error(exc: BaseException) -> str | None:
    """The line of ``exc``'s message (or of an exception that caused it) that names a sticky CUDA error
    (:data:`STICKY_CUDA_ERRORS`), else None. Read from messages: torch, TensorRT and ONNX Runtime raise
    different types for the same CUDA failure."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for line in str(e).splitlines():
            if any(words.lower() in line.lower() for words in STICKY_CUDA_ERRORS):
                return line.strip()
        e = e.__cause__ or e.__context__
    return None
