"""Images in and out of the HTTP APIs: base64 / upload bytes -> PIL (checked), PIL -> PNG base64.

Client bytes are untrusted: the declared size is checked from the header before anything is decoded in full
(a few hundred bytes of PNG can declare 30000x30000 pixels), only a few formats are opened, and a truncated
or corrupt file is a 400, never a 500. Nothing a client sends is used as a path. A photo's EXIF orientation
is applied (as A1111 does), so a phone picture arrives upright; masks of any mode become 8-bit gray by
scaling, never by clipping (a 16-bit mask's 20000 is 78, not 255). Decoding is CPU work: the routes call
these functions off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.runtime.images import png_bytes

FORMATS = ("PNG", "JPEG", "WEBP")
"""Formats a client may send; others (and PIL's rarer plugins) are refused."""


def b64_to_bytes(data: str, *, param: str) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL, as A1111 clients send) -> bytes."""
    if not isinstance(data, str) or not data:
        raise InvalidRequestError(f"{param} must be a non-empty base64 string", param=param)
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidRequestError(f"{param} is a data URL without base64 content", param=param)
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param} is not valid base64", param=param) from None


def open_image(data: bytes, *, param: str, max_pixels: int) -> Image.Image:
    """Bytes -> a fully loaded PIL image, refusing non-images, oversized and truncated files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InvalidRequestError(f"{param} declares far more pixels than the {max_pixels} accepted",
                                  param=param) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{param} is not a readable image (send PNG, JPEG or WEBP)", param=param) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidRequestError(f"{param} is not a readable image ({e})", param=param) from None
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise InvalidRequestError(
            f"{param} is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"{param} could not be decoded (truncated or corrupt: {e})", param=param) from None
    try:
        upright = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as e:  # a malformed EXIF block
        raise InvalidRequestError(f"{param} has unreadable EXIF data ({e})", param=param) from None
    return upright if upright is not None else image


def gray8(image: Image.Image) -> Image.Image:
    """Mode ``L`` of any image; 16- and 32-bit integer and float grays are scaled to 0..255, not clipped."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max(initial=0.0))
        peak = 1.0 if image.mode == "F" and top <= 1.0 else 255.0 if top <= 255.0 and not image.mode.startswith("I;16") \
            else 65535.0
        return Image.fromarray(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def decode_b64_image(data: str, *, param: str, max_pixels: int) -> Image.Image:
    return open_image(b64_to_bytes(data, param=param), param=param, max_pixels=max_pixels)


def png_b64(image: Image.Image, parameters: dict[str, Any]) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
