"""Presets: an SDXL model built from the configs the project ships, with seeded random weights.

Nothing is downloaded. Each component draws its weights from its own seed in float32 on the target
device, so adding a component never changes another's weights and a half-precision load is the fp32
model rounded.
"""

from __future__ import annotations

import logging

import torch

from sdxl_trt.identity import preset_identity_hash
from sdxl_trt.presets import Preset

from .loading_core import LoadedModel, default_dtype_device, finish, pipeline_options

log = logging.getLogger(__name__)


def load_preset(preset: Preset, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    log.info("creating preset %s with seeded random weights (seed %d)", preset.name, preset.seed)
    config_dir = preset.config_dir()
    # Each component gets its own seed so that adding one never changes another's weights. The weights
    # are drawn in float32 whatever ``dtype`` is, then cast (in finish): a bf16/fp16 load is the fp32
    # model rounded, so half-precision engines can be checked against it. (Drawn on ``device``: CUDA's
    # generator gives other numbers than the CPU's, so a preset on a GPU is not the CPU one.)
    with default_dtype_device(torch.float32, device):
        torch.manual_seed(preset.seed * 100 + 1)
        unet = UNet2DConditionModel.from_config(preset.unet)
        # SDXL's refiner ships the base's VAE too: a seed shared by all presets of one VAE config.
        torch.manual_seed(2)
        vae = AutoencoderKL.from_config(preset.vae)
        te1 = None
        if preset.text_encoder is not None:
            torch.manual_seed(preset.seed * 100 + 3)
            te1 = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        # SDXL's refiner ships the base's OpenCLIP encoder unchanged; one seed for both keeps that true.
        torch.manual_seed(4)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    return finish(
        LoadedModel(
            name=preset.name,
            kind=preset.kind,
            source={"type": "preset", "name": preset.name, "seed": preset.seed},
            identity_hash=preset_identity_hash(preset),
            unet=unet,
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            config_dir=config_dir,
            options=pipeline_options(preset.model_index()),
        ),
        dtype,
        device,
    )
