"""``sdxl-trt run``: flags -> GenerationRequest -> PNGs with their parameters, and per-stage timings."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.lora import LoraSpec
from sdxl_trt.request import GenerationRequest

from .images import save_png
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def _open_image(path: str | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
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
    )


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale), refusing a missing file or a bad scale at once."""
    spec = LoraSpec.parse(text)
    return str(spec.path), spec.scale


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix or '.png'}") for k in range(n)]


def run_from_args(args: argparse.Namespace) -> int:
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
