"""The canonical LoRA: ``{component: {PyTorch parameter name: low-rank factors}}``, whatever file it came from.

A LoRA file (diffusers/peft or kohya/LyCORIS keys; LoRA, LoCon, LoHa, LoKr, DoRA: :mod:`.kinds`) is read once
(:mod:`.reading`) into this form, checked against the model it will change; everything after that only sees
parameter names and layer updates:

* build (export/) fuses the deltas into the PyTorch modules before export and calibration;
* a runtime can later compute the same deltas and write ``base + delta`` into an engine's weights in place,
  through the weight map (:mod:`.weight_map`) that says where each parameter lives in each engine.

Deltas are always computed from the factors and added to the *base* weights the caller keeps, never to
weights that already hold another LoRA (A -> B -> A must give A's weights, not a blend).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.errors import SdxlTrtError

from .kinds import LayerUpdate

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""The components a SDXL LoRA can change (the base model's; a refiner has its own UNet)."""

MAX_ABS_SCALE = 10.0


class LoraError(SdxlTrtError):
    """A LoRA file or ``PATH[:SCALE]`` argument that cannot be applied; the message names the file and why."""


@dataclass(frozen=True)
class Lora:
    """A LoRA file read and checked against one model: every layer it changes, by parameter name."""

    path: str
    sha256: str
    format: str  # the key layout: "diffusers" (peft / diffusers keys) or "kohya" (lora_unet_*, lora_te1_*, ...)
    layers: Mapping[str, Mapping[str, LayerUpdate]] = field(repr=False)  # component -> parameter name -> update
    kind: str = "LoRA"  # LoRA, LoCon, LoHa, LoKr, DoRA (LoRA/LoCon with magnitudes), LoHa+DoRA, ... (file_kind)

    @property
    def num_layers(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the file (the factors themselves stay in the file)."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "kind": self.kind,
                "layers": {c: len(v) for c, v in self.layers.items() if v}}


@dataclass(frozen=True)
class LoraSpec:
    """``PATH[:SCALE]`` as given on the command line."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``style.safetensors``, ``style.safetensors:0.8``; a path that itself holds a colon is kept whole
        unless what follows the last colon is a number."""
        path, sep, tail = text.rpartition(":")
        scale = 1.0
        if sep and path:
            try:
                scale = float(tail)
            except ValueError:
                path = text
        else:
            path = text
        spec = cls(Path(path).expanduser(), scale)
        spec.check_scale_and_file()
        return spec

    def check_scale_and_file(self) -> None:
        """The scale is a finite number within bounds and the file exists (before anything reads it)."""
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_ABS_SCALE:
            raise LoraError(f"LoRA {self.path}: scale {self.scale} is not a number in "
                            f"[-{MAX_ABS_SCALE:g}, {MAX_ABS_SCALE:g}] (write PATH:SCALE, e.g. {self.path}:0.8)")
        if not self.path.is_file():
            raise LoraError(f"LoRA file {self.path} does not exist (pass --lora PATH[:SCALE] with a .safetensors file)")

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass
class FusedLora:
    """One LoRA fused into a model, as the manifest records it."""

    lora: Lora
    scale: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.lora.describe(), "scale": self.scale, **self.extra}


def lora_weight_shapes(modules: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every weight a LoRA can change, per component: the weights of its Linear and Conv2d layers
    (attention q/k/v/out, feed-forward, proj_in/out, resnet and sampler convs, time/add embeddings,
    text projections). Keyed by ``named_parameters`` names, as the canonical LoRA and the weight map are."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for component, module in modules.items():
        shapes: dict[str, tuple[int, ...]] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes[f"{name}.weight" if name else "weight"] = tuple(sub.weight.shape)
        out[component] = shapes
    return out


def merged_weights(base: Mapping[str, torch.Tensor], component: str,
                   loras: Sequence[tuple[Lora, float]]) -> dict[str, torch.Tensor]:
    """Every parameter of ``component`` that the LoRAs touch, with each LoRA merged at its scale in the given
    order (:meth:`~.kinds.LayerUpdate.apply`: ``+ scale * delta``; DoRA renormalises what it is applied to,
    so order matters only with DoRA, as in A1111 and ComfyUI), formed in fp32 and returned in each base
    weight's dtype and device. ``base`` must hold the weights without any LoRA: this is how a switch avoids
    delta-on-delta drift."""
    touched = dict.fromkeys(n for lora, _ in loras for n in lora.layers.get(component, {}))
    out = {}
    for name in touched:
        w = base[name].to(torch.float32, copy=True)  # never in place on the kept base
        for lora, scale in loras:
            update = lora.layers.get(component, {}).get(name)
            if update is not None:
                w = update.apply(w, scale)
        out[name] = w.to(base[name].dtype)
    return out


def fuse_into_modules(modules: Mapping[str, torch.nn.Module], loras: Sequence[tuple[Lora, float]]) -> int:
    """Add the LoRAs' deltas to the modules' parameters in place (build-time fusion); returns how many
    parameters changed. Every name was checked against these modules when the file was read."""
    changed = 0
    with torch.no_grad():
        for component, module in modules.items():
            params = dict(module.named_parameters())
            touched = {n for lora, _ in loras for n in lora.layers.get(component, {})}
            if not touched:
                continue
            new = merged_weights({n: params[n].detach() for n in touched}, component, loras)
            for name, value in new.items():
                params[name].copy_(value)
            changed += len(new)
    return changed


def lora_set_hash(loras: Iterable[tuple[str, float]]) -> str:
    """One hash for an ordered set of (file SHA-256, scale): what a model identity adds when LoRAs are fused."""
    payload = [[sha, float(scale)] for sha, scale in loras]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def identity_with_loras(identity: str, loras: Iterable[tuple[str, float]]) -> str:
    """The identity of a model with LoRAs fused; the model's own identity when there are none (engines built
    before LoRAs existed stay up to date)."""
    items = list(loras)
    if not items:
        return identity
    return hashlib.sha256(f"{identity}+lora:{lora_set_hash(items)}".encode()).hexdigest()
