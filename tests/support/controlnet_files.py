"""ControlNet files for tests: the presets written as diffusers directories and single files, and ControlNets
that do not fit the tiny base (another cross-attention width; an SD 1.5-style one without text_time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdxl_trt.presets import CONTROLNET_PRESETS, TINY_UNET, controlnet_config_from_unet


def load_tiny_controlnet(name_or_path: str | Path) -> Any:
    """The PyTorch ``diffusers.ControlNetModel`` of a preset or a written directory/file (fp32, CPU): the same
    weights the engines were built from, for diffusers' ControlNet pipelines."""
    from sdxl_trt.export.controlnet import load_controlnet

    return load_controlnet(str(name_or_path), base_unet=dict(TINY_UNET))


def write_controlnet_dir(preset: str, out: Path) -> Path:
    """A diffusers-format directory (config.json + diffusion_pytorch_model.safetensors) of a preset's weights."""
    load_tiny_controlnet(preset).save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def write_controlnet_file(preset: str, out: Path, *, with_config: bool) -> Path:
    """A single ``.safetensors`` file of a preset's weights, in its own directory ``out``; ``with_config``: the
    diffusers config.json beside it."""
    d = write_controlnet_dir(preset, out)
    f = d / f"{preset}.safetensors"
    (d / "diffusion_pytorch_model.safetensors").rename(f)
    if not with_config:
        (d / "config.json").unlink()
    return f


def mismatched_config(kind: str) -> dict[str, Any]:
    """``cross_attention``: tiny widths with cross_attention_dim 1024 (another base's context); ``sd15``: an SD
    1.5-style ControlNet (no addition_embed_type, no micro-conditioning)."""
    if kind == "cross_attention":
        return controlnet_config_from_unet(TINY_UNET, cross_attention_dim=1024)
    if kind == "sd15":
        return controlnet_config_from_unet(TINY_UNET, cross_attention_dim=32, addition_embed_type=None,
                                           addition_time_embed_dim=None, projection_class_embeddings_input_dim=None,
                                           transformer_layers_per_block=1)
    raise ValueError(f"unknown mismatch {kind!r}; expected cross_attention or sd15")


def write_mismatched_dir(kind: str, out: Path) -> Path:
    """A diffusers-format directory of a ControlNet that does not fit tiny (random weights of its own config)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    model = ControlNetModel.from_config(mismatched_config(kind))
    model.save_pretrained(str(out), safe_serialization=True)
    json.loads((Path(out) / "config.json").read_text())  # written and readable
    return Path(out)


__all__ = ["CONTROLNET_PRESETS", "load_tiny_controlnet", "mismatched_config", "write_controlnet_dir",
           "write_controlnet_file", "write_mismatched_dir"]
