"""What the TensorRT build side (engine/) and run side (runtime/) share: whether TensorRT can be used
here, which generation it is (10.x or 11.x), the install hint, and TensorRT's logger routed into ``logging``.

Both generations are supported through one code path, strongly typed only: TensorRT 11 removed weak typing
(``BuilderFlag.FP16``/``INT8``/..., calibrators, per-layer precision), and 10.x builds the same strongly typed
networks when ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is set (11 deprecates and ignores it).

It lives in ``sdxl_trt/`` so mypy resolves it from both sides (the ``sdxl_trt.engine``/``.runtime`` names
are mapped by the editable install, which mypy does not follow). TensorRT is imported lazily.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = (
    "install it with `pip install 'sdxl-trt[tensorrt]'` on a machine with an NVIDIA GPU and driver, "
    "or use another backend (onnxruntime, torch)"
)

SUPPORTED_MAJORS = (10, 11)
MIN_VERSION = (10, 8)
"""The lowest TensorRT supported (pyproject's ``tensorrt>=10.8,<12``). 10.8 is the first 10.x that supports
Blackwell GPUs, so one floor covers every GPU the FP8 recipe targets (Ada, Hopper, Blackwell); everything this
project calls (``USER_MANAGED`` context memory, the ``*_v2`` memory sizes, ``weight_streaming_budget_v2``,
strongly typed networks) exists from 10.1 on, and stays in 11."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)`` (non-numeric tails, e.g. ``"11.4.0.post1"``, end the tuple)."""
    out: list[int] = []
    for part in str(version).split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def tensorrt_major(module: object | None = None) -> int:
    """The imported TensorRT's major version (10 or 11 here), from ``trt.__version__``."""
    trt = module if module is not None else importlib.import_module("tensorrt")
    parts = version_tuple(str(getattr(trt, "__version__", "0")))
    return parts[0] if parts else 0


def needs_strongly_typed_flag(module: object | None = None) -> bool:
    """Whether networks must be created with ``STRONGLY_TYPED``: yes on 10.x (else it is weakly typed); no on
    11.x, where every network is strongly typed and the flag is deprecated and ignored (it may disappear, so
    it is not touched there). Decided by the version and by whether the member still exists."""
    trt = module if module is not None else importlib.import_module("tensorrt")
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return tensorrt_major(trt) < 11 and hasattr(flags, "STRONGLY_TYPED")


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT (10.8+ or 11.x) can run here, and why (not) in words."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot load
        return False, f"the tensorrt package cannot be imported ({e})"
    version = getattr(trt, "__version__", None)
    if version is None or not hasattr(trt, "Builder"):
        # tensorrt-stubs installs a bare tensorrt/ folder, which imports as an empty namespace package.
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        return False, f"'tensorrt' ({where}) holds only type stubs (tensorrt-stubs), not the TensorRT library"
    parts = version_tuple(str(version))
    if not parts or parts[0] not in SUPPORTED_MAJORS or parts[:2] < MIN_VERSION:
        return False, (f"TensorRT {version} is installed but this backend is written for TensorRT 10.8 and newer "
                       f"10.x, and 11.x; install a supported one with `pip install 'sdxl-trt[tensorrt]'`")
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
