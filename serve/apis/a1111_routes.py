"""AUTOMATIC1111's ``/sdapi/v1`` -> GenerationRequest -> A1111's response.

Field policy (the models in ``a1111_api`` declare them all):

* honoured: prompt, negative_prompt, seed (-1 = random), sampler_name / sampler_index, scheduler, steps,
  cfg_scale, width, height, batch_size x n_iter (images, seeds seed+k as A1111 numbers them), eta (where the
  sampler reads it, it must be the value ours runs with), refiner_checkpoint / refiner_switch_at (the refiner
  in ensemble mode), send_images; img2img: init_images (one), denoising_strength, mask, mask_blur (the mask
  is blurred, then binarised at 0.5 by the pipeline), inpainting_mask_invert.
* accepted, no effect (A1111 ignores them too, or they only steer saving and bookkeeping): the hr_* and
  firstphase_* fields while enable_hr is false, denoising_strength in txt2img, subseed while
  subseed_strength is 0, s_tmin / s_tmax while s_churn is 0, do_not_save_*, override_settings_restore_afterwards,
  disable_extra_networks, comments, force_task_id, image_cfg_scale (instruct-pix2pix only),
  inpaint_full_res and inpaint_full_res_padding (we always inpaint the whole picture),
  inpainting_fill 0 or 1 (we start from the re-noised original).
* refused with a 400 naming the field when set to anything but its default: enable_hr, restore_faces, tiling,
  styles, subseed_strength, seed_resize_from_*, s_churn, s_noise, s_min_uncond, override_settings (other
  than the loaded checkpoint), script_name / script_args, active alwayson_scripts other than the ControlNet
  extension's (``controlnet``: see ``serve/apis/controlnet.py``), save_images, infotext,
  resize_mode, mask_round, inpainting_fill 2 or 3, initial_noise_multiplier, latent_mask,
  include_init_images, and any unknown field that is not empty.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageFilter, ImageOps

from sdxl_trt import __version__
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import ControlNetUnit, GenerationRequest
from sdxl_trt.samplers import SCHEDULERS

from ..core.pipeline_like import PipelineLike
from ..core.settings import ServeSettings
from ..http import endpoint
from ..http.images_io import decode_b64_image, decode_off_loop, gray8
from ..http.inputs import check_size, check_texts
from . import samplers
from .a1111_api import (
    GenerationResponse,
    Img2ImgRequest,
    Progress,
    Sampler,
    Scheduler,
    SDModel,
    Txt2ImgRequest,
)
from .controlnet import IMAGE_KEYS, a1111_units, check_a1111_units, strip_images
from .extras import few_step_fields, lora_listing, lora_set, strip_a1111_loras

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"], route_class=endpoint.FastJsonRoute)

_EMPTY: tuple[Any, ...] = (None, False, 0, "", [], {})
_IMAGE_FIELDS = ("init_images", "mask")
DEFAULT_STEPS = 50
"""A1111's steps when a request names none (capped at the server's --max-steps)."""


def _refuse(field: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: {why}", param=field)


def model_info(pipeline: PipelineLike, which: str = "model") -> dict[str, str] | None:
    """Name and hashes of the base model (``which="model"``) or the refiner, from the engines' manifest."""
    if which not in ("model", "refiner"):
        raise ValueError(f"which must be 'model' or 'refiner', got {which!r}")
    info = pipeline.manifest.model if which == "model" else pipeline.manifest.refiner
    if not info:
        return None
    name = str(info.get("name", which))
    sha = str(info.get("identity_hash", ""))
    return {"name": name, "sha256": sha, "hash": sha[:10], "title": f"{name} [{sha[:10]}]" if sha else name}


def _check_common(body: Txt2ImgRequest | Img2ImgRequest, pipeline: PipelineLike) -> None:
    if body.styles:
        raise _refuse("styles", "prompt styles are not supported; put their text in the prompt")
    if body.subseed_strength:
        raise _refuse("subseed_strength", "variation seeds are not supported; leave it at 0")
    if body.seed_resize_from_h > 0 or body.seed_resize_from_w > 0:
        raise _refuse("seed_resize_from_h", "resizing seeds is not supported; leave seed_resize_from_h/w at -1")
    for name in ("restore_faces", "tiling"):
        if getattr(body, name):
            raise _refuse(name, "not supported by this server; leave it false")
    for name, default in (("s_churn", 0.0), ("s_noise", 1.0), ("s_min_uncond", 0.0)):
        value = getattr(body, name)
        if value is not None and value != default:
            raise _refuse(name, f"only {default:g} is supported, got {value:g}")
    if body.override_settings:
        base = model_info(pipeline) or {}
        loaded = {base.get("name"), base.get("title"), base.get("hash")}
        others = sorted(k for k, v in body.override_settings.items()
                        if not (k == "sd_model_checkpoint" and isinstance(v, str) and v in loaded))
        if others:
            raise _refuse("override_settings", f"settings cannot be overridden here: {', '.join(others)}")
    if body.script_name or body.script_args:
        raise _refuse("script_name", "scripts are not supported")
    active = sorted(name for name, value in body.alwayson_scripts.items()
                    if name.lower() != "controlnet" and _script_active(name, value))
    if active:
        raise _refuse("alwayson_scripts", f"scripts are not supported: {', '.join(active)}")
    if body.save_images:
        raise _refuse("save_images", "this server does not save images; they are returned in the response")
    if body.infotext:
        raise _refuse("infotext", "parameters from infotext are not supported; send them as fields")
    for name, value in (body.model_extra or {}).items():
        if value not in _EMPTY:
            raise _refuse(name, "unknown field; this server does not support it")


