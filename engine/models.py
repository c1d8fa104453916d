"""The PyTorch modules a build runs: the base model with ``--lora`` fused (INT8 calibration and torch programs
see the weights the ONNX export saw), and for the torch backend, every module it saves a program of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdxl_trt.contracts import controlnet_component
from sdxl_trt.lora import LoraSpec

from .options import BuildOptions


def load_base(opts: BuildOptions, **kwargs: Any) -> Any:
    """The base model as the engines will hold it: loaded, with ``--lora`` fused."""
    from sdxl_trt.export.loading import load_model
    from sdxl_trt.export.lora_fusion import fuse_loras

    model = load_model(opts.model, config=opts.model_config, device=opts.device, **kwargs)
    fuse_loras(model, [LoraSpec.parse(s) for s in opts.loras])
    return model


@dataclass(frozen=True)
class TorchModels:
    """The torch backend's modules, in fp32 on the build's device."""

    base: Any  # export.loading.LoadedModel, LoRAs fused
    refiner: Any | None
    controlnets: dict[str, Any] = field(default_factory=dict)  # controlnet.NAME -> diffusers ControlNetModel
    deepcache: tuple[int, ...] = ()  # step-caching branches (the UNet returns their features)

    @classmethod
    def load(cls, opts: BuildOptions) -> TorchModels:
        import torch

        from sdxl_trt.export.controlnet import load_controlnet, parse_controlnets
        from sdxl_trt.export.loading import load_model

        base = load_base(opts, dtype=torch.float32)
        ref = load_model(opts.refiner, dtype=torch.float32, device=opts.device) if opts.refiner else None
        controlnets = {controlnet_component(s.name): load_controlnet(s.source, base_unet=dict(base.unet.config),
                                                                      device=opts.device)
                       for s in parse_controlnets(opts.controlnets)}
        return cls(base, ref, controlnets, tuple(opts.deepcache))

    def wrapped(self) -> dict[str, Any]:
        """Each component's module as export/wrappers.py wraps it (plain tensors in the contract's order)."""
        from sdxl_trt.export.wrappers import wrap_components

        return wrap_components(self.base, self.refiner, controlnets=self.controlnets, deepcache=self.deepcache)
