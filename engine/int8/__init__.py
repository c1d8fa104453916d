"""INT8 explicit quantization (Q/DQ ONNX) of the SDXL UNet, calibrated on the UNet's real inputs.

TensorRT builds INT8 engines from ONNX files that carry QuantizeLinear/DequantizeLinear pairs ("explicit
quantization"): the Q/DQ nodes say exactly which tensors are INT8, and TensorRT fuses each DQ -> Conv/MatMul
into an INT8 kernel. :func:`build_int8_unet` is the one call the build makes; the work is in these modules:

* :mod:`.calibration`: diffusers' pipeline denoising real prompts, the UNet calls picked as samples (and
  their inputs recorded, for held-out errors and the ONNX Runtime path), progress with an ETA;
* :mod:`.qdq`: which layers are quantized and which stay high precision, and TensorRT's placement checks;
* :mod:`.ranges` + :mod:`.writer` (default): ranges measured by PyTorch forward hooks during the
  denoising, then the Q/DQ file written weight by weight; memory does not grow with samples or activations;
* :mod:`.ort` (``backend="onnxruntime"``): calibration and Q/DQ insertion with ONNX Runtime's
  ``quantize_static`` on recorded inputs, kept for comparison and for the percentile/entropy methods;
* :mod:`.report`: the report stored in the manifest and the error against FP32 on held-out inputs.

The names below are re-exported so ``from sdxl_trt.engine import int8`` reaches the whole API.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from sdxl_trt.errors import BuildError

from .calibration import (
    DEFAULT_PROMPTS_FILE,
    UNET_INPUT_NAMES,
    collect_calibration_inputs,
    encode_prompts,
    read_prompts,
)
from .ort import EXTERNAL_DATA_BYTES, CalibrateMethod, quantize_unet
from .qdq import (
    EXCLUDED_NAME_PATTERNS,
    QUANTIZED_OP_TYPES,
    check_tensorrt_qdq,
    plan_exclusions,
    quantized_node_names,
    weighted_nodes,
)
from .ranges import collect_activation_ranges
from .report import QuantizationReport, measure_error
from .writer import quantize_unet_from_ranges

if TYPE_CHECKING:
    from sdxl_trt.export.loading import LoadedModel

CalibrationBackend = Literal["torch", "onnxruntime"]
CALIBRATION_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
"""Where INT8 ranges are measured: PyTorch forward hooks (default, bounded memory) or ONNX Runtime's calibrator."""

__all__ = [
    "DEFAULT_PROMPTS_FILE", "EXCLUDED_NAME_PATTERNS", "EXTERNAL_DATA_BYTES", "QUANTIZED_OP_TYPES", "UNET_INPUT_NAMES",
    "CALIBRATION_BACKENDS", "CalibrateMethod", "CalibrationBackend", "QuantizationReport", "build_int8_unet", "check_tensorrt_qdq", "collect_calibration_inputs",
    "measure_error", "plan_exclusions", "quantize_unet", "quantized_node_names", "read_prompts",
]


