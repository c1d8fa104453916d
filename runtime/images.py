"""Image conversion at the pipeline's edges, matching diffusers' VaeImageProcessor, and PNG output.

* init images: RGB, resized (Lanczos) to the bucket when their size differs, scaled to [-1, 1];
* masks: grayscale, binarized at 0.5 (white = repaint), nearest-resized to the latent grid;
* outputs: [-1, 1] -> uint8 with diffusers' rounding; NaN or inf is an error, never a black PNG.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdxl_trt.errors import InvalidRequestError, NonFiniteOutputError


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> ``[1, 3, H, W]`` float32 in [-1, 1]."""
    return _rgb_unit(image, width, height, param="init_image") * 2.0 - 1.0


def control_image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A ControlNet's control image -> ``[1, 3, H, W]`` float32 in [0, 1] (diffusers' control image processor:
    RGB, Lanczos-resized to the image size, not normalised)."""
    return _rgb_unit(image, width, height, param="controlnets")


def _rgb_unit(image: Image.Image, width: int, height: int, *, param: str) -> torch.Tensor:
    """PIL -> RGB resized to ``width`` x ``height`` (Lanczos, as diffusers' VaeImageProcessor) -> [0, 1]."""
    if not isinstance(image, Image.Image):
        raise InvalidRequestError(f"{param} must be a PIL image, got {type(image).__name__}", param=param)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def mask_to_tensor(mask: Image.Image, width: int, height: int, image_size: tuple[int, int]) -> torch.Tensor:
    """PIL -> ``[1, 1, H, W]`` float32 of 0/1 (1 = repaint)."""
    if not isinstance(mask, Image.Image):
        raise InvalidRequestError(f"mask must be a PIL image, got {type(mask).__name__}", param="mask")
    if mask.size != image_size:
        raise InvalidRequestError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the init image is {image_size[0]}x{image_size[1]}; "
            "they must be the same size",
            param="mask",
        )
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(mask, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)[None, None]
    return (t >= 0.5).to(torch.float32)


def non_finite_error(what: str, bad: int | None = None) -> NonFiniteOutputError:
    count = f"{bad} " if bad is not None else ""
    return NonFiniteOutputError(
        f"{what} contains {count}NaN/inf values; no image was written. With fp16 engines this is usually the "
        "SDXL VAE overflowing: build the VAE in fp32 or bf16 (the defaults) or use an fp16-fixed VAE"
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8 on the same device (diffusers' rounding:
    ``(x / 2 + 0.5).clamp(0, 1)`` x255, round half to even, in float32), so only bytes cross to the host.
    Check the input with ``torch.isfinite`` first: clamping would turn NaN into a black image."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8)


def png_info(parameters: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks every image carries: the generation parameters as JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    info.add_text("Software", "sdxl-trt")
    return info


def png_bytes(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=png_info(parameters))
    return out.getvalue()


def save_png(image: Image.Image, path: Path, parameters: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path
