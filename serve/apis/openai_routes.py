"""OpenAI Images API -> GenerationRequest -> OpenAI's response: ``/v1/images/generations`` and ``/edits``."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import ControlNetUnit, GenerationRequest, GenerationResult
from sdxl_trt.samplers import SCHEDULERS

from ..core.pipeline_like import PipelineLike
from ..core.settings import ServeSettings
from ..http import endpoint
from ..http.images_io import decode_off_loop, gray8, open_image
from ..http.inputs import check_size, check_texts, parse_size
from .controlnet import check_openai_refs, openai_units
from .extras import few_step_fields, lora_set
from .openai_api import UNSUPPORTED, ImageData, ImageEditRequest, ImageGenerationRequest, ImagesResponse

router = APIRouter(prefix="/v1/images", tags=["OpenAI Images"], route_class=endpoint.FastJsonRoute)

DEFAULT_STEPS = 30
"""Steps when a request names none (capped at the server's --max-steps)."""


def to_generation_request(body: ImageGenerationRequest | ImageEditRequest, *, settings: ServeSettings,
                          pipeline: PipelineLike, init_image: Image.Image | None = None,
                          mask: Image.Image | None = None,
                          controlnets: tuple[ControlNetUnit, ...] = ()) -> GenerationRequest:
    """The one translation of an OpenAI body into the engine's request; refusals name OpenAI's field. The
    route checked the body's texts (``check_texts``) before decoding anything."""
    for name, accepted in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value not in accepted:
            raise InvalidRequestError(f"{name}={value!r} is not supported by this server", param=name)
    if body.response_format == "url":
        raise InvalidRequestError("response_format 'url' is not supported: this server keeps no images to link to; "
                                  "use 'b64_json' (the default here)", param="response_format")
    if body.n > settings.max_images:
        raise InvalidRequestError(f"n must be in 1..{settings.max_images}, got {body.n}", param="n")
    steps = min(DEFAULT_STEPS, settings.max_steps) if body.steps is None else body.steps
    if steps > settings.max_steps:
        raise InvalidRequestError(f"steps must be in 1..{settings.max_steps}, got {steps}", param="steps")
    scheduler = body.scheduler or pipeline.default_scheduler
    schedulers = SCHEDULERS
    if scheduler not in schedulers:
        raise InvalidRequestError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers)}",
                                  param="scheduler")
    width = height = None
    if body.size is not None and body.size.strip().lower() != "auto":
        bucket = parse_size(body.size)
        width, height = bucket.width, bucket.height
    extra: dict[str, Any] = {"strength": body.strength} if isinstance(body, ImageEditRequest) else {}
    extra.update(few_step_fields(body.timestep_spacing, body.timesteps, body.eta))
    extra.update(cache_interval=body.cache_interval, cache_branch=body.cache_branch)
    if body.loras:
        extra["loras"] = lora_set([(r.name, r.scale) for r in body.loras], pipeline)
    return GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, width=width, height=height, steps=steps,
        guidance_scale=body.guidance_scale, scheduler=scheduler, seed=body.seed, num_images=body.n,
        init_image=init_image, mask_image=mask, controlnets=controlnets, **extra,
    )


async def _respond(request: Request, gen: GenerationRequest) -> ImagesResponse:
    result: GenerationResult = await endpoint.generate(request, gen)
    pngs = await endpoint.encode_pngs(result)
    return ImagesResponse(created=int(time.time()),
                          data=[ImageData(b64_json=b, seed=s) for b, s in zip(pngs, result.seeds, strict=True)])


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    """Text to image, optionally guided by ControlNets (``controlnets``)."""
    service = endpoint.service_of(request)
    pipeline = service.require_pipeline()
    check_texts(body, max_chars=service.settings.max_prompt_chars, skip=("controlnets",))  # once, before decoding
    gen = to_generation_request(body, settings=service.settings, pipeline=pipeline)
    check_size(gen.width, gen.height, pipeline.buckets, params=("size", "size"))  # before anything is decoded
    if body.controlnets:
        check_openai_refs(body.controlnets, pipeline)
        refs, limit = body.controlnets, endpoint.max_pixels(service)
        controlnets = await decode_off_loop(lambda: openai_units(refs, pipeline, max_pixels=limit),
                                            param="controlnets")
        gen = replace(gen, controlnets=controlnets)
    return await _respond(request, gen)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edits(request: Request) -> ImagesResponse:
    """Inpainting: multipart ``image`` (one), optional ``mask``, ``prompt``, ``n``, ``size`` and our fields."""
    service = endpoint.service_of(request)
    pipeline = service.require_pipeline()
    limit = endpoint.max_pixels(service)
    async with request.form(max_files=4, max_fields=64) as form:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        images = [v for k, v in form.multi_items() if k in ("image", "image[]")]
        masks = [v for k, v in form.multi_items() if k == "mask"]
        try:
            body = ImageEditRequest.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        # every field is checked before anything is decoded
        check_texts(body, max_chars=service.settings.max_prompt_chars)
        gen = to_generation_request(body, settings=service.settings, pipeline=pipeline)
        check_size(gen.width, gen.height, pipeline.buckets, params=("size", "size"))
        if not images:
            raise InvalidRequestError("image is required (a PNG file in the multipart body)", param="image")
        if len(images) > 1:
            raise InvalidRequestError("one image per edit is supported", param="image")
        image_bytes = await _read_upload(images[0], "image")
        mask_bytes = await _read_upload(masks[0], "mask") if masks else None

    def decode() -> tuple[Image.Image, Image.Image]:  # CPU work: on the decode pool, off the event loop
        image = open_image(image_bytes, param="image", max_pixels=limit)
        mask = open_image(mask_bytes, param="mask", max_pixels=limit) if mask_bytes is not None else None
        return image.convert("RGB"), edit_mask(image, mask)

    init_image, mask = await decode_off_loop(decode, param="image")
    return await _respond(request, replace(gen, init_image=init_image, mask_image=mask))


async def _read_upload(value: object, param: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise InvalidRequestError(f"{param} must be a file upload", param=param)
    return await value.read()


def edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The mask as the pipeline wants it (L, white = repaint), from OpenAI's or A1111's convention."""
    if mask is None:
        if not _has_alpha(image):
            raise InvalidRequestError("give a mask, or an image whose transparent areas are to be edited",
                                      param="mask")
        out = _transparent(image)
        if out.getextrema()[1] == 0:
            raise InvalidRequestError("the image has no transparent area to edit; give a mask", param="mask")
        return out
    if mask.size != image.size:
        raise InvalidRequestError(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x"
                                  f"{image.size[1]}; they must be the same size", param="mask")
    if _has_alpha(mask):
        out = _transparent(mask)
        if out.getextrema()[1] == 0:
            raise InvalidRequestError("the mask is fully opaque, so nothing would be edited; make the area to edit "
                                      "transparent (OpenAI's convention)", param="mask")
        return out
    out = gray8(mask)
    if out.getextrema()[1] == 0:
        raise InvalidRequestError("the mask is all black, so nothing would be edited; paint the area to edit white, "
                                  "or make it transparent in an RGBA mask", param="mask")
    return out


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)


def _transparent(image: Image.Image) -> Image.Image:
    """Fully transparent pixels -> white (repaint), the rest black."""
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)
