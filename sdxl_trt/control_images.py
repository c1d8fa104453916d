"""Control-image preprocessors shared by ``sdxl-trt run`` and ``sdxl-trt serve``.

A ControlNet takes a ready control image (edges, depth, pose...). Clients of the A1111 ControlNet extension
often send a photo and name a preprocessor (``module``) instead; the two this engine offers are ``none`` (the
image is the control image) and ``canny`` (OpenCV's edge detector with the extension's default thresholds
100 and 200, as a 3-channel image). OpenCV comes with the ``serve`` extra and is imported only when canny
is asked for, so the CLI works without it unless ``--control-preprocess canny`` is used.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image

PREPROCESSORS = ("none", "canny")
"""Preprocessor names accepted (the A1111 ControlNet extension's ``module`` names)."""

MAX_RESOLUTION = 4096
"""The largest processor resolution accepted (a detection map beyond this costs seconds and helps no SDXL size)."""

CANNY_LOW = 100.0
CANNY_HIGH = 200.0
"""The A1111 ControlNet extension's canny defaults (its ``threshold_a`` and ``threshold_b``)."""


def preprocessor_name(module: object, *, param: str) -> str:
    """``module`` as one of :data:`PREPROCESSORS` (case-insensitive), or a 400 naming the supported ones."""
    name = module.strip().lower() if isinstance(module, str) else module
    if name not in PREPROCESSORS:
        raise InvalidRequestError(f"{param}: preprocessor {module!r} is not supported; use one of "
                                  f"{', '.join(PREPROCESSORS)} (or send a ready control image with 'none')",
                                  param=param)
    return str(name)


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH, *, resolution: int | None = None,
          param: str = "threshold", max_pixels: int | None = None) -> Image.Image:
    """``cv2.Canny`` of the RGB image with thresholds ``low``/``high`` in 0..255, edges as a white-on-black RGB
    image (what a canny ControlNet was trained on and what the extension sends it).

    ``resolution`` (the A1111 extension's ``processor_res``): detect at that short side, as the extension does
    (cubic up / area down, padded to a multiple of 64 with edge pixels, the padding cut off again), so the edges'
    level of detail is the extension's; None detects at the image's own size. ``max_pixels`` bounds the
    detection map: scaling the short side leaves the long one free (a 64x1024 image at 2048 would be
    2048x32768, over a GB of work), so a map over it is refused before anything is resized."""
    from PIL import Image as PILImage

    for what, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 255:
            raise InvalidRequestError(f"{param}: canny {what} threshold must be a number in 0..255, got {value!r}",
                                      param=param)
    try:
        import cv2
    except ImportError:
        raise InvalidRequestError("the canny preprocessor needs OpenCV: pip install 'sdxl-trt[serve]' (or "
                                  "opencv-python-headless), or send a ready control image", param=param) from None
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    if resolution is None:
        edges = cv2.Canny(rgb, float(low), float(high))
    else:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 64 <= resolution <= MAX_RESOLUTION:
            raise InvalidRequestError(f"{param}: processor resolution must be an integer in 64..{MAX_RESOLUTION}, "
                                      f"got {resolution!r}", param=param)
        h, w = rgb.shape[:2]
        k = resolution / min(h, w)
        th, tw = int(np.round(h * k)), int(np.round(w * k))
        if max_pixels is not None and th * tw > max_pixels:
            raise InvalidRequestError(f"{param}: canny at resolution {resolution} makes a {tw}x{th} = {tw * th} "
                                      f"pixel map from a {w}x{h} image; at most {max_pixels}: use a lower "
                                      "resolution", param=param)
        scaled = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
        padded = np.pad(scaled, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")
        edges = np.ascontiguousarray(cv2.Canny(padded, float(low), float(high))[:th, :tw])
    return PILImage.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")


def preprocess(image: Image.Image, module: str, *, low: float = CANNY_LOW, high: float = CANNY_HIGH,
               resolution: int | None = None, param: str = "module", max_pixels: int | None = None) -> Image.Image:
    """The control image for ``module`` (already checked by :func:`preprocessor_name`), always RGB; a
    detection map over ``max_pixels`` is refused (see :func:`canny`)."""
    if module == "canny":
        return canny(image, low, high, resolution=resolution, param=param, max_pixels=max_pixels)
    return image.convert("RGB")
