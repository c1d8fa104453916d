"""Open an engine directory: check its manifest against this machine, then load each component's engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ModelDims, component_specs
from sdxl_trt.engine_dir.layout import cache_artifacts_path
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.errors import ManifestError

from .engine import Engine

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}
"""Engine I/O dtype per precision (INT8 Q/DQ graphs keep float32 inputs and outputs)."""


def default_device(backend: str) -> torch.device:
    if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()):
        return torch.device("cuda")
    if backend == "onnxruntime" and torch.cuda.is_available():
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return torch.device("cuda")
    return torch.device("cpu")


def load_engines(directory: Path, manifest: Manifest, *, device: torch.device,
                 compile_torch: bool = False) -> dict[str, Engine]:
    specs = component_specs(ModelDims.from_json(manifest.model_dims))
    engines: dict[str, Engine] = {}
    shared_memory: Any = None
    for name, entry in manifest.components.items():
        path = directory / entry.file
        profiles = [Profile.from_json(p) for p in entry.profiles]
        log.info("loading %s (%s %s)", name, manifest.backend, entry.precision)
        if manifest.backend == "onnxruntime":
            from .onnxruntime_engine import OnnxRuntimeEngine

            engines[name] = OnnxRuntimeEngine(path, specs[name], profiles, device=device)
        elif manifest.backend == "torch":
            from .torch_engine import TorchEngine

            cache = cache_artifacts_path(path)  # Inductor artifacts compiled at build time, if any
            engines[name] = TorchEngine.load(path, specs[name], profiles, device=device, compile=compile_torch,
                                             cache_artifacts=cache if compile_torch and cache.exists() else None)
        elif manifest.backend == "tensorrt":
            from .tensorrt_engine import SharedDeviceMemory, TensorRTEngine

            if shared_memory is None:
                shared_memory = SharedDeviceMemory()
            engines[name] = TensorRTEngine.load(path, specs[name], profiles, device_memory=shared_memory,
                                                rebuild_hint=manifest.rebuild_hint(directory))
        else:
            raise ManifestError(f"{directory}: unknown backend {manifest.backend!r} in manifest.json")
    if shared_memory is not None:
        shared_memory.allocate()
    return engines

