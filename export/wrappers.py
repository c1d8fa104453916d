"""Wrap each PyTorch component so its forward takes and returns plain tensors in the contract's order.

These are what gets traced to ONNX (and saved with torch.export for the torch backend), so they hold no
Python-side branching on values: only tensor math.
"""

from __future__ import annotations

import torch
from torch import nn

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
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


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


def wrap_components(base: LoadedModel, refiner: LoadedModel | None = None) -> dict[str, nn.Module]:
    """The contract's components of a model (and its refiner), wrapped for tracing."""
    assert base.text_encoder is not None
    out: dict[str, nn.Module] = {
        "text_encoder": TextEncoderWrapper(base.text_encoder),
        "text_encoder_2": TextEncoder2Wrapper(base.text_encoder_2),
        "unet": UNetWrapper(base.unet),
        "vae_decoder": VaeDecoderWrapper(base.vae),
        "vae_encoder": VaeEncoderWrapper(base.vae),
    }
    if refiner is not None:
        out["refiner"] = UNetWrapper(refiner.unet)
    return {k: v.eval() for k, v in out.items()}
