"""Open an engine directory: check its manifest against this machine, then load each component's engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ModelDims, component_specs, controlnet_names, io_dtype
from sdxl_trt.engine_dir.layout import cache_artifacts_path
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.errors import ManifestError

from .engine import Engine

log = logging.getLogger(__name__)


def default_device(backend: str) -> torch.device:
    """The current CUDA device where the backend can use it, else the CPU."""
    if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "onnxruntime" and torch.cuda.is_available():
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, backend: str) -> torch.device:
    """``device`` with its CUDA index made explicit (``cuda`` means the current device, ``cuda:1`` is kept),
    so every tensor, stream and graph of a pipeline lands on one GPU."""
    if device is None:
        return default_device(backend)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ManifestError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use "
                                "device='cpu' with onnxruntime or torch engines")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ManifestError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                                "CUDA device(s)")
    return dev


def load_engines(directory: Path, manifest: Manifest, *, device: torch.device,
                 compile_torch: bool = False) -> dict[str, Engine]:
    specs = component_specs(ModelDims.from_json(manifest.model_dims), controlnet_names(manifest.components))
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
            float_dtype = io_dtype(entry.precision, manifest.backend)  # what the arena gives this engine
            engines[name] = TensorRTEngine.load(path, specs[name], profiles, device_memory=shared_memory,
                                                rebuild_hint=manifest.rebuild_hint(directory),
                                                expected_dtypes={t.name: t.torch_dtype(float_dtype)
                                                                 for t in specs[name].tensors})
        else:
            raise ManifestError(f"{directory}: unknown backend {manifest.backend!r} in manifest.json")
    if shared_memory is not None:
        shared_memory.allocate()
    return engines

