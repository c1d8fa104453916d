"""Fuse LoRAs into a loaded model before export (and before INT8 calibration): ``sdxl-trt build --lora PATH[:SCALE]``.

Every file is read and checked against the model before any weight changes, so a bad file leaves the
model as loaded. The identity of the fused model (what decides whether exported files and engines are
stale) is the model's identity plus each file's SHA-256 and scale, in order: another LoRA, another scale
or another order re-exports; no LoRA leaves the identity exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sdxl_trt.identity import file_sha256
from sdxl_trt.lora import (
    FusedLora,
    LoraError,
    LoraSpec,
    fuse_into_modules,
    identity_with_loras,
    lora_weight_shapes,
)
from sdxl_trt.lora.reading import read_lora

from .loading import LoadedModel
from .weight_map import lora_modules

log = logging.getLogger(__name__)


def fused_identity(identity: str, specs: Sequence[LoraSpec]) -> str:
    """The identity of a model with ``specs`` fused, computed from the files without loading anything."""
    return identity_with_loras(identity, [(file_sha256(s.path), s.scale) for s in specs])


def fuse_loras(model: LoadedModel, specs: Sequence[LoraSpec]) -> list[dict[str, Any]]:
    """Merge ``specs`` (LoRA, LoCon, LoHa, LoKr, DoRA files) into ``model``'s UNet and text encoders in place,
    one after another in the given order; returns what the manifest records (path, SHA-256, key layout, kind,
    layers per component, scale) for each."""
    if not specs:
        return []
    if model.kind != "base":
        raise LoraError(f"{model.name} is an SDXL refiner: --lora applies to the base model (--model)")
    modules = lora_modules(model)
    shapes = lora_weight_shapes(modules)
    loras = [(read_lora(s.path, targets=shapes, unet_config=model.unet.config), s.scale) for s in specs]
    changed = fuse_into_modules(modules, loras)
    for lora, scale in loras:
        log.info("fused %s %s at scale %g (%d layers)", lora.kind, lora.path, scale, lora.num_layers)
    log.info("LoRAs changed %d weights of %s", changed, model.name)
    return [FusedLora(lora, scale).to_json() for lora, scale in loras]
