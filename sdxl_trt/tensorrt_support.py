"""What the TensorRT build side (engine/) and run side (runtime/) share: whether TensorRT can be used
here, the install hint, and TensorRT's logger routed into ``logging``.

It lives in ``sdxl_trt/`` so mypy resolves it from both sides (the ``sdxl_trt.engine``/``.runtime`` names
are mapped by the editable install, which mypy does not follow). TensorRT is imported lazily.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = (
    "install it with `pip install 'sdxl-trt[tensorrt]'` on a machine with an NVIDIA GPU and driver, "
    "or use another backend (onnxruntime, torch)"
)


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT 10 can run here, and why (not) in words."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot load
        return False, f"the tensorrt package cannot be imported ({e})"
    version = getattr(trt, "__version__", None)
    if version is None or not hasattr(trt, "Builder"):
        # tensorrt-stubs installs a bare tensorrt/ folder, which imports as an empty namespace package.
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        return False, f"'tensorrt' ({where}) holds only type stubs (tensorrt-stubs), not the TensorRT library"
    if not str(version).startswith("10."):
        return False, f"TensorRT {version} is installed but this backend is written for TensorRT 10"
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {version} is installed but no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return True, f"TensorRT {version} on {torch.cuda.get_device_name()}"


def logger_bridge(log: logging.Logger) -> trt.ILogger:
    """A ``trt.ILogger`` that forwards TensorRT's messages to ``log`` (its INFO is a build transcript: DEBUG)."""
    import tensorrt as trt

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG - 5,
    }

    class _Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # TensorRT requires the explicit base-class call

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return _Bridge()
