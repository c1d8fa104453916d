"""Images in and out of the HTTP APIs: base64 / upload bytes -> PIL (checked), PIL -> PNG base64.

Client bytes are untrusted, and what a decoder spends is bounded before it starts:

* pixels: the declared size is checked from the header before anything is decoded in full (a few hundred
  bytes of PNG can declare 30000x30000 pixels);
* structure: a file's segments are counted first, in C or in a bounded walk (:func:`check_structure`), since
  the decoders spend time per segment, not per byte: a progressive JPEG's scan is 12 bytes and costs a pass
  over the whole image (100 000 of them: 1.2 MB, 12 s of CPU), and Pillow reads a PNG's chunks one by one in
  Python (a million empty chunks: 14 MB, 6 s). At most :data:`MAX_JPEG_SCANS` scans and
  :data:`MAX_SEGMENTS` markers or chunks; one frame for PNG and WebP (an animation is refused, not cut to its
  first frame); PNG text chunks at most :data:`MAX_TEXT_BYTES` decompressed;
* time and place: the routes decode in :func:`decode_off_loop`, on a small pool of its own (never the
  default thread pool the other requests' steps share), with a backlog bound (then 429) and a deadline
  (then 400).

Only a few formats are opened, and a truncated or corrupt file is a 400, never a 500. Nothing a client sends
is used as a path. A photo's EXIF orientation is applied (as A1111 does), so a phone picture arrives
upright; masks of any mode become 8-bit gray by scaling, never by clipping (a 16-bit mask's 20000 is 78,
not 255).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import os
import re
import struct
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.runtime.images import png_bytes

from ..core.errors import OverloadedError

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMATS = ("PNG", "JPEG", "WEBP")
"""Formats a client may send; others (and PIL's rarer plugins) are refused."""

MAX_JPEG_SCANS = 100
"""Scans of a progressive JPEG (encoders write about 10; libjpeg-turbo's tools suggest limits of this order)."""
MAX_SEGMENTS = 20_000
"""JPEG markers or PNG/WebP chunks in one file (a 30 MB PNG in 8 KiB IDAT chunks has about 4 000)."""
MAX_TEXT_BYTES = 4 * 2**20
"""Decompressed PNG text (tEXt/zTXt/iTXt) per image; Pillow's default is 64 MB from a few KB of zTXt."""
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_TEXT_BYTES)

DECODE_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
"""Threads that decode client images (and run preprocessors); their own pool, so a flood of images cannot
take the default pool's threads that encoding and the other requests use."""
DECODE_BACKLOG = 64
"""Decodes waiting for a thread (as many as the default --max-queue); one more is refused with 429 at once."""
DECODE_TIMEOUT_S = 5.0
"""Longest a request's decoding may run before it is refused with 400 (the thread finishes on its own)."""


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


_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")  # every marker but RSTn and stuffing (FF 00, FF FF)


def check_structure(data: bytes, *, param: str) -> None:
    """Refuse a PNG, JPEG or WebP with more segments (scans, chunks) than a decoder should be asked to walk;
    the count stops at the limit, so the check costs at most that many steps."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_chunks(data, 8, ">I4s", 12, param=param, what="PNG chunks")
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        _check_chunks(data, 12, "<4sI", 8, param=param, what="WebP chunks", riff=True)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(data, param=param)


def _too_many(param: str, what: str, limit: int) -> InvalidRequestError:
    return InvalidRequestError(f"{param} has over {limit} {what}; no ordinary image has that many (re-save it as "
                               "a plain PNG or baseline JPEG)", param=param)


def _check_chunks(data: bytes, pos: int, layout: str, overhead: int, *, param: str, what: str,
                  riff: bool = False) -> None:
    count = 0
    while pos + 8 <= len(data):
        count += 1
        if count > MAX_SEGMENTS:
            raise _too_many(param, what, MAX_SEGMENTS)
        first, second = struct.unpack_from(layout, data, pos)
        length = second if riff else first
        pos += overhead + length + (length & 1 if riff else 0)


def _check_jpeg(data: bytes, *, param: str) -> None:
    """Markers before the first scan walked by their lengths (Pillow reads each in Python), then every marker
    after it counted by a regular expression (C speed): the scans at most MAX_JPEG_SCANS."""
    pos, count = 2, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return  # not a marker where one should be: the decoder refuses it
        kind = data[pos + 1]
        if kind == 0xFF:  # fill byte
            pos += 1
            continue
        count += 1
        if count > MAX_SEGMENTS:
            raise _too_many(param, "JPEG markers", MAX_SEGMENTS)
        if kind == 0xDA:
            break
        if kind == 0x01 or 0xD0 <= kind <= 0xD9:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    else:
        return
    scans = 0
    for match in _JPEG_MARKER.finditer(data, pos):
        count += 1
        if data[match.start() + 1] == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _too_many(param, "progressive-JPEG scans", MAX_JPEG_SCANS)
        if count > MAX_SEGMENTS:
            raise _too_many(param, "JPEG markers", MAX_SEGMENTS)


def open_image(data: bytes, *, param: str, max_pixels: int) -> Image.Image:
    """Bytes -> a fully loaded PIL image, refusing non-images, oversized, over-segmented, animated and
    truncated files."""
    check_structure(data, param=param)
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
    frames = getattr(image, "n_frames", 1)
    if frames != 1 and image.format in ("PNG", "WEBP"):  # a camera's MPO JPEG (a preview, a depth map) is fine
        raise InvalidRequestError(f"{param} is an animation of {frames} frames; send a still image", param=param)
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


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_waiting = 0  # decodes submitted and not yet started (read and written on the event loop's thread only)


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="sdxl-trt-decode")
        return _pool


async def decode_off_loop(work: Callable[[], T], *, param: str, timeout_s: float | None = None) -> T:
    """``work()`` (decoding client images, preprocessing them) on the decode pool: 429 when its backlog is
    full, 400 when it runs past ``timeout_s`` (default :data:`DECODE_TIMEOUT_S`) once started."""
    global _waiting
    if _waiting >= DECODE_BACKLOG:
        raise OverloadedError(f"{DECODE_BACKLOG} image decodes are already waiting; retry shortly",
                              retry_after_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.create_future()

    def run() -> T:
        loop.call_soon_threadsafe(_started, started)
        return work()

    _waiting += 1
    job = asyncio.wrap_future(_decode_pool().submit(run))
    counted = True
    try:
        await asyncio.wait({job, started}, return_when=asyncio.FIRST_COMPLETED)  # queued: no deadline yet
        _waiting, counted = _waiting - 1, False
        limit = DECODE_TIMEOUT_S if timeout_s is None else timeout_s
        t0 = time.monotonic()
        done, _ = await asyncio.wait({job}, timeout=limit)
        if not done:
            log.warning("refused a request: decoding %s ran past %g s (its thread finishes on its own)", param, limit)
            raise InvalidRequestError(f"{param} took over {limit:g} s to decode; send a smaller or simpler image",
                                      param=param)
        log.debug("decoded %s in %.3f s", param, time.monotonic() - t0)
        return job.result()
    finally:
        if counted:
            _waiting -= 1
        if not job.done():
            job.cancel()  # not started yet: never runs; running: its result is dropped
            job.add_done_callback(_retrieve)


def _started(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(job: asyncio.Future[Any]) -> None:
    if not job.cancelled():
        job.exception()


def png_b64(image: Image.Image, parameters: dict[str, Any]) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
