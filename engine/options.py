"""What a build is asked for (:class:`BuildOptions`, ``sdxl-trt build``'s flags) and the two choices made
before anything is written: the backend and the model-wide precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sdxl_trt.engine_dir.layout import BACKENDS
from sdxl_trt.errors import BuildError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    model: str = "tiny"
    out: Path = Path("engines")
    refiner: str | None = None
    backend: str | None = None  # None: tensorrt if usable, else onnxruntime
    precision: str | None = None  # None: fp16 on a GPU, fp32 on the CPU
    buckets: str = "all"
    max_batch: int = 1
    profile_mode: str = "per-bucket"
    max_prompt_chunks: int = 3
    device: str = "cpu"  # where PyTorch runs for export
    model_config: str | None = None
    workspace_gib: float | None = None
    refittable: bool = False
    weight_streaming: bool = False
    compile_torch: bool = False
    calibration_prompts: int = 32  # INT8: prompts from engine/data/calibration_prompts.txt (2 UNet calls sampled each)
    calibration_steps: int = 20  # INT8: denoising steps per calibration prompt (the schedule samples are spread over)
    calibration_backend: str = "torch"  # INT8: "torch" (hooks, bounded memory) or "onnxruntime" (ORT calibrator)
    fp8_attention: bool = False  # FP8: Q/DQ on both inputs of the attention MatMuls too (Q.K^T, softmax.V)
    build_command: str = ""
    loras: tuple[str, ...] = ()  # --lora PATH[:SCALE]: fused into the base model before export and calibration
    controlnets: tuple[str, ...] = ()  # --controlnet PATH[:NAME] / PRESET[:NAME]: engines controlnet.NAME, and a
    # UNet that takes their residuals (costs one ControlNet call per step each, only when a request asks)
    deepcache: tuple[int, ...] = ()  # --deepcache K[,K...]: step-caching branches: engines unet_shallow.K, and a
    # UNet that also returns each branch's feature (a copy per full step; requests ask with cache_interval)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def bf16_device(device: str) -> bool:
    """Whether ``device`` is a CUDA GPU with bf16 kernels (where the torch backend builds the VAE in bf16)."""
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_backend(requested: str | None) -> str:
    """The backend to use; the default is stated in the log so a fallback is never silent."""
    if requested is not None:
        if requested not in BACKENDS:
            raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        if requested == "tensorrt":
            from .tensorrt_backend import require_tensorrt

            require_tensorrt()
        return requested
    from .tensorrt_backend import tensorrt_status

    ok, why = tensorrt_status()
    if ok:
        log.info("backend: tensorrt (importable, CUDA GPU present)")
        return "tensorrt"
    log.warning("backend: onnxruntime, because TensorRT is not usable here (%s); pass --backend to choose", why)
    return "onnxruntime"


def resolve_precision(backend: str, requested: str | None, *, fp8_attention: bool = False) -> str:
    """The model-wide precision (each component's then follows ``contracts.component_precision``);
    ``fp8_attention`` is refused here, before anything is written, unless the precision is fp8."""
    gpu = cuda_available()
    precision = requested or ("fp16" if gpu else "fp32")
    if backend == "torch" and precision == "int8":
        raise BuildError("--precision int8 is for tensorrt and onnxruntime engines (explicit Q/DQ); "
                         "use fp16 or fp32 with --backend torch")
    if precision != "fp8" and fp8_attention:
        raise BuildError(f"--fp8-attention quantizes the attention MatMuls in FP8, so it needs --precision fp8, not "
                         f"{precision!r}; drop --fp8-attention or build with --precision fp8")
    if precision == "fp8":
        if backend != "tensorrt":
            why = ("ONNX Runtime's CPU and CUDA providers run FP8 Q/DQ by dequantizing to float, so it would be "
                   "slower than fp16, not faster" if backend == "onnxruntime" else
                   "PyTorch has no FP8 convolutions, so the torch backend cannot run the FP8 recipe")
            raise BuildError(f"--precision fp8 is for --backend tensorrt on compute capability 8.9+ GPUs: {why}; "
                             "use --precision int8 or fp16 here (`sdxl-trt export --precision fp8` still writes "
                             "and verifies the FP8 Q/DQ files for a TensorRT machine)")
        from .tensorrt_backend import require_fp8_gpu

        require_fp8_gpu()
    if backend in ("onnxruntime", "torch") and precision == "fp16" and not gpu:
        raise BuildError(f"--precision fp16 with --backend {backend} needs a CUDA GPU (CPU kernels for fp16 are "
                         "missing or slow); use --precision fp32 on this machine")
    return precision
