"""Diffusers-format directories: check their layout, then load each component strictly.

A diffusers directory (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``,
``scheduler/``) is read with the libraries' own ``from_pretrained``, but a weight the config expects and
the files lack (or the reverse) is refused instead of being left random with a warning. The config-only
check (:func:`check_config_dir`) is also what single files use for ``--model-config``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.errors import ModelLoadError
from sdxl_trt.identity import hash_model_files

from .loading_core import (
    IGNORABLE,
    SINGLE_FILE_SUFFIXES,
    LoadedModel,
    describe_key_problems,
    finish,
    pipeline_options,
    read_json,
)

log = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = {
    "base": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "refiner": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}


def _kind_from_index(index: dict[str, Any]) -> str:
    te = index.get("text_encoder")
    return "base" if isinstance(te, list) and te and te[0] is not None else "refiner"


def _read_index(path: Path, what: str) -> dict[str, Any]:
    if not (path / "model_index.json").is_file():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)
        hint = f"; to load the single file inside, pass {path / files[0]}" if len(files) == 1 else ""
        raise ModelLoadError(
            f"{path} is not {what}: it has no model_index.json (expected model_index.json, unet/, vae/, "
            f"text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/){hint}"
        )
    return read_json(path / "model_index.json")


def _missing_subfolders(path: Path, kind: str) -> None:
    missing = [s for s in REQUIRED_SUBFOLDERS[kind] if not (path / s).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is not a complete diffusers SDXL {kind} directory: missing {', '.join(s + '/' for s in missing)}"
        )


def check_diffusers_dir(path: Path) -> tuple[str, dict[str, Any]]:
    """Validate a diffusers-format SDXL directory; returns (kind, model_index)."""
    path = Path(path)
    index = _read_index(path, "a diffusers-format model directory")
    kind = _kind_from_index(index)
    _missing_subfolders(path, kind)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (path / sub).is_dir():
            read_json(path / sub / "config.json")
            if not _weight_files(path / sub):
                raise ModelLoadError(f"{path / sub} has a config but no weights (*.safetensors or *.bin)")
    return kind, index


def check_config_dir(path: Path, *, require_tokenizers: bool = False) -> tuple[str, dict[str, Any]]:
    """A weightless diffusers-format directory: model_index.json plus each component's config;
    returns (kind, model_index). With ``require_tokenizers``, also the tokenizer and scheduler folders
    the runtime reads."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"config {path} is not a directory: it must be a diffusers-format directory "
            "(model_index.json, unet/config.json, vae/config.json, ...)"
        )
    index = _read_index(path, "a diffusers-format config directory")
    kind = _kind_from_index(index)
    if require_tokenizers:
        _missing_subfolders(path, kind)
    for sub in ("unet", "vae", "text_encoder_2") + (("text_encoder",) if kind == "base" else ()):
        read_json(path / sub / "config.json")
    return kind, index


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


_PLAIN_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
_VARIANT_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model)\.(\w+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")


def _weights_variant(folder: Path) -> str | None:
    """``fp16`` when a folder holds only ``*.fp16.safetensors`` weights (as many SDXL downloads do)."""
    names = [p.name for p in _weight_files(folder)]
    if any(_PLAIN_WEIGHTS.match(n) for n in names):
        return None
    variants = {m.group(1) for n in names if (m := _VARIANT_WEIGHTS.match(n))}
    return variants.pop() if len(variants) == 1 else None


def load_diffusers_dir(path: Path, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind, index = check_diffusers_dir(path)
    log.info("loading diffusers SDXL %s from %s", kind, path)

    def load(cls: Any, sub: str) -> Any:
        folder = path / sub
        variant = _weights_variant(folder)
        try:
            model, info = cls.from_pretrained(
                folder, torch_dtype=dtype, local_files_only=True, output_loading_info=True,
                **({"variant": variant} if variant else {}),
            )
        except Exception as e:  # noqa: BLE001 - the libraries raise many types; name the folder
            raise ModelLoadError(f"could not load {folder} as {cls.__name__}: {e}") from e
        _check_loading_info(folder, info)
        return model.to(device)

    model = LoadedModel(
        name=str(path),
        kind=kind,
        source={"type": "diffusers", "path": str(path.resolve())},
        identity_hash=hash_model_files(path),
        unet=load(UNet2DConditionModel, "unet"),
        vae=load(AutoencoderKL, "vae"),
        text_encoder=load(CLIPTextModel, "text_encoder") if kind == "base" else None,
        text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"),
        config_dir=path,
        options=pipeline_options(index),
    )
    return finish(model, dtype, device)


def _check_loading_info(folder: Path, info: Mapping[str, Any]) -> None:
    """diffusers and transformers leave missing weights random with a warning; refuse instead."""
    missing = sorted(k for k in info.get("missing_keys") or () if not IGNORABLE.search(k))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not IGNORABLE.search(k))
    mismatched = [str(m) for m in info.get("mismatched_keys") or ()]
    problems = describe_key_problems(missing, unexpected, mismatched)
    if problems:
        raise ModelLoadError(f"the weights in {folder} do not match {folder / 'config.json'}: {problems}")