def _script_active(name: str, value: object) -> bool:
    """Clients send switched-off scripts as ``{"args": []}`` or ``{"args": [False, ...]}``."""
    if not isinstance(value, dict):
        return bool(value)
    args = value.get("args") or []
    if not isinstance(args, list):
        raise _refuse(f"alwayson_scripts.{name}.args", f"must be a list, got {type(args).__name__}")
    return bool(args) and args[0] is not False


def to_generation_request(body: Txt2ImgRequest | Img2ImgRequest, *, settings: ServeSettings,
                          pipeline: PipelineLike, init_image: Image.Image | None = None,
                          mask: Image.Image | None = None, controlnets: tuple[ControlNetUnit, ...] = ()
                          ) -> tuple[GenerationRequest, samplers.A1111Sampler]:
    """The one translation of an A1111 body into the engine's request (and the A1111 sampler it names), every
    field checked; the images (``init_image``, ``mask``, ``controlnets``: decoded by the caller) may be added
    afterwards, so nothing is decoded for a request refused here. The route checked the body's texts
    (``check_texts``) first."""
    _check_common(body, pipeline)
    scheduler, sampler = samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler,
                                          ours=SCHEDULERS)
    if body.eta is not None and sampler.eta is not None and body.eta != sampler.eta:
        raise _refuse("eta", f"{sampler.name} runs with eta {sampler.eta:g} here; got {body.eta:g}")
    few_step = few_step_fields(samplers.timestep_spacing(body.scheduler, scheduler), None,
                               samplers.request_eta(scheduler, body.eta))
    prompt, tags = strip_a1111_loras(body.prompt)
    if tags:
        few_step["loras"] = lora_set(tags, pipeline, param="prompt")
    n = body.batch_size * body.n_iter
    if n > settings.max_images:
        raise InvalidRequestError(f"batch_size x n_iter = {n} images; at most {settings.max_images} per request",
                                  param="batch_size")
    steps = min(DEFAULT_STEPS, settings.max_steps) if body.steps is None else body.steps
    if steps > settings.max_steps:
        raise InvalidRequestError(f"steps must be in 1..{settings.max_steps}, got {steps}", param="steps")
    refiner: dict[str, Any] = {}
    if body.refiner_checkpoint not in (None, "", "None"):
        info = model_info(pipeline, "refiner")
        if info is None:
            raise _refuse("refiner_checkpoint", "these engines were built without a refiner")
        if body.refiner_checkpoint not in (info["name"], info["title"], info["hash"]):
            raise _refuse("refiner_checkpoint", f"unknown refiner {body.refiner_checkpoint!r}; available: "
                          f"{info['title']}")
        refiner = {"refiner_mode": "ensemble", "refiner_start": body.refiner_switch_at or 0.8}
    extra: dict[str, Any] = {}
    if isinstance(body, Txt2ImgRequest):
        if body.enable_hr:
            raise _refuse("enable_hr", "the hires fix is not supported; generate at a built size instead")
    else:
        strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        if not 0.0 < strength <= 1.0:
            raise InvalidRequestError(f"denoising_strength must be in (0, 1], got {strength:g}",
                                      param="denoising_strength")
        extra = {"strength": strength, "init_image": init_image, "mask_image": mask}
    return GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt, width=body.width, height=body.height,
        steps=steps, guidance_scale=body.cfg_scale, scheduler=scheduler,
        seed=None if body.seed == -1 else body.seed, num_images=n, controlnets=controlnets, **refiner, **extra,
        **few_step, cache_interval=body.cache_interval, cache_branch=body.cache_branch,
    ), sampler


