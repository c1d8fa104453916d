"""ControlNet over both HTTP APIs: the OpenAI extra field ``controlnets`` and the A1111 ControlNet extension's
``alwayson_scripts.controlnet.args``, plus the extension's ``GET /controlnet/model_list`` and ``module_list``.

Each unit becomes a :class:`~sdxl_trt.request.ControlNetUnit` in two passes: every unit's fields are checked
first (names against the engines' built ControlNets, at most one unit per built ControlNet, engines built without
any refused with the rebuild command), and only then are images decoded, so no request makes the server decode
or resize for a unit it will refuse. Control images are client bytes: they are decoded with the init images'
limits (``images_io``: formats, declared pixels and segments, truncation), off the event loop, and a bad one is a
400 naming its field (``controlnets[0].image``, ``alwayson_scripts.controlnet.args[0].image``). A
preprocessor's detection map and a resize mode's intermediate image are bounded by the same pixel cap.

A1111 mapping (the extension's field -> ours): ``model`` ("edges" or "edges [hash]") -> name, ``weight`` ->
scale, ``guidance_start``/``guidance_end`` -> start/end, ``control_mode`` Balanced (0) -> normal and "ControlNet
is more important" (2) -> guess mode; "My prompt is more important" (1) rescales the residuals in a way
diffusers has no equivalent for, so it is refused. ``module`` none/canny (``threshold_a``/``threshold_b``);
``resize_mode`` Just Resize / Crop and Resize / Resize and Fill fit the control image to the request's size
as the extension does (the pipeline then only scales it). ``enabled: false`` units are skipped.
A preprocessor runs at the extension's ``processor_res`` (default 512) or, with ``pixel_perfect``, at the
resolution that maps the image onto the request's size; the detected map is then fitted like any control
image (the extension's own final resize differs from Lanczos by edge anti-aliasing). ``low_vram``,
``hr_option``, ``save_detected_map`` are accepted with no effect; any other field must be empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from sdxl_trt.control_images import (
    CANNY_HIGH,
    CANNY_LOW,
    MAX_RESOLUTION,
    PREPROCESSORS,
    preprocess,
    preprocessor_name,
)
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import MAX_CONTROL_SCALE, ControlNetUnit

from ..http import endpoint
from ..http.images_io import decode_b64_image

if TYPE_CHECKING:
    from ..core.pipeline_like import PipelineLike
    from .openai_api import ControlNetRef

router = APIRouter(prefix="/controlnet", tags=["ControlNet"])

IMAGE_KEYS = ("image", "input_image", "mask", "mask_image", "effective_region_mask")
"""Keys of an A1111 unit that hold images: their base64 is not checked as text (it is decoded instead)."""

DEFAULT_PROCESSOR_RES = 512
"""The extension's preprocessor resolution when a request sends -1 or none."""

_NO_EFFECT = {"low_vram", "lowvram", "hr_option", "save_detected_map", "is_ui",
              "input_mode"}
_USED = {"processor_res", "pixel_perfect", "enabled", "image", "input_image", "module", "model", "weight", "guidance_start", "guidance_end",
         "control_mode", "guessmode", "resize_mode", "threshold_a", "threshold_b"}
_CONTROL_MODES: dict[Any, str] = {0: "balanced", "balanced": "balanced", 1: "prompt",
                                  "my prompt is more important": "prompt", 2: "controlnet",
                                  "controlnet is more important": "controlnet"}
_RESIZE_MODES: dict[Any, str] = {0: "just", "just resize": "just", 1: "crop", "crop and resize": "crop",
                                 "scale to fit (inner fit)": "crop", "inner fit": "crop", 2: "fill",
                                 "resize and fill": "fill", "envelope (outer fit)": "fill", "outer fit": "fill"}


def controlnet_names(pipeline: PipelineLike | None) -> list[str]:
    """The ControlNets built into the engines (none before the pipeline is loaded)."""
    return list(pipeline.controlnet_names) if pipeline is not None else []


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_name(model: object, names: Sequence[str], *, param: str) -> str:
    """A built ControlNet's name from ``model``; A1111 clients send ``"edges [1a2b3c4d]"`` (model_list titles of
    the extension), so the name is the text before a space or ``[``. Unknown: a 400 listing the built ones."""
    if not isinstance(model, str) or not model.strip() or model.strip() == "None":
        raise InvalidRequestError(f"{param} must name a built ControlNet (GET /controlnet/model_list: "
                                  f"{', '.join(names) or 'none built'}), got {_shown(model)}", param=param)
    text = model.strip()
    name = text
    if text not in names:
        head = text.split("[", 1)[0].split()
        name = head[0] if head else text
    if names and name not in names:
        raise InvalidRequestError(f"{param}: unknown ControlNet {_shown(model)}; built into these engines: "
                                  f"{', '.join(names)}", param=param)
    return name  # with no ControlNets built, Pipeline.check refuses with the rebuild command


