"""``sdxl-trt run``: flags -> GenerationRequest -> PNGs with their parameters, and per-stage timings.

The runtime is imported when the command runs, not when the parser is built (``sdxl-trt --help`` loads no stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest
from sdxl_trt.samplers import CUSTOM_TIMESTEPS, OWN_TIMESTEPS, SAMPLERS, SCHEDULERS, SPACINGS

if TYPE_CHECKING:
    from PIL import Image

    from sdxl_trt.request import ControlNetUnit

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate images with built engines")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    args.controlnets = controlnet_units(args.controlnet)
    return run_from_args(args)


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
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"one of {', '.join(SCHEDULERS)}; default: the model's scheduler config's sampler (euler for "
                   "SDXL, lcm for an LCM-distilled model)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--refiner-mode", choices=["ensemble", "img2img"], default=None)
    p.add_argument("--refiner-start", type=float, default=0.8, help="ensemble: fraction of the schedule the base runs")
    p.add_argument("--refiner-strength", type=float, default=0.3, help="img2img refiner: how much to re-noise")
    p.add_argument("--timestep-spacing", choices=SPACINGS, default=None,
                   help="override the model's scheduler spacing (trailing: the SDXL-Lightning/Turbo recipe); not "
                   f"for {', '.join(OWN_TIMESTEPS)}, which choose their own timesteps")
    p.add_argument("--timesteps", type=_timestep_list, default=None, metavar="T1,T2,...",
                   help="explicit descending timesteps (DMD2: 999,749,499,249); --steps becomes their count; for "
                   f"{', '.join(CUSTOM_TIMESTEPS)}")
    p.add_argument("--eta", type=float, default=None,
                   help="; ".join(f"{s.name}: {s.eta.describe()}" for s in SAMPLERS if s.eta is not None))
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA at run time (repeatable, stacked); the engines' weights are updated in place")
    add_controlnet_run_arguments(p)
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="step caching (engines built with --deepcache): a full UNet step every N steps, the shallow "
                        "UNet between (DeepCache); 1 = off")
    p.add_argument("--cache-branch", type=int, default=None, metavar="K",
                   help="the cache branch of --cache-interval (default: the lowest the engines were built with)")
    p.add_argument("--out", required=True, help="PNG path; with --batch > 1, _0, _1, ... are appended")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


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

    from sdxl_trt.control_images import preprocess
    from sdxl_trt.request import ControlNetUnit

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


def _open_image(path: str | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InvalidRequestError(f"{flag} {path}: no such file", param=flag) from None
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidRequestError(f"{flag} {path} is not a readable image ({e})", param=flag) from None


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler or "euler", seed=args.seed,
        num_images=args.batch, init_image=_open_image(args.init_image, "--init-image"), strength=args.strength,
        mask_image=_open_image(args.mask, "--mask"), refiner_mode=args.refiner_mode,
        refiner_start=args.refiner_start, refiner_strength=args.refiner_strength, snap_to_bucket=args.snap_to_bucket,
        timestep_spacing=args.timestep_spacing, timesteps=args.timesteps, eta=args.eta,
        loras=tuple(_lora_arg(text) for text in args.lora),
        controlnets=tuple(getattr(args, "controlnets", ())),  # read and checked by sdxl_trt.cli.controlnet_units
        cache_interval=args.cache_interval, cache_branch=args.cache_branch,
    )


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale), refusing a missing file or a bad scale at once."""
    from sdxl_trt.lora import LoraSpec

    spec = LoraSpec.parse(text)
    return str(spec.path), spec.scale


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix or '.png'}") for k in range(n)]


def run_from_args(args: argparse.Namespace) -> int:
    from sdxl_trt.runtime.images import save_png
    from sdxl_trt.runtime.pipeline import Pipeline

    request = request_from_args(args)
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.engines, device=args.device)
    load_s = time.perf_counter() - t0
    if args.scheduler is None and pipe.default_scheduler != request.scheduler:
        log.info("scheduler %s: the model's scheduler config", pipe.default_scheduler)
        request = dataclasses.replace(request, scheduler=pipe.default_scheduler)
    t1 = time.perf_counter()
    result = pipe.generate(request)
    total = time.perf_counter() - t1
    for k, (image, path) in enumerate(zip(result.images, output_paths(args.out, len(result.images)), strict=True)):
        params = {**result.parameters, "seed": result.seeds[k], "image_index": k}
        save_png(image, path, params)
        print(f"wrote {path} (seed {result.seeds[k]})")
    print(f"backend {pipe.backend} on {pipe.device}; load {load_s:.2f} s; generate {total:.2f} s")
    for stage, seconds in result.timings.items():
        if seconds:
            print(f"  {stage:14s} {seconds * 1000:9.1f} ms")
    return 0
