"""What both HTTP APIs add beyond their own fields: LoRAs by name, the few-step timestep controls, and the
names of the samplers the runtime implements.

LoRA names are looked up in the server's ``--lora-dir`` listing only: nothing a client sends becomes a file
path (a name with a path separator or ``..`` is refused before the listing is even read). A name is letters
and digits of any script, ``_``, ``-``, ``.`` and spaces, matched whole (a trailing newline is not a name)
and compared in Unicode NFC; the listing (``GET /sdapi/v1/loras``) shows exactly the files such a name can
use, with each file's kind. A1111 clients put LoRAs in the prompt (``<lora:NAME:WEIGHT>``); the tags are removed from the text before
encoding, as A1111 does, and become the request's LoRA set.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from sdxl_trt.errors import InvalidRequestError

from ..core.pipeline_like import PipelineLike

log = logging.getLogger(__name__)

MAX_LORAS = 8
MAX_ABS_SCALE = 10.0
_NAME = re.compile(r"[^\W][\w. -]{0,127}")  # \w: letters and digits of any script, and _; matched whole
_A1111_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")
_unnameable: set[str] = set()  # listed files whose names no request could use (logged once each)


def is_lora_name(name: object) -> bool:
    """``name`` is a LoRA name a request may send (the whole of it; no paths)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


def available_loras(pipeline: PipelineLike) -> dict[str, Any]:
    """The server's LoRA names -> files (empty without --lora-dir): only
    names a request can send; a file named otherwise is left out (and logged, to be renamed)."""
    listing = dict(pipeline.loras.available())
    for name in [n for n in listing if not is_lora_name(n)]:
        if name not in _unnameable:
            _unnameable.add(name)
            log.warning("LoRA file %r is not listed: requests name LoRAs with letters, digits, '_', '-', '.' and "
                        "spaces only; rename it", listing[name].name)
        del listing[name]
    return listing


def lora_listing(pipeline: PipelineLike) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: A1111's fields (name, alias, file name, metadata) and each file's kind (LoRA,
    LoCon, LoHa, LoKr, DoRA, ...), key layout and, for a kind that is not merged, why; read from the files'
    headers only, naming files by name (never by the server's paths)."""
    from sdxl_trt.lora.layouts import inspect_file

    return [{"name": name, "alias": name, "path": path.name, "metadata": {},
             **inspect_file(path, label=path.name).to_json()}
            for name, path in sorted(available_loras(pipeline).items())]


def lora_set(pairs: Sequence[tuple[str, float]], pipeline: PipelineLike, *, param: str = "loras"
             ) -> tuple[tuple[str, float], ...]:
    """Validated (name, scale) pairs: known names only, finite scales in [-10, 10], at most MAX_LORAS."""
    if len(pairs) > MAX_LORAS:
        raise InvalidRequestError(f"at most {MAX_LORAS} LoRAs per request, got {len(pairs)}", param=param)
    listing: dict[str, Any] | None = None
    out = []
    for name, scale in pairs:
        if isinstance(name, str):
            name = unicodedata.normalize("NFC", name)
        if not is_lora_name(name):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise InvalidRequestError(f"LoRA name {shown} is not a name: use one of GET /sdapi/v1/loras "
                                      "(letters, digits, '_', '-', '.', spaces; no paths)", param=param)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_ABS_SCALE:
            raise InvalidRequestError(f"LoRA {name!r}: scale {scale!r} must be a number in "
                                      f"[-{MAX_ABS_SCALE:g}, {MAX_ABS_SCALE:g}]", param=param)
        if listing is None:
            listing = available_loras(pipeline)
        if name not in listing:
            names = ", ".join(sorted(listing)) or "none (the server was started without --lora-dir)"
            raise InvalidRequestError(f"unknown LoRA {name!r}; available: {names}", param=param)
        out.append((name, float(scale)))
    return tuple(out)


def strip_a1111_loras(prompt: str, *, param: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:NAME:WEIGHT>`` tags taken out of ``prompt`` (weight defaults to 1), in order."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        name, weight = match.group(1).strip(), match.group(2)
        try:
            scale = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise InvalidRequestError(f"<lora:{name}:{weight}> has a weight that is not a number",
                                      param=param) from None
        found.append((name, scale))
        return ""

    return _A1111_TAG.sub(take, prompt), found


def few_step_fields(timestep_spacing: str | None, timesteps: Sequence[int] | None, eta: float | None
                    ) -> dict[str, Any]:
    """The GenerationRequest fields of the few-step controls that were given (validated by the pipeline)."""
    fields: dict[str, Any] = {}
    if timestep_spacing is not None:
        fields["timestep_spacing"] = timestep_spacing
    if timesteps is not None:
        fields["timesteps"] = tuple(timesteps)
    if eta is not None:
        fields["eta"] = eta
    return fields
