"""The files of an engine directory and each backend's per-directory facts.

Layout::

    DIR/manifest.json                  what was built, from what, for which machine (manifest.py)
    DIR/<component>.<ext>              .plan (tensorrt), .onnx (onnxruntime; int8: unet.int8.onnx), .pt2 (torch)
    DIR/<component>.inductor-cache.bin   torch: Inductor artifacts compiled at build time (optional)
    DIR/timing.cache                   tensorrt: the builder's timing cache, reused by the next build
    DIR/weight_map.json                each LoRA-able PyTorch weight's name in every engine (sdxl_trt.lora.weight_map)
    DIR/tokenizer/ tokenizer_2/ scheduler/ refiner_scheduler/   what the runtime needs besides engines
    DIR/onnx/                          the verified ONNX export (<component>.onnx, int8: unet.int8.onnx) and its
                                       own manifest.json

engine/ writes these names and runtime/ reads them; both take them from here (the manifest records each
engine's file too, so a reader goes by the manifest and this module names what a build writes).
"""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("tensorrt", "onnxruntime", "torch")
EXTENSIONS = {"tensorrt": ".plan", "onnxruntime": ".onnx", "torch": ".pt2"}
RUNTIME_ASSETS = ("tokenizer", "tokenizer_2", "scheduler", "refiner_scheduler")
REQUIRED_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
TIMING_CACHE_NAME = "timing.cache"
WEIGHT_MAP_NAME = "weight_map.json"

ONNXRUNTIME_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
"""ONNX Runtime engines use the first installed of these (only CPU when the pipeline runs on the CPU)."""


ONNX_DIR_NAME = "onnx"


def onnx_file_name(component: str, precision: str = "fp32") -> str:
    """An exported component's ONNX file; the INT8 / FP8 (Q/DQ) UNet written from it is ``unet.int8.onnx`` /
    ``unet.fp8.onnx``."""
    return f"{component}.{precision}.onnx" if precision in ("int8", "fp8") else f"{component}.onnx"


def engine_file_name(component: str, backend: str, precision: str = "fp32") -> str:
    """The file a component's engine is written to. An ONNX Runtime engine keeps its ONNX's name (so an INT8
    UNet is ``unet.int8.onnx``): its external data file is named after it."""
    if backend not in EXTENSIONS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "onnxruntime":
        return onnx_file_name(component, precision)
    return f"{component}{EXTENSIONS[backend]}"


def export_onnx_path(directory: Path, component: str) -> Path:
    """The verified ONNX export of ``component`` kept inside engine directory ``directory``."""
    return Path(directory) / ONNX_DIR_NAME / onnx_file_name(component)


def cache_artifacts_path(engine_path: Path) -> Path:
    """Where a torch engine's Inductor cache artifacts live: ``unet.pt2`` -> ``unet.inductor-cache.bin``."""
    return engine_path.with_name(engine_path.name.removesuffix(EXTENSIONS["torch"]) + ".inductor-cache.bin")


def preferred_providers(device_type: str = "cpu") -> list[str]:
    """Installed ONNX Runtime providers in preference order; only CPU when the pipeline runs on the CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = ONNXRUNTIME_PROVIDER_ORDER if device_type == "cuda" else ("CPUExecutionProvider",)
    return [p for p in wanted if p in available]