def _check_img2img(body: Img2ImgRequest) -> None:
    """img2img's fields that need no decoding (cheap: before any image is decoded)."""
    for name, value, ok in (("resize_mode", body.resize_mode, (0,)), ("inpainting_fill", body.inpainting_fill, (0, 1)),
                            ("initial_noise_multiplier", body.initial_noise_multiplier, (None, 1.0)),
                            ("latent_mask", body.latent_mask, (None, "")),
                            ("include_init_images", body.include_init_images, (False,))):
        if value not in ok:
            raise _refuse(name, f"only {' or '.join(map(repr, ok))} is supported, got {value!r}")
    if not body.init_images:
        raise InvalidRequestError("init_images is required: a list with one base64 image", param="init_images")
    if len(body.init_images) > 1:
        raise _refuse("init_images", f"one init image per request is supported, got {len(body.init_images)}")
    if body.mask is not None and body.mask != "":
        if not body.mask_round:
            raise _refuse("mask_round", "only true is supported (the mask is binarised)")
        if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
            raise _refuse("mask_blur_x", "different horizontal and vertical blur is not supported")


def _img2img_inputs(body: Img2ImgRequest, max_pixels: int) -> tuple[Image.Image, Image.Image | None]:
    """The init image and mask, decoded (CPU work: off the event loop, after :func:`_check_img2img`)."""
    _check_img2img(body)
    assert body.init_images
    image = decode_b64_image(body.init_images[0], param="init_images", max_pixels=max_pixels)
    if body.mask is None or body.mask == "":
        return image.convert("RGB"), None
    mask = decode_b64_image(body.mask, param="mask", max_pixels=max_pixels)
    if mask.size != image.size:
        raise InvalidRequestError(f"mask is {mask.size[0]}x{mask.size[1]} but the init image is {image.size[0]}x"
                                  f"{image.size[1]}; they must be the same size", param="mask")
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
    mask = binary_mask(mask)
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return image.convert("RGB"), mask


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's ``create_binary_mask``: an RGBA mask with transparency is its alpha (opaque = repaint), binarised;
    any other mask is its grayscale (white = repaint)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return gray8(mask)


def _info(body: Txt2ImgRequest | Img2ImgRequest, sampler: samplers.A1111Sampler, result_params: dict[str, Any],
          seeds: list[int], model: dict[str, str] | None, timings: dict[str, float] | None = None,
          steps_run: dict[str, int] | None = None) -> str:
    """A1111's ``info``: a JSON string with ``seed``, ``all_seeds`` and the settings used; ours added: ``timings``
    (seconds per stage of the request's batch, and its own ``queue_wait``) and ``steps_run`` (steps per UNet)."""
    n = len(seeds)
    w, h = result_params.get("width"), result_params.get("height")
    schedule = next((label for name, label in samplers.SCHEDULES if name == (body.scheduler or "automatic").lower()
                     or label.lower() == (body.scheduler or "automatic").lower()), "Automatic")
    model_name = (model or {}).get("name", "")
    steps = result_params.get("steps")
    # The ControlNet extension's infotext entries, one per unit used.
    extra = {f"ControlNet {i}": (f"Model: {u['name']}, Weight: {u['scale']:g}, Guidance Start: {u['start']:g}, "
                                 f"Guidance End: {u['end']:g}, Control Mode: "
                                 f"{'ControlNet is more important' if u['guess_mode'] else 'Balanced'}")
             for i, u in enumerate(result_params.get("controlnets", []))}

    def infotext(seed: int) -> str:
        lines = [body.prompt]
        if body.negative_prompt:
            lines.append(f"Negative prompt: {body.negative_prompt}")
        lines.append(f"Steps: {steps}, Sampler: {sampler.name}, Schedule type: {schedule}, CFG scale: "
                     f"{body.cfg_scale:g}, Seed: {seed}, Size: {w}x{h}, Model: {model_name}, Version: sdxl-trt "
                     f"{__version__}" + "".join(f', {k}: "{v}"' for k, v in extra.items()))
        return "\n".join(lines)

    info: dict[str, Any] = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * n, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n, "seed": seeds[0] if seeds else None, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": w, "height": h,
        "sampler_name": sampler.name, "scheduler": schedule, "cfg_scale": body.cfg_scale, "steps": steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": (model or {}).get("hash"), "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": result_params.get("strength"), "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": [infotext(s) for s in seeds], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "scheduler_name": result_params.get("scheduler"), "backend": result_params.get("backend"),
        "version": f"sdxl-trt {__version__}", "timings": timings or {}, "steps_run": steps_run or {},
    }
    return json.dumps(info)


