"""``sdxl-trt build``: export what is missing or stale, then build each component's engine."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ._common import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="export what is missing or stale, then build engines")
    add_model_arguments(p)
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime", "torch"], default=None,
                   help="default: tensorrt if importable with a CUDA GPU, else onnxruntime")
    p.add_argument("--precision", choices=["fp16", "int8", "fp8", "fp32"], default=None,
                   help="default: fp16 on a GPU, fp32 on the CPU; fp8: TensorRT on compute capability 8.9+ (Ada, Hopper, Blackwell)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="fp8: also quantize the attention's Q.K^T and softmax.V MatMuls (FP8 Q/DQ on both inputs, "
                   "ranges from the same calibration); default: convs and linears only (the MLPerf recipe)")
    p.add_argument("--buckets", default="all", help="'all' or WxH,WxH,...")
    p.add_argument("--max-batch", type=int, default=1, help="images per request the engines are built for")
    p.add_argument("--profile", choices=["per-bucket", "range"], default="per-bucket")
    p.add_argument("--max-prompt-chunks", type=int, default=3, help="prompt length in 75-token chunks")
    p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT memory-pool limit")
    p.add_argument("--refittable", action="store_true", help="TensorRT: keep weights refittable (LoRA)")
    p.add_argument("--weight-streaming", action="store_true", help="TensorRT: allow weight streaming")
    p.add_argument("--compile", action="store_true", help="torch: compile the requested shapes with Inductor now")
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="int8: calibration prompts of the shipped set (64), 2 UNet calls sampled from each; more "
                   "prompts cover more content (max-abs ranges only widen) and cost one denoising run each")
    p.add_argument("--calibration-steps", type=int, default=20,
                   help="int8: denoising steps per calibration prompt; the samples are spread over this schedule, so "
                   "use the step count you serve with (fewer steps: faster calibration, coarser noise levels)")
    p.add_argument("--calibration-backend", choices=["torch", "onnxruntime"], default="torch",
                   help="int8: where ranges are measured: torch (forward hooks on the model's device; memory is the "
                   "model plus one step) or onnxruntime (ORT's calibrator on the ONNX file; host memory grows with "
                   "a whole forward pass's activations, kept for comparison)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse a LoRA (.safetensors, diffusers or kohya format) into the base model before export "
                        "and INT8 calibration; repeatable, applied in order (scale default 1)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH[:NAME]",
                   help="build a ControlNet with the engines (repeatable): a diffusers-format directory, a single "
                        "file, or a preset (tiny-controlnet, tiny-controlnet-small, sdxl-controlnet); NAME (default: "
                        "from the path) is what requests call it (sdxl-trt run --controlnet NAME)")
    p.add_argument("--deepcache", type=_branch_list, default=(), metavar="K[,K...]",
                   help="step caching (DeepCache): for each cache branch K (DeepCache's cache_branch_id; 0 is the "
                        "shallowest and fastest), a shallow UNet engine unet_shallow.K, and a UNet that also returns "
                        "the feature it reuses; requests ask with --cache-interval N --cache-branch K")
    p.set_defaults(func=cmd_build)


def _branch_list(text: str) -> tuple[int, ...]:
    """``0,1,3`` -> (0, 1, 3); which branches exist is checked against the model's UNet."""
    try:
        branches = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated branch numbers like 0 or 0,1,3, got {text!r}") from None
    if any(k < 0 for k in branches):
        raise argparse.ArgumentTypeError(f"cache branches are >= 0, got {text!r}")
    return branches


def cmd_build(args: argparse.Namespace) -> int:
    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.engine_dir.describe import format_build_table

    opts = BuildOptions(
        model=args.model, refiner=args.refiner, out=Path(args.out), backend=args.backend, precision=args.precision,
        buckets=args.buckets, max_batch=args.max_batch, profile_mode=args.profile, device=args.device,
        model_config=args.model_config, max_prompt_chunks=args.max_prompt_chunks, workspace_gib=args.workspace_gib,
        refittable=args.refittable, weight_streaming=args.weight_streaming, compile_torch=args.compile,
        calibration_prompts=args.calibration_prompts, calibration_steps=args.calibration_steps,
        calibration_backend=args.calibration_backend, fp8_attention=args.fp8_attention,
        loras=tuple(args.lora), **_controlnet_build_option(args.controlnet), deepcache=tuple(args.deepcache),
        build_command=" ".join(["sdxl-trt", *map(shlex.quote, sys.argv[1:])]),
    )
    manifest = build_engines(opts)
    print(format_build_table(manifest))
    print(f"\nengines in {args.out} (backend {manifest.backend}, precision {manifest.precision})")
    return 0


def _controlnet_build_option(specs: list[str]) -> dict[str, tuple[str, ...]]:
    """``--controlnet`` values for BuildOptions; passed only when given, so a build without ControlNet never
    depends on the option existing."""
    return {"controlnets": tuple(specs)} if specs else {}
