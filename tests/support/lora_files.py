"""Tiny LoRA files for tests, written the way real trainers write them, with the deltas they must produce.

Each writer returns the ground truth ``{component: {parameter name: delta}}`` (float64, at scale 1),
computed here from the factors it wrote and its own knowledge of the key layout, never by the code under
test. Key layouts:

* diffusers / peft (``save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B``, text encoders as
  ``text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight``; alpha in the
  ``lora_adapter_metadata`` JSON (``unet.lora_alpha``) or absent (alpha = rank);
* kohya (A1111 / ComfyUI / Civitai): ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` /
  ``alpha``, text encoders as ``lora_te1_text_model_encoder_layers_N_self_attn_q_proj``; SDXL UNet keys in
  the original (sgm) block layout (``input_blocks_4_1_...``) or in diffusers block names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Truth = dict[str, dict[str, torch.Tensor]]


def _factors(shape: tuple[int, ...], rank: int, g: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of ``shape``: conv downs carry the kernel, ups are 1x1."""
    down = torch.randn(rank, *shape[1:], generator=g) * std
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * std
    return down, up


def _delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    out_shape = (up.shape[0], *down.shape[1:])
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(out_shape) * scale


def _te_file_name(param: str) -> str:
    """Module name as LoRA files spell it: with CLIP's ``text_model.`` level, whatever transformers does."""
    module = param.removesuffix(".weight")
    return module if module.startswith("text_model.") else f"text_model.{module}"


def write_diffusers_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                         alpha: float | None = None, seed: int = 0, std: float = 0.2,
                         components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"),
                         only: str | None = None) -> Truth:
    """A peft-keyed LoRA on every Linear/Conv2d weight (``only``: names containing it) of ``components``."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {}
    meta: dict[str, object] = {}
    for comp in components:
        truth[comp] = {}
        for param, shape in shapes[comp].items():
            if only is not None and only not in param:
                continue
            down, up = _factors(shape, rank, g, std)
            module = param.removesuffix(".weight") if comp == "unet" else _te_file_name(param)
            tensors[f"{comp}.{module}.lora_A.weight"] = down
            tensors[f"{comp}.{module}.lora_B.weight"] = up
            truth[comp][param] = _delta(down, up, (alpha if alpha is not None else rank) / rank)
        if alpha is not None:
            meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha})
    metadata = {"format": "pt", **({"lora_adapter_metadata": json.dumps(meta)} if meta else {})}
    save_file(tensors, str(path), metadata=metadata)
    return truth


KOHYA_UNET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                       "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
KOHYA_TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection")


def write_kohya_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                     alpha: float = 2.0, seed: int = 1, std: float = 0.2) -> Truth:
    """A kohya LoRA with diffusers block names (as OneTrainer / ai-toolkit write SDXL), one alpha for all."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for comp, suffixes in (("unet", KOHYA_UNET_SUFFIXES), ("text_encoder", KOHYA_TE_SUFFIXES),
                           ("text_encoder_2", KOHYA_TE_SUFFIXES)):
        for param, shape in shapes[comp].items():
            module = param.removesuffix(".weight")
            if not module.endswith(suffixes):
                continue
            name = prefixes[comp] + (module if comp == "unet" else _te_file_name(param)).replace(".", "_")
            if comp != "unet" and module.endswith("text_projection"):
                name = prefixes[comp] + "text_projection"
            down, up = _factors(shape, rank, g, std)
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
            truth[comp][param] = _delta(down, up, alpha / rank)
    save_file(tensors, str(path))
    return truth


# The tiny UNet (layers_per_block 2; DownBlock2D, CrossAttnDownBlock2D x2) in the original sgm layout,
# worked out by hand from SDXL's block structure: input_blocks 1-2 = down block 0's resnets, 3 its
# downsampler, 4-5 down block 1 (resnet .0, attention .1), 6 its downsampler, 7-8 down block 2; output_blocks
# 0-2 = up block 0, whose third also holds the upsampler (.2).
SGM_TINY = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks_8_1_transformer_blocks_1_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "out_2": "conv_out",
}


def write_kohya_sgm_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                         seed: int = 2, std: float = 0.2) -> Truth:
    """A kohya SDXL LoRA in the sgm block layout (what kohya's sd-scripts write), an alpha per layer."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}}
    for i, (sgm, module) in enumerate(SGM_TINY.items()):
        shape = shapes["unet"][f"{module}.weight"]
        down, up = _factors(shape, rank, g, std)
        alpha = 1.0 + i % 4  # 1..4: per-layer alphas, as kohya defines them
        tensors[f"lora_unet_{sgm}.lora_down.weight"] = down
        tensors[f"lora_unet_{sgm}.lora_up.weight"] = up
        tensors[f"lora_unet_{sgm}.alpha"] = torch.tensor(alpha)
        truth["unet"][f"{module}.weight"] = _delta(down, up, alpha / rank)
    save_file(tensors, str(path))
    return truth


def _write_plain_kohya(path: Path, layers: Mapping[str, tuple[int, int]], rank: int = 4) -> None:
    t = {}
    for name, (o, i) in layers.items():
        t[f"{name}.lora_down.weight"] = torch.randn(rank, i)
        t[f"{name}.lora_up.weight"] = torch.randn(o, rank)
        t[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(t, str(path))


def write_sd15_kohya_lora(path: Path) -> None:
    """An SD 1.5 kohya LoRA's key layout and widths (one text encoder of width 768, 320-wide UNet)."""
    _write_plain_kohya(path, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)})


def write_sd15_unet_only_lora(path: Path) -> None:
    """An SD 1.5 UNet LoRA (no text encoder): its layers name attention blocks SDXL's tiny UNet lacks
    (``down_blocks.0.attentions``) and widths it does not have."""
    _write_plain_kohya(path, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v": (320, 768)})


def write_loha_lora(path: Path) -> None:
    """A LyCORIS LoHa file's keys (hada_w1_a/b, hada_w2_a/b, alpha)."""
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.hada_w1_a": torch.randn(64, 4), f"{n}.hada_w1_b": torch.randn(4, 64),
               f"{n}.hada_w2_a": torch.randn(64, 4), f"{n}.hada_w2_b": torch.randn(4, 64),
               f"{n}.alpha": torch.tensor(4.0)}, str(path))


def write_lokr_lora(path: Path) -> None:
    """A LyCORIS LoKr file's keys (Kronecker factors lokr_w1, lokr_w2_a/b, alpha)."""
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.lokr_w1": torch.randn(8, 8), f"{n}.lokr_w2_a": torch.randn(8, 4),
               f"{n}.lokr_w2_b": torch.randn(4, 8), f"{n}.alpha": torch.tensor(4.0)}, str(path))


def write_peft_dora_lora(path: Path) -> None:
    """A diffusers/peft DoRA file: lora_A/lora_B plus ``lora_magnitude_vector``."""
    n = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{n}.lora_A.weight": torch.randn(4, 64), f"{n}.lora_B.weight": torch.randn(64, 4),
               f"{n}.lora_magnitude_vector": torch.randn(64)}, str(path))


def write_dora_lora(path: Path) -> None:
    """A kohya DoRA file: LoRA factors plus a ``dora_scale`` magnitude per layer."""
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.lora_down.weight": torch.randn(4, 64), f"{n}.lora_up.weight": torch.randn(64, 4),
               f"{n}.alpha": torch.tensor(4.0), f"{n}.dora_scale": torch.randn(1, 64)}, str(path))


def truncate(src: Path, dst: Path, *, keep: float = 0.6) -> None:
    """``src`` cut short, as an interrupted download leaves it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
