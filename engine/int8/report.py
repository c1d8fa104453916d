"""What an INT8 build did and how far the INT8 UNet is from FP32: the report and the error measurement.

:class:`QuantizationReport` is what the build stores in the manifest (``sdxl-trt info`` prints its error line);
:func:`measure_error` fills its error figures by running the FP32 and INT8 files on held-out inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import check_samples


@dataclass
class QuantizationReport:
    """What :func:`quantize_unet` did and how far the INT8 file is from FP32 (JSON-serializable via to_json)."""

    fp32_onnx: str
    int8_onnx: str
    tool: str
    calibrate_method: str
    quant_level: float
    calibration_samples: int
    seconds: float  # calibration + quantization + checks (not collecting the inputs)
    quantized_nodes: dict[str, int]  # op type -> nodes whose inputs are INT8 (DQ-fed)
    excluded_nodes: dict[str, str]  # node name -> why it stays high precision (Conv/MatMul/Gemm with weights)
    qdq_nodes: dict[str, int]  # QuantizeLinear / DequantizeLinear counts
    error: dict[str, Any] | None = None  # measure_error on held-out inputs
    settings: dict[str, Any] = field(default_factory=dict)
    collection_seconds: float = 0.0  # running the pipeline to record the inputs (set by build_int8_unet)
    format: str = "int8"  # int8 or fp8 (E4M3)
    typed_onnx: str | None = None  # the same Q/DQ in the fp16 UNet: what a strongly typed TensorRT build parses
    error_typed: dict[str, Any] | None = None  # measure_error of typed_onnx against the fp32 file
    attention_matmuls: int = 0  # attention MatMuls with FP8 Q/DQ on both inputs (fp8 --fp8-attention), else 0

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def summary(self) -> str:
        err = ""
        if self.error:
            err = f", noise_pred rel. L2 {self.error['relative_l2_mean']:.4f} (max {self.error['relative_l2_max']:.4f})"
        if self.error_typed:
            err += (f"; fp16-typed file rel. L2 {self.error_typed['relative_l2_mean']:.4f}, cosine "
                    f"{self.error_typed['cosine_mean']:.5f}")
        q = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized_nodes.items()))
        if self.attention_matmuls:
            q += f" (incl. {self.attention_matmuls} attention MatMuls)"
        return (
            f"{self.format.upper()} UNet: quantized {q}; {len(self.excluded_nodes)} weighted nodes kept high precision; "
            f"{self.calibration_samples} calibration samples, {self.seconds:.1f} s{err}"
        )


def measure_error(
    fp32_onnx: Path,
    int8_onnx: Path,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """noise_pred of the INT8 file against the FP32 file on the same inputs (ONNX Runtime, CPU by default).

    Per input: relative L2 error ||int8 - fp32|| / ||fp32|| and cosine similarity of the flattened outputs. Returns
    their mean / worst over the inputs, the worst absolute error and whether every output was finite. Use held-out
    inputs (not the calibration ones) so the figure is not flattered by ranges fitted to the same data."""
    import onnxruntime as ort

    def session(path: Path) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=list(providers) if providers else ["CPUExecutionProvider"])

    ref = session(Path(fp32_onnx))  # one session at a time: at full size each holds the model's weights
    names = [i.name for i in ref.get_inputs()]
    check_samples(inputs, names, "inputs")
    out_name = ref.get_outputs()[0].name

    def feed(sess: Any, s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each input in the session's own type (an fp16-typed file takes fp16; the timestep stays fp32)."""
        types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in sess.get_inputs()}
        return {n: np.ascontiguousarray(s[n], dtype=types[n]) for n in names}

    expected = [np.asarray(ref.run([out_name], feed(ref, s))[0], dtype=np.float64).ravel() for s in inputs]
    del ref
    q = session(Path(int8_onnx))
    rel, cos, max_abs = [], [], 0.0
    finite = True
    for s, a in zip(inputs, expected, strict=True):
        b = np.asarray(q.run([out_name], feed(q, s))[0], dtype=np.float64).ravel()
        finite = finite and bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        rel.append(float(np.linalg.norm(b - a)) / max(na, 1e-30))
        cos.append(float(a @ b) / max(na * nb, 1e-30))
        max_abs = max(max_abs, float(np.abs(b - a).max()))
    return {
        "samples": len(inputs),
        "relative_l2_mean": float(np.mean(rel)),
        "relative_l2_max": float(np.max(rel)),
        "cosine_mean": float(np.mean(cos)),
        "cosine_min": float(np.min(cos)),
        "max_abs_error": max_abs,
        "finite": finite,
    }
