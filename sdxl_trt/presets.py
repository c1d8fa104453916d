"""Model presets: SDXL base / refiner 1.0 at full size and a ``tiny`` SDXL of the same shape.

A preset is a set of diffusers/transformers configs plus a seed: its weights are random (seeded), so it
needs no download. The full-size presets exist for speed measurements (speed does not depend on weight
values); ``tiny`` and ``tiny-refiner`` (and ``tiny-lcm``, tiny with a guidance-embedding UNet) keep SDXL's architecture shape (three UNet levels with the same block
types, two text encoders, text_time micro-conditioning, a four-level KL-f8 VAE, the real CLIP BPE
tokenizer) at widths that build and run on a CPU in seconds. They are the project's embedded default
and test models.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .buckets import SDXL_BUCKETS, Bucket
from .files import process_temp_dir

DATA_DIR = Path(__file__).parent / "data"
TOKENIZER_DIR = DATA_DIR / "tokenizer"

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

_UNET_COMMON: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 128,
    "time_embedding_type": "positional",
    "use_linear_projection": True,
}

SDXL_BASE_UNET = {
    **_UNET_COMMON,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
}

SDXL_REFINER_UNET = {
    **_UNET_COMMON,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
}

SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

_CLIP_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}

SDXL_TEXT_ENCODER = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

SDXL_TEXT_ENCODER_2 = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# tiny: SDXL's shape at toy widths. Context 64 = 32 (encoder 1) + 32 (encoder 2);
# text_time input 6 x 8 + 32 = 80 (refiner: 5 x 8 + 32 = 72).
TINY_UNET = {
    **SDXL_BASE_UNET,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
    "projection_class_embeddings_input_dim": 80,
    "transformer_layers_per_block": [1, 1, 2],
    "sample_size": 64,
}

# tiny-lcm: tiny with a guidance embedding, the shape of LCM-distilled SDXL's UNet (time_cond_proj_dim 256 there):
# it takes timestep_cond, the embedding of guidance_scale - 1, instead of running classifier-free guidance.
TINY_LCM_UNET = {**TINY_UNET, "time_cond_proj_dim": 32}

TINY_REFINER_UNET = {
    **SDXL_REFINER_UNET,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
    "projection_class_embeddings_input_dim": 72,
    "transformer_layers_per_block": 1,
    "layers_per_block": 1,
    "sample_size": 64,
}

TINY_VAE = {
    **SDXL_VAE,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 512,
}

TINY_TEXT_ENCODER = {
    **SDXL_TEXT_ENCODER,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}

TINY_TEXT_ENCODER_2 = {
    **SDXL_TEXT_ENCODER_2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}

TINY_BUCKETS: tuple[Bucket, ...] = (Bucket(256, 256), Bucket(320, 256), Bucket(256, 320), Bucket(384, 192), Bucket(192, 384))
"""The tiny model's sizes: about 64 k pixels, multiples of 64 like SDXL's (the refiner downsamples 3 times)."""


@dataclass(frozen=True)
class Preset:
    """A named model: component configs, the seed of its random weights, its native sizes."""

    name: str
    kind: str  # "base" or "refiner"
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    text_encoder_2: dict[str, Any]
    buckets: tuple[Bucket, ...]
    seed: int = 0
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def model_index(self) -> dict[str, Any]:
        base = self.kind == "base"
        return {
            "_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": base,
            **({} if base else {"requires_aesthetics_score": True}),
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"] if base else [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"] if base else [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }

    def write_config_dir(self, out: Path) -> Path:
        """Write a weightless diffusers-format directory (configs and tokenizers)."""
        out = Path(out)
        files: dict[str, dict[str, Any]] = {
            "model_index.json": self.model_index(),
            "unet/config.json": self.unet,
            "vae/config.json": self.vae,
            "text_encoder_2/config.json": self.text_encoder_2,
            "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
        }
        if self.text_encoder is not None:
            files["text_encoder/config.json"] = self.text_encoder
        for rel, cfg in files.items():
            p = out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(cfg, indent=2))
        tokenizers = {"tokenizer_2": "!"} | ({"tokenizer": "<|endoftext|>"} if self.text_encoder else {})
        for sub, pad in tokenizers.items():
            write_tokenizer_dir(out / sub, pad_token=pad)
        return out

    def config_dir(self) -> Path:
        """This preset's weightless diffusers directory for this process: written once (the first call), into a
        scratch folder removed when the process exits (:func:`sdxl_trt.files.process_temp_dir`). Loads read it
        (tokenizers, scheduler config, the assets a build copies next to its engines); nothing writes into it."""
        with _config_dirs_lock:
            known = _config_dirs.get(self.name)
            if known is not None and known[0] == self and known[1].is_dir():
                return known[1]
            path = self.write_config_dir(process_temp_dir(self.name))
            _config_dirs[self.name] = (self, path)
            return path


_config_dirs: dict[str, tuple[Preset, Path]] = {}
_config_dirs_lock = threading.Lock()


def write_tokenizer_dir(out: Path, *, pad_token: str) -> None:
    """SDXL's tokenizers share CLIP's vocabulary; tokenizer_2 pads with ``!`` instead of EOS."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                    "unk_token": "<|endoftext|>"})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "do_lower_case": True})
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sdxl-base-1.0", "base", SDXL_BASE_UNET, SDXL_VAE, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_BUCKETS),
        Preset("sdxl-refiner-1.0", "refiner", SDXL_REFINER_UNET, SDXL_VAE, None, SDXL_TEXT_ENCODER_2, SDXL_BUCKETS),
        Preset("tiny", "base", TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2, TINY_BUCKETS),
        Preset("tiny-refiner", "refiner", TINY_REFINER_UNET, TINY_VAE, None, TINY_TEXT_ENCODER_2, TINY_BUCKETS, seed=1),
        Preset("tiny-lcm", "base", TINY_LCM_UNET, TINY_VAE, TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2, TINY_BUCKETS, seed=2),
    ]
}


