"""LoRA on the ground floor: what build (export/, engine/) and a runtime both need, and nothing of either.

* :mod:`.canonical`: the canonical LoRA (``{component: {parameter name: up/down factors}}``), deltas as plain
  tensor math, fusing into PyTorch modules, the identity of a model with LoRAs fused;
* :mod:`.reading`: LoRA files (diffusers/peft and kohya) into the canonical form, through diffusers' key
  conversion, refusing anything that would apply only in part;
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
    LoraFactors,
    LoraSpec,
    fuse_into_modules,
    identity_with_loras,
    lora_weight_shapes,
    merged_weights,
)

__all__ = ["LORA_COMPONENTS", "FusedLora", "Lora", "LoraError", "LoraFactors", "LoraSpec", "fuse_into_modules",
           "identity_with_loras", "lora_weight_shapes", "merged_weights"]
