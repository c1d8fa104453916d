"""``sdxl-trt``: export, build, info, run, serve, bench.

Each subcommand is a thin layer over the library: parse flags, call one function, print its result.
Errors the user can fix (:class:`~sdxl_trt.errors.SdxlTrtError`) print as one line and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidRequestError, SdxlTrtError

if TYPE_CHECKING:
    from .request import ControlNetUnit

log = logging.getLogger("sdxl_trt")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "diffusers", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


def cmd_export(args: argparse.Namespace) -> int:
    from .export.exporter import export_model, format_export_table

    manifest = export_model(
        args.model, out=Path(args.out), refiner=args.refiner, precision=args.precision,
        device=args.device, model_config=args.model_config, force=args.force,
    )
    print(format_export_table(manifest))
    print(f"\nwrote {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .engine.build import BuildOptions, build_engines, format_build_table

    opts = BuildOptions(
        model=args.model, refiner=args.refiner, out=Path(args.out), backend=args.backend, precision=args.precision,
        buckets=args.buckets, max_batch=args.max_batch, profile_mode=args.profile, device=args.device,
        model_config=args.model_config, max_prompt_chunks=args.max_prompt_chunks, workspace_gib=args.workspace_gib,
        refittable=args.refittable, weight_streaming=args.weight_streaming, compile_torch=args.compile,
        calibration_prompts=args.calibration_prompts, calibration_steps=args.calibration_steps,
        calibration_backend=args.calibration_backend,
        loras=tuple(args.lora), **_controlnet_build_option(args.controlnet),
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


def cmd_info(args: argparse.Namespace) -> int:
    from .engine.build import format_manifest
    from .engine_dir.manifest import Manifest

    manifest = Manifest.load(Path(args.engines))
    print(json.dumps(manifest.to_json(), indent=2) if args.json else format_manifest(manifest))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.cli_run import run_from_args

    args.controlnets = controlnet_units(args.controlnet)
    return run_from_args(args)


_CONTROL_EXAMPLE = "e.g. --controlnet edges --control-image e.png --control-scale 0.6"


class _ControlNetAction(argparse.Action):
    """``--controlnet NAME`` starts a unit; the ``--control-*`` flags after it fill that unit."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        units = list(getattr(namespace, self.dest, None) or [])
        units.append({"name": values})
        setattr(namespace, self.dest, units)


class _ControlFieldAction(argparse.Action):
    """A ``--control-*`` flag: sets its field on the unit of the last ``--controlnet``; before any, or twice for
    one unit, is a usage error (exit 2) naming the flag and the fix."""

    def __init__(self, option_strings: Sequence[str], dest: str, field: str = "", **kw: object) -> None:
        self.field = field
        super().__init__(option_strings, dest, **kw)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        units = getattr(namespace, "controlnet", None) or []
        shown = option_string if self.nargs == 0 else f"{option_string} {values}"
        if not units:
            parser.error(f"{shown} must follow the --controlnet it belongs to ({_CONTROL_EXAMPLE})")
        unit = units[-1]
        if self.field in unit:
            parser.error(f"{shown}: --controlnet {unit['name']} already has {option_string}; give each "
                         "--control-* flag once per --controlnet")
        unit[self.field] = True if self.nargs == 0 else values


def add_controlnet_run_arguments(p: argparse.ArgumentParser) -> None:
    """The per-ControlNet flags of ``run``: each ``--control-*`` belongs to the ``--controlnet`` before it."""
    p.add_argument("--controlnet", action=_ControlNetAction, default=[], metavar="NAME",
                   help="apply a ControlNet built into the engines (repeatable); the --control-* flags after it "
                        f"set its control image and settings ({_CONTROL_EXAMPLE} --controlnet depth "
                        "--control-image d.png --control-start 0.2)")
    fields: list[tuple[str, str, dict[str, object]]] = [
        ("--control-image", "image", {"metavar": "PATH", "help": "the control image (required per --controlnet)"}),
        ("--control-scale", "scale", {"type": float, "metavar": "S", "help": "conditioning scale, 0..10 (default 1)"}),
        ("--control-start", "start", {"type": float, "metavar": "A",
                                      "help": "fraction of the steps where it starts acting (default 0)"}),
        ("--control-end", "end", {"type": float, "metavar": "B",
                                  "help": "fraction of the steps where it stops acting (default 1)"}),
        ("--control-guess-mode", "guess_mode", {"nargs": 0, "help": "diffusers' guess mode (A1111's "
                                                "'ControlNet is more important')"}),
        ("--control-preprocess", "preprocess", {"choices": ["none", "canny"], "help": "turn the image into the "
                                                "control image first: canny = OpenCV edges, thresholds 100/200 "
                                                "(default none: the image is the control image)"}),
    ]
    for flag, field, kw in fields:
        p.add_argument(flag, action=_ControlFieldAction, field=field,
                       default=argparse.SUPPRESS, **kw)  # type: ignore[arg-type]


