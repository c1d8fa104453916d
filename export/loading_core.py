"""What every way of loading an SDXL model shares: the loaded model, its contract widths, strictness checks.

:class:`LoadedModel` is the one result of every loader (presets, diffusers directories, single files);
:func:`finish` casts, freezes and checks that the modules are SDXL-shaped, so every source fails the same
way on a non-SDXL model. Reading JSON and describing missing/unexpected weights live here because the
diffusers-directory and single-file loaders both report them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ModelDims
from sdxl_trt.errors import ModelLoadError

# Stop transformers/diffusers from ever trying the network: every file we read is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Weights that checkpoints may carry but models rebuild themselves (non-persistent buffers).
IGNORABLE = re.compile(r"(^|\.)position_ids$")


@dataclass
class LoadedModel:
    """One SDXL model (base or refiner) as PyTorch modules plus what describes it."""

    name: str
    kind: str  # "base" or "refiner"
    source: dict[str, Any]
    identity_hash: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module
    config_dir: Path  # diffusers-format configs + tokenizers (no weights): copied next to engines
    options: dict[str, Any] = field(default_factory=dict)  # force_zeros_for_empty_prompt, ...

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"unet": self.unet, "vae": self.vae, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        return out


def model_dims(base: LoadedModel, refiner: LoadedModel | None = None) -> ModelDims:
    """The contract widths of a base model (and optionally its refiner), read from their configs."""
    if base.kind != "base" or base.text_encoder is None:
        raise ModelLoadError(
            f"{base.name!r} is an SDXL refiner (it has no text_encoder); --model needs an SDXL base model "
            "(pass the refiner as --refiner)"
        )
    te1, te2, unet = base.text_encoder.config, base.text_encoder_2.config, base.unet.config
    pooled = int(te2.projection_dim)
    dims: dict[str, Any] = dict(
        text_hidden_1=int(te1.hidden_size),
        text_hidden_2=int(te2.hidden_size),
        pooled_dim=pooled,
        unet_context=int(unet.cross_attention_dim),
        unet_time_ids=_time_id_count(unet, pooled, base.name),
        latent_channels=int(base.vae.config.latent_channels),
        unet_downsamples=len(unet.block_out_channels) - 1,
        refiner_downsamples=0,
        unet_time_cond_dim=int(getattr(unet, "time_cond_proj_dim", None) or 0),  # guidance-distilled: timestep_cond
    )
    if refiner is not None:
        if refiner.kind != "refiner":
            raise ModelLoadError(
                f"{refiner.name!r} is an SDXL base model (it has text_encoder), not a refiner; pass it as --model"
            )
        r = refiner.unet.config
        rpooled = int(refiner.text_encoder_2.config.projection_dim)
        dims.update(
            refiner_context=int(r.cross_attention_dim),
            refiner_time_ids=_time_id_count(r, rpooled, refiner.name),
            refiner_pooled_dim=rpooled,
            refiner_downsamples=len(r.block_out_channels) - 1,
        )
    return ModelDims(**dims)


def _time_id_count(unet_config: Any, pooled: int, name: str) -> int:
    total = unet_config.projection_class_embeddings_input_dim
    per = unet_config.addition_time_embed_dim
    if unet_config.addition_embed_type != "text_time" or not per or total is None or (total - pooled) % per:
        raise ModelLoadError(
            f"{name}: UNet is not SDXL-conditioned (addition_embed_type={unet_config.addition_embed_type!r}, "
            f"projection_class_embeddings_input_dim={total}, pooled {pooled}, addition_time_embed_dim={per})"
        )
    return (total - pooled) // per


@contextlib.contextmanager
def default_dtype_device(dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Create parameters directly in the target dtype and device (20 s saved per full UNet on a GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def pipeline_options(model_index: dict[str, Any]) -> dict[str, Any]:
    """The pipeline-level switches of ``model_index.json`` that the runtime honours."""
    return {
        "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(model_index.get("requires_aesthetics_score", False)),
    }


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def describe_key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} weights of another shape ({some(mismatched)})")
    if missing:
        parts.append(f"{len(missing)} weights missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weights the config has no place for ({some(unexpected)})")
    return "; ".join(parts)


def shape_text(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def finish(model: LoadedModel, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Check the model is SDXL-shaped, then cast, place and freeze every module (the end of every loader)."""
    _check_sdxl_shape(model)
    for m in model.modules().values():
        p = next(m.parameters())
        if p.dtype != dtype or p.device != torch.device(device):
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return model


def _check_sdxl_shape(model: LoadedModel) -> None:
    """Catch a model that loads but is not SDXL-shaped (an SD 1.x UNet, mixed-up encoders, an
    inpainting UNet) here, naming the config, rather than as a shape error deep in export."""
    unet, vae, te2 = model.unet.config, model.vae.config, model.text_encoder_2.config
    where = f"{model.name} ({model.config_dir / 'unet' / 'config.json'})"
    widths = [int(te2.hidden_size)]
    if model.text_encoder is not None:
        widths.insert(0, int(model.text_encoder.config.hidden_size))
    context = unet.cross_attention_dim
    contexts = set(context) if isinstance(context, (list, tuple)) else {context}
    if contexts != {sum(widths)}:
        raise ModelLoadError(
            f"{where}: UNet cross_attention_dim {context} is not the text encoders' hidden sizes "
            f"{' + '.join(map(str, widths))} = {sum(widths)}; the configs do not describe one SDXL {model.kind}"
        )
    _time_id_count(unet, int(te2.projection_dim), where)
    if unet.in_channels != vae.latent_channels:
        raise ModelLoadError(
            f"{where}: UNet in_channels {unet.in_channels} != VAE latent_channels {vae.latent_channels} "
            "(inpainting UNets with 9 input channels are not supported)"
        )