def build_int8_unet(
    model: LoadedModel | Callable[[], LoadedModel],
    fp32_unet_onnx: Path,
    out_onnx: Path,
    *,
    prompts_file: Path | str | None = None,
    num_prompts: int,
    steps: int,
    width: int,
    height: int,
    num_eval_prompts: int = 2,
    max_samples: int | None = None,
    guidance_scale: float = 5.0,
    seed: int = 0,
    backend: CalibrationBackend = "torch",
    calibrate_method: CalibrateMethod = "minmax",
    quant_level: float = 3.0,
    providers: Sequence[str] | None = None,
    fmt: Literal["int8", "fp8"] = "int8",
    typed: tuple[Path, Path] | None = None,
    attention: bool = False,
) -> QuantizationReport:
    """Calibrate on ``num_prompts`` prompts, quantize, and measure the error on ``num_eval_prompts`` other prompts.

    The prompts are the file's first ``num_prompts`` lines; the held-out ones are the next ``num_eval_prompts``, run
    with another seed, so the error is measured on inputs the ranges were not fitted to. ``max_samples`` caps the
    UNet calls calibration looks at (default: 2 per prompt, spread over the schedule across prompts).

    ``backend``: ``"torch"`` (default) measures the ranges with forward hooks in PyTorch, on the model's device,
    while the prompts are denoised (memory: the model plus one step's activations, whatever the sample count), then
    writes the Q/DQ file one weight at a time (:mod:`.ranges`, :mod:`.writer`); ``"onnxruntime"`` records
    the UNet's inputs and calibrates the FP32 ONNX file with ONNX Runtime (:mod:`.ort`; every calibration
    method, but host memory grows with a forward pass's activations: 14.8 GB for tiny at 1024x1024). Both quantize
    the same nodes. ``model`` may be a loader: it is then called once and the model dropped before the Q/DQ file is
    written, so the two peaks do not add up.

    ``fmt="fp8"``: FP8 E4M3 Q/DQ (scales amax / 448, weights per tensor) from the same ranges; torch ranges only.
    ``typed``: (fp16 UNet ONNX, out): the same Q/DQ also written into the fp16 UNet, the file strongly typed
    TensorRT builds (the unquantized remainder fp16); ``out_onnx`` is then the fp32 twin the error is measured on.
    ``attention`` (fp8 only): the attention's Q.K^T and softmax.V MatMuls get FP8 Q/DQ on both inputs too, their
    ranges measured in the same calibration run (:mod:`.ranges`)."""
    if fmt not in ("int8", "fp8"):
        raise BuildError(f"Q/DQ format must be int8 or fp8, got {fmt!r}")
    if attention and fmt != "fp8":
        raise BuildError(f"quantizing the attention MatMuls is an FP8 option (--fp8-attention); got format {fmt!r}: "
                         "use --precision fp8 or drop --fp8-attention")
    if backend != "torch" and (fmt != "int8" or typed is not None):
        raise BuildError("FP8 and fp16-typed Q/DQ files are written from PyTorch-measured ranges; use calibration "
                         "backend 'torch'")
    if backend not in CALIBRATION_BACKENDS:
        raise BuildError(f"calibration backend must be one of {list(CALIBRATION_BACKENDS)}, got {backend!r}")
    if backend == "torch" and calibrate_method != "minmax":
        raise BuildError(f"calibrate_method {calibrate_method!r} needs histograms, which only the ONNX Runtime "
                         "calibrator keeps; use calibrate_method 'minmax' or backend 'onnxruntime'")
    prompts = read_prompts(prompts_file)
    if num_prompts < 1:
        raise BuildError(f"num_prompts must be at least 1, got {num_prompts}")
    if num_eval_prompts < 0:
        raise BuildError(f"num_eval_prompts must be 0 or more, got {num_eval_prompts}")
    need = num_prompts + num_eval_prompts
    if len(prompts) < need:
        raise BuildError(
            f"{prompts_file or DEFAULT_PROMPTS_FILE} has {len(prompts)} prompts; {num_prompts} calibration + "
            f"{num_eval_prompts} held-out need {need}: lower num_prompts or add prompts"
        )
    cap = max_samples if max_samples is not None else 2 * num_prompts
    fp32_unet_onnx, out_onnx = Path(fp32_unet_onnx), Path(out_onnx)
    if not fp32_unet_onnx.is_file():
        raise BuildError(f"FP32 UNet ONNX {fp32_unet_onnx} does not exist; export the UNet in fp32 first")
    sampling: dict[str, Any] = {"steps": steps, "width": width, "height": height, "guidance_scale": guidance_scale}
    t0 = time.perf_counter()
    loaded = model() if callable(model) else model
    # Every prompt is encoded first; a model loaded here then lets its text encoders go (3.5 GB at full size)
    # before the UNet runs. The UNet inputs are the same as with the prompts.
    embeds = encode_prompts(loaded, prompts[:need], guidance_scale=guidance_scale)
    if callable(model):
        loaded = dataclasses.replace(loaded, text_encoder=None, text_encoder_2=None)
        gc.collect()
    sampling["embeddings"] = embeds[:num_prompts]
    if backend == "torch":
        graph = onnx.load(str(fp32_unet_onnx), load_external_data=False)
        excluded = plan_exclusions(graph, quant_level=quant_level)
        quantize = {n.name for n in weighted_nodes(graph)} - set(excluded)
        if not quantize:
            raise BuildError(f"{fp32_unet_onnx} has no Conv/MatMul/Gemm with constant weights left to quantize; is it the UNet?")
        ranges, samples = collect_activation_ranges(loaded, graph, quantize, prompts[:num_prompts], seed=seed,
                                                    max_samples=cap, attention=attention, **sampling)
        del graph
    else:
        calib = collect_calibration_inputs(loaded, prompts[:num_prompts], seed=seed, max_samples=cap, **sampling)
    held_out: list[dict[str, np.ndarray]] = []
    if num_eval_prompts:
        sampling["embeddings"] = embeds[num_prompts:need]
        held_out = collect_calibration_inputs(
            loaded, prompts[num_prompts:need], seed=seed + 10_000,
            max_samples=max(1, math.ceil(steps / 4)) * num_eval_prompts, what="held-out inputs", **sampling,
        )
    del embeds, sampling
    collected = time.perf_counter() - t0
    del loaded
    if callable(model):
        gc.collect()  # the model's weights go back before the Q/DQ file is written
    if backend == "torch":
        report = quantize_unet_from_ranges(
            fp32_unet_onnx, out_onnx, ranges=ranges, samples=samples, excluded=excluded, quantize=quantize,
            quant_level=quant_level, exclude_patterns=EXCLUDED_NAME_PATTERNS, eval_inputs=held_out or None,
            providers=providers, fmt=fmt, typed=typed, attention=attention,
        )
    else:
        report = quantize_unet(
            fp32_unet_onnx, out_onnx, calibration=calib, calibrate_method=calibrate_method,
            quant_level=quant_level, eval_inputs=held_out or None, providers=providers,
        )
    report.collection_seconds = round(collected, 3)
    return report