async def _generate(request: Request, body: Txt2ImgRequest | Img2ImgRequest) -> GenerationResponse:
    service = endpoint.service_of(request)
    pipeline = service.require_pipeline()
    check_texts(body, max_chars=service.settings.max_prompt_chars, skip=_IMAGE_FIELDS,  # once, before decoding
                image_keys=IMAGE_KEYS)
    # Every field is checked before anything is decoded or resized: sizes against the built buckets, counts
    # against the limits, ControlNet units against the built ControlNets; then the images, off the event loop.
    size = check_size(body.width, body.height, pipeline.buckets)
    gen, sampler = to_generation_request(body, settings=service.settings, pipeline=pipeline)
    units = check_a1111_units(body.alwayson_scripts, pipeline)
    limit = endpoint.max_pixels(service)
    if isinstance(body, Img2ImgRequest) or units:
        if isinstance(body, Img2ImgRequest):
            _check_img2img(body)

        def decode() -> tuple[Image.Image | None, Image.Image | None, tuple[ControlNetUnit, ...]]:
            init, mask = _img2img_inputs(body, limit) if isinstance(body, Img2ImgRequest) else (None, None)
            fit_to = (size.width, size.height) if size is not None else init.size if init is not None else \
                (pipeline.buckets[0].width, pipeline.buckets[0].height)
            return init, mask, a1111_units(body.alwayson_scripts, pipeline, max_pixels=limit, size=fit_to)

        init_image, mask, controlnets = await decode_off_loop(decode, param="init_images" if isinstance(
            body, Img2ImgRequest) else "alwayson_scripts.controlnet.args")
        gen = replace(gen, init_image=init_image, mask_image=mask, controlnets=controlnets)
    result = await endpoint.generate(request, gen)
    images = await endpoint.encode_pngs(result) if body.send_images else []
    parameters = body.model_dump(exclude={"init_images", "mask"})
    parameters["alwayson_scripts"] = strip_images(body.alwayson_scripts)
    if isinstance(body, Img2ImgRequest):
        parameters.update(init_images=None, mask=None)
    return GenerationResponse(images=images, parameters=parameters,
                              info=_info(body, sampler, result.parameters, result.seeds, model_info(pipeline),
                                         result.timings, result.steps_run))


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
    return await _generate(request, body)


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
    return await _generate(request, body)


@router.get("/samplers", response_model=list[Sampler])
async def get_samplers() -> list[Sampler]:
    return [Sampler(name=s.name, aliases=list(s.aliases), options={"scheduler": s.automatic}
                    if s.automatic != "uniform" else {})
            for s in samplers.available_samplers(SCHEDULERS)]


@router.get("/schedulers", response_model=list[Scheduler])
async def get_schedulers() -> list[Scheduler]:
    return [Scheduler(name=name, label=label) for name, label in samplers.SCHEDULES]


@router.get("/loras")
async def get_loras(request: Request) -> list[dict[str, Any]]:
    """The LoRAs of the server's --lora-dir, in A1111's shape (``<lora:NAME:WEIGHT>`` in a prompt uses them),
    with each file's kind."""
    return lora_listing(endpoint.service_of(request).require_pipeline())


@router.get("/sd-models", response_model=list[SDModel])
async def get_sd_models(request: Request) -> list[SDModel]:
    pipeline = endpoint.service_of(request).require_pipeline()
    out = []
    for which in ("model", "refiner"):
        info = model_info(pipeline, which)
        if info is not None:
            out.append(SDModel(title=info["title"], model_name=info["name"], hash=info["hash"] or None,
                               sha256=info["sha256"] or None, filename=info["name"]))
    return out


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    pipeline = endpoint.service_of(request).require_pipeline()
    info = model_info(pipeline) or {}
    return {"sd_model_checkpoint": info.get("title"), "sd_checkpoint_hash": info.get("sha256"),
            "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
            "eta_ancestral": 1.0}


@router.get("/progress", response_model=Progress)
async def get_progress(request: Request) -> Progress:
    """The running batch's denoising steps (base and refiner as one run, counted on the device) and the requests
    waiting or running; all zeros when idle."""
    service = endpoint.service_of(request)
    stats = service.async_pipeline.stats() if service.async_pipeline is not None else None
    jobs = (stats.queue_depth + stats.running_requests) if stats is not None else 0
    pipeline = service.pipeline
    snap = pipeline.progress.snapshot() if pipeline is not None and stats is not None and stats.running_requests \
        else None
    return Progress(progress=snap.fraction if snap else 0.0, eta_relative=snap.eta_s if snap else 0.0, state={
        "skipped": False, "interrupted": False, "job": "", "job_count": jobs, "job_timestamp": "0", "job_no": 0,
        "sampling_step": snap.step if snap else 0, "sampling_steps": snap.steps if snap else 0})


@router.get("/scripts")
async def get_scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}
