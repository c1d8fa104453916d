"""sdxl-trt: a compiled, high-performance inference engine for Stable Diffusion XL.

Public API (imported lazily so ``import sdxl_trt`` stays cheap)::

    from sdxl_trt import Pipeline, GenerationRequest
    pipe = Pipeline.load("engines/tiny")
    result = pipe.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=0))
    result.images[0].save("out.png")

``AsyncPipeline`` is the asyncio front for services (batching queue, deadlines, backpressure).
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BackendUnavailableError,
    BuildError,
    ExportError,
    InvalidRequestError,
    ManifestError,
    ModelLoadError,
    NonFiniteOutputError,
    SdxlTrtError,
)
from .request import GenerationRequest, GenerationResult

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": ("sdxl_trt.runtime.pipeline", "Pipeline"),
    "AsyncPipeline": ("sdxl_trt.serve.core.async_pipeline", "AsyncPipeline"),
    "BuildOptions": ("sdxl_trt.engine.build", "BuildOptions"),
    "build_engines": ("sdxl_trt.engine.build", "build_engines"),
    "export_model": ("sdxl_trt.export.exporter", "export_model"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sdxl_trt' has no attribute {name!r}")


__all__ = [
    "AsyncPipeline", "BackendUnavailableError", "BuildError", "BuildOptions", "ExportError", "GenerationRequest",
    "GenerationResult", "InvalidRequestError", "ManifestError", "ModelLoadError", "NonFiniteOutputError", "Pipeline",
    "SdxlTrtError", "build_engines", "export_model", "__version__",
]
