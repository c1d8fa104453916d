"""LoRA on the ground floor: what build (export/, engine/) and a runtime both need, and nothing of either.

* :mod:`.canonical`: the canonical LoRA (``{component: {parameter name: layer update}}``), merging as plain
  tensor math, fusing into PyTorch modules, the identity of a model with LoRAs fused;
* :mod:`.kinds`: one layer's update for each kind (LoRA/LoCon, LoHa, LoKr; DoRA on any), merged as A1111
  and ComfyUI merge it;
* :mod:`.reading`: LoRA files (diffusers/peft and kohya/LyCORIS layouts) into the canonical form, through
  diffusers' key conversion, refusing anything that would apply only in part;
* :mod:`.weight_map`: ``weight_map.json``, where each LoRA-able weight lives in each engine;
* :mod:`.apply`: new engine weights (ONNX initializer / TensorRT refit names, their layouts) for a LoRA set,
  from kept base weights, through the weight map.

Imports no stage (tests/test_layers.py checks it); diffusers only inside :func:`.reading.read_lora`.
"""

from .canonical import (
    LORA_COMPONENTS,
    FusedLora,
    Lora,
    LoraError,
    LoraSpec,
    fuse_into_modules,
    identity_with_loras,
    lora_weight_shapes,
    merged_weights,
)
from .kinds import LayerUpdate, LohaFactors, LokrFactors, LoraFactors

__all__ = ["LORA_COMPONENTS", "FusedLora", "LayerUpdate", "LohaFactors", "LokrFactors", "Lora", "LoraError",
           "LoraFactors", "LoraSpec", "fuse_into_modules", "identity_with_loras", "lora_weight_shapes", "merged_weights"]
