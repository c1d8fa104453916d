"""Single-file checkpoints in the original Stability layout (``sd_xl_base_1.0.safetensors``).

The file's keys say whether it is a base or a refiner (or not SDXL at all); each component is converted
with diffusers' own key-mapping functions, one at a time from a lazily read file, against the shipped
SDXL 1.0 configs or a config directory the user names, and loaded strictly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.errors import ModelLoadError
from sdxl_trt.identity import hash_model_files
from sdxl_trt.presets import PRESETS

from .loading_core import (
    IGNORABLE,
    LoadedModel,
    default_dtype_device,
    describe_key_problems,
    finish,
    pipeline_options,
    read_json,
    shape_text,
)
from .loading_diffusers import check_config_dir

log = logging.getLogger(__name__)

# Key prefixes of the original Stability single-file layout (sd_xl_base_1.0.safetensors).
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "conditioner.embedders.0.transformer."  # base: CLIP ViT-L, stored in the HF transformers layout
LDM_OPEN_CLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}


class _LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping whose tensors are read when asked for: converting one
    component at a time keeps one component's weights in memory, not the whole 7 GB file."""

    def __init__(self, handle: Any, path: Path) -> None:
        self._handle = handle
        self._path = path
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{self._path}: could not read tensor {key!r}: {e}") from e

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_checkpoint(path: Path, stack: contextlib.ExitStack) -> Mapping[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return _LazyCheckpoint(handle, path)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    try:  # .ckpt: only plain tensors are accepted; weights_only refuses pickled code
        data: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint of plain tensors (truncated or corrupt?): {e}"
        ) from e
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _checkpoint_kind(path: Path, keys: Mapping[str, Any]) -> str:
    """``base`` or ``refiner`` from a single file's keys, or a ModelLoadError saying what the file is."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(LDM_UNET):
        if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
            hint = ("its keys are in the diffusers layout (one component's weights, e.g. "
                    "unet/diffusion_pytorch_model.safetensors): pass the whole diffusers directory instead")
        else:
            sample = ", ".join(sorted({k.split(".")[0] for k in keys})[:5]) or "none"
            hint = f"its top-level key names are: {sample}"
        raise ModelLoadError(
            f"{path} is not an SDXL checkpoint in the original Stability single-file layout "
            f"(no '{LDM_UNET}*' weights); {hint}"
        )
    if has("cond_stage_model."):
        raise ModelLoadError(
            f"{path} is a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model.* text encoder), not SDXL"
        )
    if has(LDM_CLIP) and has(LDM_OPEN_CLIP["base"]):
        kind = "base"
    elif has(LDM_OPEN_CLIP["refiner"]) and not has("conditioner.embedders.1."):
        kind = "refiner"
    else:
        raise ModelLoadError(
            f"{path} has a UNet but not SDXL's text encoders: expected {LDM_CLIP}* and {LDM_OPEN_CLIP['base']}* "
            f"(base) or {LDM_OPEN_CLIP['refiner']}* alone (refiner)"
        )
    if not has(LDM_VAE):
        raise ModelLoadError(f"{path} has no VAE weights ({LDM_VAE}*); SDXL single files carry their VAE")
    return kind


def load_single_file(
    path: Path, *, dtype: torch.dtype, device: str | torch.device, config: str | Path | None
) -> LoadedModel:
    """Convert with diffusers' own key-mapping functions, one component at a time, loading strictly.

    Not ``StableDiffusionXLPipeline.from_single_file``: it picks each text encoder's weights by
    comparing embedding widths, so when both encoders have the same width (the tiny preset, custom
    configs) text_encoder_2 silently gets text_encoder's weights; and without accelerate it loads with
    ``strict=False``, leaving any weight the file lacks at its random initial value."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with contextlib.ExitStack() as stack:
        ckpt = _open_checkpoint(path, stack)
        kind = _checkpoint_kind(path, ckpt)
        if config is None:
            preset = PRESETS["sdxl-base-1.0" if kind == "base" else "sdxl-refiner-1.0"]
            config_dir = preset.config_dir()
            hint = ("(for a checkpoint of another shape pass config= / --model-config, a diffusers-format "
                    "directory whose configs describe it)")

            def config_name(sub: str) -> str:
                return f"the shipped {preset.name} {sub} config"
        else:
            config_dir = Path(config).expanduser()
            config_kind, _ = check_config_dir(config_dir, require_tokenizers=True)
            if config_kind != kind:
                raise ModelLoadError(
                    f"{path} is an SDXL {kind} checkpoint but the configs in {config_dir} describe an SDXL "
                    f"{config_kind} (model_index.json)"
                )
            hint = ""

            def config_name(sub: str) -> str:
                return str(config_dir / sub / "config.json")
        log.info("converting single-file SDXL %s %s with configs from %s", kind, path, config_dir)

        def component(sub: str, build: Callable[[dict[str, Any]], torch.nn.Module],
                      convert: Callable[[torch.nn.Module, dict[str, Any]], dict[str, torch.Tensor]]) -> torch.nn.Module:
            cfg_file = config_dir / sub / "config.json"
            cfg = read_json(cfg_file)
            try:  # a weightless skeleton first: a mismatch is reported before minutes of random init
                with torch.device("meta"):
                    skeleton = build(cfg)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"{cfg_file} is not a valid config for the SDXL {sub}: {e}") from e
            try:
                weights = {k: v for k, v in convert(skeleton, cfg).items() if v is not None}
            except ModelLoadError:
                raise
            except Exception as e:  # noqa: BLE001 - the converters index keys the config implies
                raise ModelLoadError(
                    f"{path}: could not map its {sub} weights to {config_name(sub)}: {type(e).__name__} {e} {hint}"
                ) from e
            _check_weights(skeleton.state_dict(), weights,
                           what=f"{path}: its {sub} weights do not match {config_name(sub)}", hint=hint)
            with default_dtype_device(dtype, device):
                module = build(cfg)
            module.load_state_dict({k: weights[k] for k in module.state_dict()}, strict=True)
            return module

        def text_model_keys(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """transformers >= 5.6 drops CLIPTextModel's ``text_model.`` level; checkpoints keep it."""
            if any(k.startswith("text_model.") for k in module.state_dict()):
                return weights
            return {k.removeprefix("text_model."): v for k, v in weights.items()}

        unet = component("unet", UNet2DConditionModel.from_config,
                         lambda m, cfg: convert_ldm_unet_checkpoint(ckpt, cfg))
        vae = component("vae", AutoencoderKL.from_config, lambda m, cfg: convert_ldm_vae_checkpoint(ckpt, cfg))
        te1 = None
        if kind == "base":
            te1 = component(
                "text_encoder", lambda cfg: CLIPTextModel(CLIPTextConfig(**cfg)),
                lambda m, cfg: text_model_keys(
                    m, convert_ldm_clip_checkpoint({k: ckpt[k] for k in ckpt if k.startswith(LDM_CLIP)})
                ),
            )
        prefix = LDM_OPEN_CLIP[kind]
        te2 = component(
            "text_encoder_2", lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
            lambda m, cfg: text_model_keys(m, convert_open_clip_checkpoint(
                m, {k: ckpt[k] for k in ckpt if k.startswith(prefix)}, prefix=prefix)),
        )
    model = LoadedModel(
        name=str(path),
        kind=kind,
        source={"type": "single_file", "path": str(path.resolve()), "config": str(config_dir)},
        identity_hash=hash_model_files(path),
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        config_dir=config_dir,
        options=pipeline_options(read_json(config_dir / "model_index.json")),
    )
    return finish(model, dtype, device)


def _check_weights(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *, what: str,
                   hint: str) -> None:
    """Every parameter and buffer the config implies must come from the file, at its shape, and every
    weight in the file must have a place."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not IGNORABLE.search(k))
    mismatched = [
        f"{k}: {shape_text(weights[k])} in the file, {shape_text(v)} in the config"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = describe_key_problems(missing, unexpected, mismatched)
    if problems:
        raise ModelLoadError(f"{what}: {problems} {hint}".rstrip())
