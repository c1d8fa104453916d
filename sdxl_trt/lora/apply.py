"""New engine weights for a LoRA set, in each engine's own names and layouts (through the weight map).

For a runtime switch: from the *base* weights the caller keeps (never from weights that already hold a
LoRA), the LoRAs' deltas give ``base + sum(scale * delta)`` for each touched PyTorch weight; the weight map
says which ONNX initializer (= TensorRT refit weight) or ``torch.export`` parameter that is and whether it is
stored transposed. A LoRA that touches a weight the engine does not hold as its own initializer is refused
(it would be lost); weights no output depends on are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from .canonical import Lora, LoraError, merged_weights
from .weight_map import ComponentWeights


def base_weights_from_onnx(cw: ComponentWeights, initializers: Mapping[str, torch.Tensor],
                           names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The base PyTorch weights ``names`` (torch layout) read back from an engine's ONNX initializers."""
    out = {}
    for name in names:
        loc = cw.weights[name]
        if loc.onnx is None:
            continue
        t = initializers[loc.onnx]
        out[name] = t.T if loc.onnx_transposed else t
    return out


def onnx_weight_updates(cw: ComponentWeights, component: str, base: Mapping[str, torch.Tensor],
                        loras: Sequence[tuple[Lora, float]]) -> dict[str, torch.Tensor]:
    """``{ONNX initializer name: new value in the initializer's layout}`` for ``component``; ``base`` holds the
    touched weights in torch layout (:func:`base_weights_from_onnx`)."""
    touched = sorted({n for lora, _ in loras for n in lora.layers.get(component, {})})
    missing = [n for n in touched if n not in cw.weights]
    lost = [n for n in touched if n in cw.weights and cw.weights[n].onnx is None and not cw.weights[n].unused]
    if missing or lost:
        names = ", ".join((missing + lost)[:3])
        raise LoraError(f"{component}: the engine holds no weight of its own for {len(missing) + len(lost)} layers "
                        f"the LoRAs change ({names}); fuse these LoRAs at build time (sdxl-trt build --lora)")
    used = {n for n in touched if not cw.weights[n].unused}
    new = merged_weights({n: base[n] for n in used}, component,
                         [(_only(lora, component, used), s) for lora, s in loras])
    out = {}
    for name, value in new.items():
        loc = cw.weights[name]
        assert loc.onnx is not None
        out[loc.onnx] = value.T.contiguous() if loc.onnx_transposed else value
    return out


def _only(lora: Lora, component: str, names: set[str]) -> Lora:
    """``lora`` restricted to ``names`` of ``component`` (skipping weights the engine does not use)."""
    layers = {component: {n: f for n, f in lora.layers.get(component, {}).items() if n in names}}
    return replace(lora, layers=layers)
