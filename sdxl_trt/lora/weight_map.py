"""The weight map: where each PyTorch weight a LoRA can change lives in each engine (``weight_map.json``).

Recorded at export (export/weight_map.py builds it by matching tensors, never by guessing from names) and
saved in the engine directory, so every backend updates the same weights the same way::

    {"format_version": 1,
     "components": {"unet": {
         "onnx_sha256": "...",                       # the ONNX file the names below belong to
         "weights": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": {
             "shape": [64, 64],                      # the PyTorch weight's shape
             "onnx": "onnx::MatMul_5438",            # ONNX initializer (= TensorRT refit weight name), or null
             "onnx_transposed": true,                # the initializer holds the weight transposed ([in, out])
             "onnx_dtype": "float16",                # the initializer's dtype = the plan's refit dtype (typed)
             "torch": "unet.down_blocks.1...to_q.weight",   # parameter of the torch.export program
             "unused": false}}}}}                    # true: no output depends on it (see below)

Consumers: ONNX Runtime initializer overrides and TensorRT refit take ``onnx`` (transposing when
``onnx_transposed``); torch engines update the program's parameter ``torch`` in place. A weight that is
``unused`` changes no output of the engine (the text encoder's last layer: SDXL reads the penultimate
hidden states), so the exporter pruned it and a LoRA's update to it has nothing to change. A weight whose
``onnx`` is null and is not ``unused`` could not be found in the graph (folded into another constant): a
runtime LoRA that touches it must be refused for ONNX-based engines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdxl_trt.errors import ManifestError
from sdxl_trt.files import write_atomic

WEIGHT_MAP_FORMAT = 1


@dataclass(frozen=True)
class WeightLocation:
    """One PyTorch weight in the engines."""

    shape: tuple[int, ...]
    torch: str
    onnx: str | None = None
    onnx_transposed: bool = False
    unused: bool = False
    onnx_dtype: str = "float32"
    """numpy dtype name of the ONNX initializer: what a refit or an initializer override must hand over (an fp16
    file's strongly typed plan stores its weights in fp16; older maps without it are fp32 exports)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightLocation:
        return cls(shape=tuple(data["shape"]), torch=data["torch"], onnx=data.get("onnx"),
                   onnx_transposed=bool(data.get("onnx_transposed", False)), unused=bool(data.get("unused", False)),
                   onnx_dtype=str(data.get("onnx_dtype", "float32")))


@dataclass
class ComponentWeights:
    """The map of one component (one engine)."""

    weights: dict[str, WeightLocation] = field(default_factory=dict)
    onnx_sha256: str | None = None  # None for a torch-only build (no ONNX)

    def unmapped_onnx(self) -> list[str]:
        """Weights that matter but have no ONNX initializer of their own (a runtime LoRA must not touch them)."""
        return sorted(n for n, w in self.weights.items() if w.onnx is None and not w.unused)


@dataclass
class WeightMap:
    components: dict[str, ComponentWeights] = field(default_factory=dict)
    format_version: int = WEIGHT_MAP_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "components": {
            c: {"onnx_sha256": cw.onnx_sha256, "weights": {n: w.to_json() for n, w in cw.weights.items()}}
            for c, cw in self.components.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightMap:
        return cls(format_version=int(data.get("format_version", 0)), components={
            c: ComponentWeights(onnx_sha256=cw.get("onnx_sha256"),
                                weights={n: WeightLocation.from_json(w) for n, w in cw.get("weights", {}).items()})
            for c, cw in data.get("components", {}).items()})

    def save(self, path: Path) -> Path:
        """Atomic write (a crash never leaves half a map that parses)."""
        return write_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> WeightMap:
        try:
            wm = cls.from_json(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ManifestError(f"{path} is missing: the engines were built without a weight map; rebuild them "
                                "with this sdxl-trt to use LoRAs at run time") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is corrupt ({e}); rebuild the engines") from e
        if wm.format_version != WEIGHT_MAP_FORMAT:
            raise ManifestError(f"{path} has format {wm.format_version}, this sdxl-trt reads {WEIGHT_MAP_FORMAT}; "
                                "rebuild the engines")
        return wm