# ControlNet presets: ControlNetModel.from_unet's config of a base preset's UNet, with seeded random weights
# (including the convs diffusers initialises to zero, so a preset ControlNet changes the UNet's output).
_FROM_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type", "addition_embed_type_num_heads",
)


def controlnet_config_from_unet(unet: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The config ``diffusers.ControlNetModel.from_unet`` gives a UNet of this config (as a plain dict, so a
    config can be written and hashed without diffusers), with ``overrides`` applied."""
    cfg: dict[str, Any] = {"_class_name": "ControlNetModel", "conditioning_channels": 3,
                           "controlnet_conditioning_channel_order": "rgb",
                           "conditioning_embedding_out_channels": [16, 32, 96, 256], "global_pool_conditions": False}
    cfg.update({k: copy.deepcopy(unet[k]) for k in _FROM_UNET_KEYS if k in unet})
    cfg.update(overrides)
    return cfg


@dataclass(frozen=True)
class ControlNetPreset:
    """A named ControlNet: a config fitting one base preset plus the seed of its random weights."""

    name: str
    base: str  # the base preset whose UNet it fits
    config: dict[str, Any]
    seed: int = 0


CONTROLNET_PRESETS: dict[str, ControlNetPreset] = {
    p.name: p
    for p in [
        ControlNetPreset("tiny-controlnet", "tiny", controlnet_config_from_unet(TINY_UNET), seed=10),
        # like diffusers' SDXL "small"/"mid" ControlNets: fewer transformer layers and a narrower
        # conditioning embedding, the same residual channels as the UNet it feeds
        ControlNetPreset("tiny-controlnet-small", "tiny", controlnet_config_from_unet(
            TINY_UNET, transformer_layers_per_block=[1, 1, 1], conditioning_embedding_out_channels=[8, 16, 32, 32]),
            seed=11),
        ControlNetPreset("sdxl-controlnet", "sdxl-base-1.0", controlnet_config_from_unet(SDXL_BASE_UNET), seed=12),
    ]
}
