"""Checks every API body passes before it is translated: text that is valid and not too long, sizes that parse
and are built.

They run on the event loop in microseconds per field, before anything is tokenized, decoded or queued, so a
15 MB prompt, a lone surrogate or a width of 8192 (or -256, or 10**30) is a 400 naming the field at once and
never reaches the work that scales with it (decoding, resizing, the worker). Image fields are skipped:
their base64 is checked where it is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

from pydantic import BaseModel

from sdxl_trt.buckets import Bucket
from sdxl_trt.errors import InvalidRequestError

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def check_texts(body: BaseModel, *, max_chars: int, skip: Collection[str] = (),
                image_keys: Collection[str] = ()) -> None:
    """Every string in ``body`` (nested lists and dicts too, keys included) is valid Unicode and at most
    ``max_chars`` long; the error names the field path, e.g. ``override_settings.sd_model_checkpoint``.
    ``skip``: top-level image fields; ``image_keys``: keys of nested objects that hold images (A1111's
    ControlNet units), whose base64 is checked where it is decoded."""
    values = {**{name: getattr(body, name) for name in type(body).model_fields}, **(body.model_extra or {})}
    for name, value in values.items():
        if name not in skip:
            _walk(value, name, max_chars, frozenset(image_keys))


def _walk(value: Any, path: str, max_chars: int, image_keys: frozenset[str] = frozenset()) -> None:
    if isinstance(value, str):
        _check(value, path, max_chars)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(str(key), f"{path} (a key)", max_chars)
            if key not in image_keys:
                _walk(item, f"{path}.{key}", max_chars, image_keys)
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _walk(item, f"{path}[{k}]", max_chars, image_keys)


def _check(text: str, path: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidRequestError(f"{path} is {len(text)} characters; at most {max_chars} are accepted (shorten it, "
                                  "or start the server with a larger --max-prompt-chars)", param=path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{path} is not valid Unicode text (a lone surrogate {text[e.start]!r} at "
                                  f"character {e.start}); send UTF-8 text", param=path) from None


def parse_size(text: str, *, param: str = "size") -> Bucket:
    """``"WIDTHxHEIGHT"`` in ASCII digits (at most 5 each): anything else is a 400, never a ValueError."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidRequestError(f"{param} {shown!r} is not WIDTHxHEIGHT, e.g. '1024x1024'", param=param)
    return Bucket(int(match.group(1)), int(match.group(2)))


def _shown_int(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def check_size(width: object, height: object, buckets: Sequence[Bucket], *,
               params: tuple[str, str] = ("width", "height")) -> Bucket | None:
    """The request's size as one of the engines' ``buckets`` (None when neither side is given, for the caller's
    default), or a 400 naming the field and listing the built sizes; no work is sized from it before this."""
    pw, ph = params
    if width is None and height is None:
        return None
    if width is None or height is None:
        missing = pw if width is None else ph
        raise InvalidRequestError(f"give both {pw} and {ph}, or neither", param=missing)
    for value, param in ((width, pw), (height, ph)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequestError(f"{param} must be a positive integer, got {_shown_int(value)}", param=param)
    assert isinstance(width, int) and isinstance(height, int)
    bucket = Bucket(width, height)
    if bucket not in buckets:
        param = pw if all(b.width != width for b in buckets) else ph
        shown = f"{_shown_int(width)}x{_shown_int(height)}"
        raise InvalidRequestError(f"{pw if pw == ph else f'{pw}x{ph}'} {shown} is not a size these engines were "
                                  f"built for; built: {', '.join(map(str, buckets))}", param=param)
    return bucket
