"""Wrap each PyTorch component so its forward takes and returns plain tensors in the contract's order.

These are what gets traced to ONNX (and saved with torch.export for the torch backend), so they hold no
Python-side branching on values: only tensor math.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sdxl_trt.contracts import ModelDims, residual_specs, shallow_component

from .controlnet import controlnet_residuals
from .deepcache import FeatureUNetWrapper, ShallowUNetWrapper
from .loading import LoadedModel


class TextEncoderWrapper(nn.Module):
    """CLIP ViT-L/14 -> penultimate hidden states (what SDXL conditions on)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2]


class TextEncoder2Wrapper(nn.Module):
    """OpenCLIP ViT-bigG/14 -> (penultimate hidden states, projected pooled EOS embedding)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class UNetWrapper(nn.Module):
    """SDXL UNet with micro-conditioning as positional inputs (and, for a guidance-distilled UNet, the
    guidance-scale embedding ``timestep_cond`` last, as the contract has it only for such models)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _predict_noise(self.unet, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond)


def _predict_noise(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor,
                   timestep_cond: torch.Tensor | None, residuals: dict[str, object] | None = None) -> torch.Tensor:
    """The SDXL UNet's noise prediction from the contract's inputs (``residuals``: a ControlNet's, as diffusers'
    ``down_block_additional_residuals`` / ``mid_block_additional_residual`` keyword arguments)."""
    return unet(
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=timestep_cond,
        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        return_dict=False,
        **(residuals or {}),
    )[0]


class ResidualUNetWrapper(nn.Module):
    """The base UNet of a ControlNet build: its inputs (``timestep_cond`` for a guidance-distilled UNet) then the
    residuals, positional in the contract's order, passed as ``down_block_additional_residuals`` /
    ``mid_block_additional_residual`` (diffusers adds them in the UNet's dtype).

    ``forward`` takes ``*inputs``, but each instance's class carries the contract's input names as its signature:
    torch.export matches ``dynamic_shapes`` to the forward's parameter names."""

    def __init__(self, unet: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.unet = unet
        self.input_names = list(input_names)
        self.has_time_cond = "timestep_cond" in self.input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        sample, timestep, encoder_hidden_states, text_embeds, time_ids, *rest = inputs
        timestep_cond = rest.pop(0) if self.has_time_cond else None
        *down, mid = rest
        residuals = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        return _predict_noise(self.unet, sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                              timestep_cond, residuals)


class ControlNetWrapper(nn.Module):
    """A diffusers ControlNetModel at scale 1 (no guess mode): its residuals, each multiplied by its column of
    ``conditioning_scale`` (B x R, cast to the residual's dtype). Scale, guess mode's geometric scales and the
    start/end window are all that data, so one engine serves them without branching."""

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            guess_mode=False,
            return_dict=False,
        )
        residuals = (*down, mid)
        return tuple(r * conditioning_scale[:, i].to(r.dtype).view(-1, 1, 1, 1) for i, r in enumerate(residuals))


def residual_unet_wrapper(unet: nn.Module) -> ResidualUNetWrapper:
    """A :class:`ResidualUNetWrapper` whose forward's signature names the contract's inputs."""
    dims = ModelDims(controlnet_residuals=controlnet_residuals(unet.config))
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
             *(["timestep_cond"] if getattr(unet.config, "time_cond_proj_dim", None) else []),
             *(t.name for t in residual_specs(dims))]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *names]]

    def forward(self: ResidualUNetWrapper, *inputs: torch.Tensor) -> torch.Tensor:
        return ResidualUNetWrapper.forward(self, *inputs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cls = type("ResidualUNetWrapper", (ResidualUNetWrapper,), {"forward": forward})
    return cls(unet, names)


class VaeDecoderWrapper(nn.Module):
    """Unscaled latents (already divided by the scaling factor) -> images in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """Images in [-1, 1] -> the latent distribution's (mean, log-variance), stacked on channels.

    Sampling stays outside the graph so the runtime can draw the noise from the request's own
    generator in the same order diffusers does.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.vae.encoder(images)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return h


def wrap_components(base: LoadedModel, refiner: LoadedModel | None = None, *,
                    controlnets: Mapping[str, nn.Module] | None = None, unet_residuals: bool = False,
                    deepcache: Sequence[int] = ()) -> dict[str, nn.Module]:
    """The contract's components of a model (and its refiner), wrapped for tracing. ``controlnets`` (component
    name ``controlnet.NAME`` -> diffusers ControlNetModel) are wrapped too; with them, or ``unet_residuals``,
    the UNet takes the residual inputs. ``deepcache`` (cache branches): the UNet also returns each branch's
    feature and each branch's shallow UNet ``unet_shallow.K`` is wrapped (they share the UNet's modules)."""
    assert base.text_encoder is not None
    controlled = unet_residuals or bool(controlnets)
    if controlled and deepcache:
        raise ValueError("a UNet cannot take ControlNet residuals and return step-caching features at once")
    unet: nn.Module = (residual_unet_wrapper(base.unet) if controlled
                       else FeatureUNetWrapper(base.unet, deepcache) if deepcache else UNetWrapper(base.unet))
    out: dict[str, nn.Module] = {
        "text_encoder": TextEncoderWrapper(base.text_encoder),
        "text_encoder_2": TextEncoder2Wrapper(base.text_encoder_2),
        "unet": unet,
        "vae_decoder": VaeDecoderWrapper(base.vae),
        "vae_encoder": VaeEncoderWrapper(base.vae),
    }
    if refiner is not None:
        out["refiner"] = UNetWrapper(refiner.unet)
    for name, controlnet in (controlnets or {}).items():
        out[name] = ControlNetWrapper(controlnet)
    for k in deepcache:
        out[shallow_component(k)] = ShallowUNetWrapper(base.unet, k)
    return {k: v.eval() for k, v in out.items()}
