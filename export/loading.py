"""Load an SDXL model's PyTorch components: a preset, a diffusers-format directory or a single file.

Nothing is fetched from a hub: presets are built from the configs the project ships (seeded random
weights), diffusers directories and single files are read from the local path the user gives, and a
single file's configs come from the project (SDXL 1.0) or a local directory the user names. Every
failure is a ``ModelLoadError`` that names the path, file or weight that is missing or malformed.

Loading is strict: a weight the config expects but the files lack, or a weight the files have but the
config does not describe, is an error. (The libraries only warn and leave such weights random.)

This module only dispatches; each source has its own module:

- :mod:`.loading_core`: :class:`LoadedModel`, :func:`model_dims` and the checks every source shares;
- :mod:`.loading_presets`: presets with seeded random weights;
- :mod:`.loading_diffusers`: diffusers-format directories (and config-only directories);
- :mod:`.loading_single_file`: single-file checkpoints in the original Stability layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl_trt.errors import ModelLoadError
from sdxl_trt.identity import hash_model_files
from sdxl_trt.presets import PRESETS

from .loading_core import SINGLE_FILE_SUFFIXES, LoadedModel, model_dims
from .loading_diffusers import check_config_dir, check_diffusers_dir, load_diffusers_dir
from .loading_presets import load_preset
from .loading_single_file import load_single_file

__all__ = ["LoadedModel", "check_config_dir", "check_diffusers_dir", "hash_model_files", "load_model", "model_dims"]


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
) -> LoadedModel:
    """Load ``source``: a preset name, a diffusers-format directory, or a single-file checkpoint
    (``.safetensors``, or a ``.ckpt`` of plain tensors) in the original Stability layout.

    ``config`` (single files only) is a diffusers-format directory whose configs describe the file;
    by default the shipped SDXL 1.0 base or refiner configs are used, chosen from the file's keys.
    """
    text = str(source)
    if text in PRESETS:
        _no_config(config, f"preset {text!r}")
        return load_preset(PRESETS[text], dtype=dtype, device=device)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path "
            "(a diffusers-format directory or a single-file .safetensors checkpoint)"
        )
    if path.is_dir():
        _no_config(config, f"diffusers directory {path}")
        return load_diffusers_dir(path, dtype=dtype, device=device)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return load_single_file(path, dtype=dtype, device=device, config=config)
    raise ModelLoadError(
        f"model file {path} has an unknown suffix {path.suffix!r}: pass a diffusers-format directory or a "
        f"single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
    )


def _no_config(config: str | Path | None, what: str) -> None:
    if config is not None:
        raise ModelLoadError(
            f"a config directory ({config}) only applies to single-file checkpoints; {what} has its own configs"
        )
