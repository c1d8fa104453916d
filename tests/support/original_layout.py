"""Write a diffusers SDXL model in the original Stability single-file layout (the layout of
``sd_xl_base_1.0.safetensors``), so tests can make single-file checkpoints of any config.

This is the inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(diffusers/loaders/single_file_utils.py). The index arithmetic is derived from the component configs
(levels, ``layers_per_block``, which levels have attention or resampling), so it holds for any
SDXL-shaped config, not only the tiny one. Tests check it by round-tripping through diffusers'
converters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."  # base: CLIP ViT-L in the HF transformers layout
OPEN_CLIP_BASE_PREFIX = "conditioner.embedders.1.model."  # base: OpenCLIP ViT-bigG
OPEN_CLIP_REFINER_PREFIX = "conditioner.embedders.0.model."  # refiner: OpenCLIP ViT-bigG alone

StateDict = dict[str, torch.Tensor]

_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _cfg(config: Any) -> Mapping[str, Any]:
    """Accept a diffusers FrozenDict, a plain dict or a transformers config object."""
    return config if isinstance(config, Mapping) else config.to_dict()


def _split(key: str, prefix: str) -> tuple[int, str] | None:
    """``down_blocks.3.resnets.1.conv1.weight`` with prefix ``down_blocks.`` -> (3, ``resnets.1.conv1.weight``)."""
    if not key.startswith(prefix):
        return None
    index, rest = key[len(prefix):].split(".", 1)
    return int(index), rest


def _resnet(rest: str) -> str:
    for new, old in _RESNET_RENAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(f"unknown ResNet parameter {rest!r}")


def _unet_key(key: str, config: Mapping[str, Any]) -> str:
    per = int(config["layers_per_block"])
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[module]}.{leaf}"
    if (hit := _split(key, "down_blocks.")) is not None:
        block, rest = hit
        first = 1 + block * (per + 1)  # input_blocks.0 is conv_in; each level has `per` layers + a downsampler
        kind, j, inner = rest.split(".", 2)
        if kind == "resnets":
            return f"input_blocks.{first + int(j)}.0.{_resnet(inner)}"
        if kind == "attentions":
            return f"input_blocks.{first + int(j)}.1.{inner}"
        if kind == "downsamplers":
            return f"input_blocks.{first + per}.0.op.{inner.removeprefix('conv.')}"
    if (hit := _split(key, "up_blocks.")) is not None:
        block, rest = hit
        first = block * (per + 1)  # decoder levels have one layer more than encoder levels
        kind, j, inner = rest.split(".", 2)
        if kind == "resnets":
            return f"output_blocks.{first + int(j)}.0.{_resnet(inner)}"
        if kind == "attentions":
            return f"output_blocks.{first + int(j)}.1.{inner}"
        if kind == "upsamplers":  # after the last layer's attention (slot 2) or its ResNet (slot 1)
            slot = 2 if up_has_attention[block] else 1
            return f"output_blocks.{first + per}.{slot}.{inner}"
    if key.startswith("mid_block."):
        kind, j, inner = key[len("mid_block."):].split(".", 2)
        if kind == "resnets":
            return f"middle_block.{2 * int(j)}.{_resnet(inner)}"
        if kind == "attentions":
            return f"middle_block.1.{inner}"
    raise KeyError(f"no original-layout name for UNet parameter {key!r}")


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Any) -> StateDict:
    """A diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` keys."""
    cfg = _cfg(config)
    return {UNET_PREFIX + _unet_key(k, cfg): v for k, v in state_dict.items()}


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_mid(rest: str) -> str:
    kind, j, inner = rest.split(".", 2)
    if kind == "resnets":
        return f"mid.block_{int(j) + 1}.{_vae_resnet(inner)}"
    module, _, leaf = inner.rpartition(".")
    return f"mid.attn_1.{_VAE_ATTENTION[module]}.{leaf}"


def _vae_key(key: str, levels: int) -> str:
    module, _, leaf = key.rpartition(".")
    if module in _VAE_TOP_LEVEL:
        return f"{_VAE_TOP_LEVEL[module]}.{leaf}"
    for side in ("encoder", "decoder"):
        if key.startswith(f"{side}.mid_block."):
            return f"{side}.{_vae_mid(key[len(side) + len('.mid_block.'):])}"
    if (hit := _split(key, "encoder.down_blocks.")) is not None:
        block, rest = hit
        if rest.startswith("downsamplers.0."):
            return f"encoder.down.{block}.downsample.{rest[len('downsamplers.0.'):]}"
        return f"encoder.down.{block}.block.{_vae_resnet(rest.removeprefix('resnets.'))}"
    if (hit := _split(key, "decoder.up_blocks.")) is not None:
        block, rest = hit
        level = levels - 1 - block  # the original decoder counts levels from the bottom up
        if rest.startswith("upsamplers.0."):
            return f"decoder.up.{level}.upsample.{rest[len('upsamplers.0.'):]}"
        return f"decoder.up.{level}.block.{_vae_resnet(rest.removeprefix('resnets.'))}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Any) -> StateDict:
    """A diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    levels = len(_cfg(config)["up_block_types"])
    out: StateDict = {}
    for k, v in state_dict.items():
        name = _vae_key(k, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = v
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """``CLIPTextModel`` (text_encoder) -> ``conditioner.embedders.0.transformer.text_model.*``.

    transformers >= 5.6 drops the ``text_model.`` level from ``CLIPTextModel``; checkpoints keep it."""
    return {
        CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """``CLIPTextModelWithProjection`` (text_encoder_2) -> OpenCLIP keys under ``prefix``: q/k/v fused into
    ``in_proj_*``, the projection stored transposed as a bare ``text_projection`` tensor."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        if k in _OPEN_CLIP_TOP_LEVEL:
            out[prefix + _OPEN_CLIP_TOP_LEVEL[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif (hit := _split(k, "text_model.encoder.layers.")) is not None:
            layer, rest = hit
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, leaf), {})[module[len("self_attn."):][0]] = v
            elif module in _OPEN_CLIP_LAYER:
                out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{leaf}"] = v
            else:
                raise KeyError(f"no OpenCLIP name for {k!r}")
        else:
            raise KeyError(f"no OpenCLIP name for {k!r}")
    for (layer, leaf), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def to_original_layout(
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    text_encoder_2: torch.nn.Module,
) -> StateDict:
    """A whole SDXL base (``text_encoder`` given) or refiner (``text_encoder=None``) as one state dict in
    the original single-file layout, ready for ``safetensors.torch.save_file``."""
    out = unet_to_original(unet.state_dict(), unet.config)
    out |= vae_to_original(vae.state_dict(), vae.config)
    if text_encoder is not None:
        out |= clip_to_original(text_encoder.state_dict())
        out |= open_clip_to_original(text_encoder_2.state_dict(), OPEN_CLIP_BASE_PREFIX)
    else:
        out |= open_clip_to_original(text_encoder_2.state_dict(), OPEN_CLIP_REFINER_PREFIX)
    # safetensors refuses tensors that share storage (views); give each its own.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