def controlnet_units(units: Sequence[dict[str, object]]) -> tuple[ControlNetUnit, ...]:
    """The parsed ``--controlnet`` groups as request units: each image read (and preprocessed) here, so a
    missing or unreadable file is one clear error before any engine loads."""
    from PIL import Image, UnidentifiedImageError

    from .control_images import preprocess
    from .request import ControlNetUnit

    out = []
    for unit in units:
        name = str(unit["name"])
        path = unit.get("image")
        if path is None:
            raise InvalidRequestError(f"--controlnet {name} has no --control-image: give it one right after it "
                                      f"(--controlnet {name} --control-image PATH)", param="--control-image")
        try:
            with Image.open(str(path)) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise InvalidRequestError(f"--control-image {path} (for --controlnet {name}): no such file",
                                      param="--control-image") from None
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidRequestError(f"--control-image {path} (for --controlnet {name}) is not a readable image "
                                      f"({e})", param="--control-image") from None
        image = preprocess(image, str(unit.get("preprocess", "none")), param="--control-preprocess")
        out.append(ControlNetUnit(name=name, image=image, scale=float(unit.get("scale", 1.0)),  # type: ignore[arg-type]
                                  start=float(unit.get("start", 0.0)), end=float(unit.get("end", 1.0)),  # type: ignore[arg-type]
                                  guess_mode=bool(unit.get("guess_mode", False))))
    return tuple(out)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.cli import bench_from_args

    return bench_from_args(args)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, help="engine directory made by `sdxl-trt build`")
    p.add_argument("--out", required=True, help="folder for the report (JSON + Markdown, and a PNG with matplotlib)")
    p.add_argument("--baseline", default=None, help="also time diffusers' SDXL pipeline on this model's weights "
                   "(the preset or path the engines were built from); enables the fp32 reference")
    p.add_argument("--baseline-refiner", default=None, help="the refiner for the baseline (default: the engines')")
    p.add_argument("--sizes", default=None, help="WxH,... built buckets to time (default: the first built bucket)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", type=int, default=5, help="timed runs per row")
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs per row after Pipeline.warmup")
    p.add_argument("--batches", default="1", help="images per request for the throughput table, e.g. 1,2,4")
    p.add_argument("--refiner-mode", choices=["none", "ensemble", "img2img"], default="none",
                   help="add a row with the refiner per size")
    p.add_argument("--refiner-start", type=float, default=0.8)
    p.add_argument("--refiner-strength", type=float, default=0.3)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch engines: load with Inductor compile")
    p.add_argument("--no-reference", action="store_true", help="skip the fp32 reference run (no image error)")
    p.add_argument("--no-step-split", action="store_true",
                   help="skip the event-timed per-step figure (a second run set at half the steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; the report says)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG plot (JSON and Markdown only)")
    p.add_argument("--name", default=None, help="report file name without suffix (default: from the engines)")


def _timestep_list(text: str) -> tuple[int, ...]:
    """``999,749,499,249`` -> (999, 749, 499, 249); order and range are checked with the request."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 999,749,499,249, got {text!r}") from None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, help="engine directory made by `sdxl-trt build`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, default=None, help="default: the first built bucket")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--snap-to-bucket", action="store_true", help="use the nearest built bucket instead of refusing")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scheduler", default=None, help="default: the model's scheduler config's sampler (euler for SDXL, "
                   "lcm for an LCM-distilled model)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--refiner-mode", choices=["ensemble", "img2img"], default=None)
    p.add_argument("--refiner-start", type=float, default=0.8, help="ensemble: fraction of the schedule the base runs")
    p.add_argument("--refiner-strength", type=float, default=0.3, help="img2img refiner: how much to re-noise")
    p.add_argument("--timestep-spacing", choices=["leading", "linspace", "trailing"], default=None,
                   help="override the model's scheduler spacing (trailing: the SDXL-Lightning/Turbo recipe)")
    p.add_argument("--timesteps", type=_timestep_list, default=None, metavar="T1,T2,...",
                   help="explicit descending timesteps (DMD2: 999,749,499,249); --steps becomes their count")
    p.add_argument("--eta", type=float, default=None, help="tcd: gamma in [0, 1] (default 0.3)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA at run time (repeatable, stacked); the engines' weights are updated in place")
    add_controlnet_run_arguments(p)
    p.add_argument("--out", required=True, help="PNG path; with --batch > 1, _0, _1, ... are appended")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-trt", description="Compiled SDXL inference: export, build, run, serve.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny", help="preset (tiny, sdxl-base-1.0, ...), diffusers dir or .safetensors")
        p.add_argument("--refiner", default=None, help="refiner: preset (tiny-refiner, sdxl-refiner-1.0) or local path")
        p.add_argument("--model-config", default=None, help="diffusers-format config dir for a single-file --model")
        p.add_argument("--out", required=True)
        p.add_argument("--device", default="cpu", help="where PyTorch runs during export (cpu or cuda)")

    p = sub.add_parser("export", help="export every component to verified ONNX")
    model_args(p)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--force", action="store_true", help="export again even if up to date")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="export what is missing or stale, then build engines")
    model_args(p)
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime", "torch"], default=None,
                   help="default: tensorrt if importable with a CUDA GPU, else onnxruntime")
    p.add_argument("--precision", choices=["fp16", "int8", "fp32"], default=None,
                   help="default: fp16 on a GPU, fp32 on the CPU")
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
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("info", help="print an engine directory's manifest")
    p.add_argument("engines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="generate images with built engines")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="end-to-end benchmark of an engine directory (optionally against diffusers)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """``serve`` lives in serve/ (it needs the [serve] extra); it registers itself when importable."""
    for module, attr in (("sdxl_trt.serve.cli", "register"),):
        try:
            register: Callable[[argparse._SubParsersAction], None] = getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            continue
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args))
    except SdxlTrtError as e:
        print(f"sdxl-trt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