def _number(value: object, *, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidRequestError(f"{param} must be a finite number in {low:g}..{high:g}, got {_shown(value)}",
                                  param=param)
    return float(value)


def check_unit_count(names_used: Sequence[str], pipeline: PipelineLike, *, param: str) -> None:
    """Before any image is decoded: engines without ControlNets refuse every unit (naming the rebuild), and a
    request may use each built ControlNet once (so at most as many units as there are ControlNets)."""
    if not names_used:
        return
    names = controlnet_names(pipeline)
    if not names:
        model = pipeline.manifest.model
        raise InvalidRequestError(
            "these engines were built without ControlNet; rebuild them with one or more --controlnet PATH:NAME "
            f"(sdxl-trt build --model {model.get('name', 'MODEL')} ... --controlnet PATH:NAME)", param=param)
    if len(names_used) > len(names) or len(set(names_used)) != len(names_used):
        raise InvalidRequestError(f"each ControlNet may be named once per request, got {list(names_used)}; these "
                                  f"engines have {len(names)}: {', '.join(names)}", param=param)


def openai_units(refs: Sequence[ControlNetRef] | None, pipeline: PipelineLike, *, max_pixels: int
                 ) -> tuple[ControlNetUnit, ...]:
    """The OpenAI body's ``controlnets`` as units (images decoded and preprocessed: call off the event loop,
    after :func:`check_openai_refs`). Ranges were checked by the pydantic model; start < end by the request's
    own validation."""
    if not refs:
        return ()
    names, modules = check_openai_refs(refs, pipeline)
    units = []
    for i, (ref, name, module) in enumerate(zip(refs, names, modules, strict=True)):
        param = f"controlnets[{i}]"
        image = decode_b64_image(ref.image, param=f"{param}.image", max_pixels=max_pixels)
        image = preprocess(image, module, low=ref.low_threshold, high=ref.high_threshold,
                           param=f"{param}.preprocessor", max_pixels=max_pixels)
        units.append(ControlNetUnit(name=name, image=image, scale=ref.scale, start=ref.start, end=ref.end,
                                    guess_mode=ref.guess_mode))
    return tuple(units)


def check_openai_refs(refs: Sequence[ControlNetRef], pipeline: PipelineLike) -> tuple[list[str], list[str]]:
    """Every ref's name and preprocessor, checked without decoding anything (cheap: on the event loop)."""
    built = controlnet_names(pipeline)
    names = [resolve_name(ref.name, built, param=f"controlnets[{i}].name") for i, ref in enumerate(refs)]
    modules = [preprocessor_name(ref.preprocessor, param=f"controlnets[{i}].preprocessor")
               for i, ref in enumerate(refs)]
    check_unit_count(names, pipeline, param="controlnets")
    return names, modules


def a1111_script(scripts: dict[str, Any]) -> tuple[str, Any] | None:
    """The ControlNet entry of ``alwayson_scripts`` (A1111 matches script names case-insensitively)."""
    return next(((k, v) for k, v in scripts.items() if k.lower() == "controlnet"), None)


@dataclass(frozen=True)
class _A1111Unit:
    """One enabled unit of the extension, every field checked; its image not decoded yet."""

    param: str
    name: str
    module: str
    scale: float
    start: float
    end: float
    guess_mode: bool
    fit: str
    low: float
    high: float
    data: Any
    processor_res: int | None  # None: pixel_perfect (computed from the image's size) or no preprocessor


def a1111_units(scripts: dict[str, Any], pipeline: PipelineLike, *, max_pixels: int, size: tuple[int, int]
                ) -> tuple[ControlNetUnit, ...]:
    """The extension's units as ours (images decoded, preprocessed and fitted to ``size``: call off the event
    loop, after :func:`check_a1111_units`). ``size`` is the request's (width, height), a built bucket, to which
    ``resize_mode`` fits the control image."""
    units = []
    for spec in check_a1111_units(scripts, pipeline):
        image = decode_b64_image(spec.data, param=f"{spec.param}.image", max_pixels=max_pixels)
        resolution = None
        if spec.module != "none":
            resolution = spec.processor_res if spec.processor_res is not None else \
                _pixel_perfect(image.size, size, spec.fit)
            _check_map_size(image.size, resolution, max_pixels, param=spec.param)
        image = fit_control_image(preprocess(image, spec.module, low=spec.low, high=spec.high, resolution=resolution,
                                             param=f"{spec.param}.module", max_pixels=max_pixels), size, spec.fit)
        units.append(ControlNetUnit(name=spec.name, image=image, scale=spec.scale, start=spec.start, end=spec.end,
                                    guess_mode=spec.guess_mode))
    return tuple(units)


def check_a1111_units(scripts: dict[str, Any], pipeline: PipelineLike) -> list[_A1111Unit]:
    """The extension's enabled units, every field checked and their count against the built ControlNets,
    without decoding an image (cheap: on the event loop, before any decoding)."""
    entry = a1111_script(scripts)
    if entry is None:
        return []
    key, value = entry
    base = f"alwayson_scripts.{key}"
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{base} must be an object {{\"args\": [units]}}", param=base)
    args = value.get("args") or []
    if not isinstance(args, list):
        raise InvalidRequestError(f"{base}.args must be a list of ControlNet units", param=f"{base}.args")
    names = controlnet_names(pipeline)
    specs = []
    for i, arg in enumerate(args):
        param = f"{base}.args[{i}]"
        if arg is False or arg is None or arg == {}:
            continue  # a switched-off slot
        if not isinstance(arg, dict):
            raise InvalidRequestError(f"{param} must be a ControlNet unit object, got {type(arg).__name__}",
                                      param=param)
        if arg.get("enabled", True) is False:
            continue
        specs.append(_a1111_unit(arg, param, names))
        check_unit_count([u.name for u in specs], pipeline, param=f"{base}.args")  # before reading more units
    return specs


def _a1111_unit(arg: dict[str, Any], param: str, names: Sequence[str]) -> _A1111Unit:
    for field, value in arg.items():
        if field not in _USED and field not in _NO_EFFECT and value not in (None, False, 0, "", [], {}, -1):
            raise InvalidRequestError(f"{param}.{field}: not supported by this server's ControlNet; leave it empty",
                                      param=f"{param}.{field}")
    name = resolve_name(arg.get("model"), names, param=f"{param}.model")
    module = preprocessor_name(arg.get("module", "none"), param=f"{param}.module")
    scale = _number(arg.get("weight", 1.0), param=f"{param}.weight", low=0.0, high=MAX_CONTROL_SCALE)
    start = _number(arg.get("guidance_start", 0.0), param=f"{param}.guidance_start", low=0.0, high=1.0)
    end = _number(arg.get("guidance_end", 1.0), param=f"{param}.guidance_end", low=0.0, high=1.0)
    if start >= end:
        raise InvalidRequestError(f"{param}.guidance_start ({start:g}) must be below guidance_end ({end:g}): the "
                                  "ControlNet acts on the steps between them", param=f"{param}.guidance_start")
    mode = arg.get("control_mode", 0)
    if mode in (0, None) and arg.get("guessmode"):  # the extension's deprecated boolean
        mode = 2
    control = _CONTROL_MODES.get(mode.strip().lower() if isinstance(mode, str) else mode)
    if control is None:
        raise InvalidRequestError(f"{param}.control_mode {_shown(mode)} is not a control mode; use 0 "
                                  "('Balanced') or 2 ('ControlNet is more important')", param=f"{param}.control_mode")
    if control == "prompt":
        raise InvalidRequestError(f"{param}.control_mode 'My prompt is more important' is not supported (it has no "
                                  "diffusers equivalent); use 0 ('Balanced') or 2 ('ControlNet is more important', "
                                  "diffusers' guess mode)", param=f"{param}.control_mode")
    resize = arg.get("resize_mode", 1)
    fit = _RESIZE_MODES.get(resize.strip().lower() if isinstance(resize, str) else resize)
    if fit is None:
        raise InvalidRequestError(f"{param}.resize_mode {_shown(resize)} is not one of 'Just Resize', 'Crop and "
                                  "Resize', 'Resize and Fill' (0, 1, 2)", param=f"{param}.resize_mode")
    low = _threshold(arg.get("threshold_a"), CANNY_LOW, param=f"{param}.threshold_a")
    high = _threshold(arg.get("threshold_b"), CANNY_HIGH, param=f"{param}.threshold_b")
    data = arg.get("image") or arg.get("input_image")
    if isinstance(data, dict):  # the extension's {"image": b64, "mask": b64 | None}
        if data.get("mask"):
            raise InvalidRequestError(f"{param}.image.mask: masked ControlNet units are not supported",
                                      param=f"{param}.image.mask")
        data = data.get("image")
    if not data:
        raise InvalidRequestError(f"{param}.image is required: the control image (base64 PNG/JPEG) for "
                                  f"ControlNet {name!r}", param=f"{param}.image")
    resolution = _processor_res(arg, param=param) if module != "none" and not arg.get("pixel_perfect") else None
    return _A1111Unit(param=param, name=name, module=module, scale=scale, start=start, end=end,
                      guess_mode=control == "controlnet", fit=fit, low=low, high=high, data=data,
                      processor_res=resolution)


def _pixel_perfect(raw: tuple[int, int], size: tuple[int, int], fit: str) -> int:
    """The extension's ``pixel_perfect`` resolution: the short side that maps the image onto the request's size
    under its resize mode."""
    (rw, rh), (w, h) = raw, size
    k = (min if fit == "fill" else max)(h / rh, w / rw)
    return max(64, round(k * min(rw, rh)))


def _processor_res(arg: dict[str, Any], *, param: str) -> int:
    """The short side the extension runs its preprocessor at: ``processor_res`` (-1 or absent: 512)."""
    value = arg.get("processor_res")
    if value is None or value == -1:
        return DEFAULT_PROCESSOR_RES
    return int(_number(value, param=f"{param}.processor_res", low=64, high=MAX_RESOLUTION))


def _check_map_size(raw: tuple[int, int], resolution: int, max_pixels: int, *, param: str) -> None:
    """The preprocessor scales the image's short side to ``resolution``: its detection map (both sides) must fit
    the pixel cap of client images, or a thin image would make a huge one (64x1024 at 2048: 2048x32768)."""
    (w, h) = raw
    k = resolution / min(w, h)
    tw, th = round(w * k), round(h * k)
    if tw * th > max_pixels:
        raise InvalidRequestError(
            f"{param}.processor_res: a {w}x{h} image preprocessed at {resolution} makes a {tw}x{th} = {tw * th} "
            f"pixel detection map; at most {max_pixels} are accepted: lower processor_res (or pixel_perfect off), "
            "or send an image closer to the request's aspect", param=f"{param}.processor_res")


def _threshold(value: object, default: float, *, param: str) -> float:
    """The extension sends -1 (or nothing) for "the preprocessor's default"."""
    if value is None or value == -1:
        return default
    return _number(value, param=param, low=0.0, high=255.0)


def fit_control_image(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """The extension's resize modes, for a control image whose aspect differs from the request's: ``crop``
    scales it to cover the size and cuts the middle; ``fill`` scales it to fit inside and fills the rest with
    the median colour of its border; ``just`` (and a matching aspect) leaves the stretch to the pipeline."""
    width, height = size
    w, h = image.size
    if mode == "just" or w * height == h * width:
        return image
    k = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    sw, sh = max(1, round(w * k)), max(1, round(h * k))
    if mode == "crop":  # only the part kept is resampled (as cropping the whole scaled image would give it)
        left, top = (sw - width) // 2, (sh - height) // 2
        box = (left * w / sw, top * h / sh, (left + width) * w / sw, (top + height) * h / sh)
        return image.resize((width, height), Image.Resampling.LANCZOS, box=box)
    scaled = image.resize((sw, sh), Image.Resampling.LANCZOS)
    arr = np.asarray(image.convert("RGB"))
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    colour = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(scaled.convert("RGB"), ((width - sw) // 2, (height - sh) // 2))
    return canvas


def strip_images(scripts: dict[str, Any]) -> dict[str, Any]:
    """``alwayson_scripts`` for the response's ``parameters``, its control images left out (as init_images are)."""
    entry = a1111_script(scripts)
    if entry is None or not isinstance(entry[1], dict) or not isinstance(entry[1].get("args"), list):
        return scripts
    key, value = entry
    args = [{k: (None if k in IMAGE_KEYS else v) for k, v in a.items()} if isinstance(a, dict) else a
            for a in value["args"]]
    return {**scripts, key: {**value, "args": args}}


@router.get("/model_list")
async def model_list(request: Request) -> dict[str, list[str]]:
    """The extension's shape: the built ControlNets' names (what a unit's ``model`` names)."""
    return {"model_list": controlnet_names(endpoint.service_of(request).require_pipeline())}


@router.get("/module_list")
async def module_list() -> dict[str, list[str]]:
    """The preprocessors a unit's ``module`` may name."""
    return {"module_list": list(PREPROCESSORS)}


@router.get("/version")
async def version() -> dict[str, int]:
    """The extension's API version clients check before sending units."""
    return {"version": 2}
