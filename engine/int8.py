"""INT8 explicit quantization (Q/DQ ONNX) of the SDXL UNet, calibrated on the UNet's real inputs.

TensorRT builds INT8 engines from ONNX files that carry QuantizeLinear/DequantizeLinear pairs ("explicit
quantization"): the Q/DQ nodes say exactly which tensors are INT8, and TensorRT fuses each DQ -> Conv/MatMul
into an INT8 kernel. :func:`build_int8_unet` is the one call the build makes; the work is in four modules:

* :mod:`.int8_calibration`: the UNet's real inputs, recorded while diffusers' pipeline denoises real prompts;
* :mod:`.int8_qdq`: which layers are quantized and which stay high precision, and TensorRT's placement checks;
* :mod:`.int8_ort`: calibration and Q/DQ insertion with ONNX Runtime's ``quantize_static``;
* :mod:`.int8_report`: the report stored in the manifest and the error against FP32 on held-out inputs.

The names below are re-exported so ``from sdxl_trt.engine import int8`` reaches the whole API.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdxl_trt.errors import BuildError

from .int8_calibration import (
    DEFAULT_PROMPTS_FILE,
    UNET_INPUT_NAMES,
    collect_calibration_inputs,
    read_prompts,
)
from .int8_ort import EXTERNAL_DATA_BYTES, CalibrateMethod, quantize_unet
from .int8_qdq import EXCLUDED_NAME_PATTERNS, QUANTIZED_OP_TYPES, check_tensorrt_qdq, plan_exclusions
from .int8_report import QuantizationReport, measure_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sdxl_trt.export.loading import LoadedModel

__all__ = [
    "DEFAULT_PROMPTS_FILE", "EXCLUDED_NAME_PATTERNS", "EXTERNAL_DATA_BYTES", "QUANTIZED_OP_TYPES", "UNET_INPUT_NAMES",
    "CalibrateMethod", "QuantizationReport", "build_int8_unet", "check_tensorrt_qdq", "collect_calibration_inputs",
    "measure_error", "plan_exclusions", "quantize_unet", "read_prompts",
]


def build_int8_unet(
    model: LoadedModel,
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
    calibrate_method: CalibrateMethod = "minmax",
    quant_level: float = 3.0,
    providers: Sequence[str] | None = None,
) -> QuantizationReport:
    """Calibrate on ``num_prompts`` prompts, quantize, and measure the error on ``num_eval_prompts`` other prompts.

    The prompts are the file's first ``num_prompts`` lines; the held-out ones are the next ``num_eval_prompts``, run
    with another seed, so the error is measured on inputs the ranges were not fitted to. ``max_samples`` caps the
    recorded UNet calls (default: 2 per prompt, spread over the schedule across prompts)."""
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
    t0 = time.perf_counter()
    calib = collect_calibration_inputs(
        model, prompts[:num_prompts], steps=steps, width=width, height=height,
        guidance_scale=guidance_scale, seed=seed, max_samples=cap,
    )
    held_out: list[dict[str, np.ndarray]] = []
    if num_eval_prompts:
        held_out = collect_calibration_inputs(
            model, prompts[num_prompts:need], steps=steps, width=width, height=height,
            guidance_scale=guidance_scale, seed=seed + 10_000, max_samples=max(1, math.ceil(steps / 4)) * num_eval_prompts,
        )
    collected = time.perf_counter() - t0
    report = quantize_unet(
        Path(fp32_unet_onnx), Path(out_onnx), calibration=calib, calibrate_method=calibrate_method,
        quant_level=quant_level, eval_inputs=held_out or None, providers=providers,
    )
    report.collection_seconds = round(collected, 3)
    return report
