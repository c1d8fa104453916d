"""``sdxl-trt export``: every component to verified ONNX, and the table of errors against PyTorch.

``--precision int8|fp8`` writes the files a strongly typed TensorRT build of that precision parses, without
TensorRT: the fp16 components, the fp32 VAE, and the calibrated Q/DQ UNet (``unet.int8.onnx`` / ``unet.fp8.onnx``:
the Q/DQ nodes in the fp16 UNet), with its fp32 twin and the held-out error report, so they can be inspected,
built elsewhere with ``trtexec --onnx=unet.fp8.onnx`` (strongly typed: ``--stronglyTyped`` on 10.x) and measured
here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sdxl_trt.errors import BuildError

from ._common import add_model_arguments

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export every component to verified ONNX")
    add_model_arguments(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "fp8"], default="fp32",
                   help="fp16/int8/fp8: the typed files a TensorRT build of that precision parses (int8/fp8 also "
                   "calibrate the UNet's Q/DQ nodes)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="fp8: also FP8 Q/DQ on both inputs of the attention MatMuls (Q.K^T, softmax.V)")
    p.add_argument("--force", action="store_true", help="export again even if up to date")
    p.add_argument("--calibration-prompts", type=int, default=32, help="int8/fp8: calibration prompts")
    p.add_argument("--calibration-steps", type=int, default=20, help="int8/fp8: denoising steps per prompt")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from sdxl_trt.contracts import onnx_precision
    from sdxl_trt.export.exporter import export_model, format_export_table

    qdq = args.precision in ("int8", "fp8")
    if args.fp8_attention and args.precision != "fp8":
        raise BuildError(f"--fp8-attention needs --precision fp8, not {args.precision!r}")
    manifest = export_model(
        args.model, out=Path(args.out), refiner=args.refiner, precision=onnx_precision(args.precision, "tensorrt"),
        device=args.device, model_config=args.model_config, force=args.force,
    )
    print(format_export_table(manifest))
    if qdq:
        from sdxl_trt.engine.onnx_source import OnnxExport
        from sdxl_trt.engine.options import BuildOptions

        opts = BuildOptions(model=args.model, device=args.device, model_config=args.model_config,
                            calibration_prompts=args.calibration_prompts, calibration_steps=args.calibration_steps,
                            fp8_attention=args.fp8_attention)
        path, facts = OnnxExport(opts, Path(args.out), manifest).onnx_for("unet", args.precision)
        error = facts["int8"].get("error_typed") or {}
        print(f"\n{args.precision.upper()} Q/DQ UNet for TensorRT: {path} (fp32 twin in {Path(args.out) / 'fp32'}); "
              f"held-out noise_pred vs fp32: rel. L2 {error.get('relative_l2_mean', float('nan')):.4f}, "
              f"cosine {error.get('cosine_mean', float('nan')):.5f}"
              + (f"; attention MatMuls quantized: {facts['int8'].get('attention_matmuls', 0)}" if args.fp8_attention
                 else ""))
    print(f"\nwrote {Path(args.out) / 'manifest.json'}")
    return 0
