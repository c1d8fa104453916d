"""ControlNets for ``sdxl-trt build --controlnet PATH[:NAME]``: parse, check against the base UNet, load.

A ControlNet comes from one of three places, never a hub:

- a preset (``tiny-controlnet``, ``tiny-controlnet-small``, ``sdxl-controlnet``): the config
  ``ControlNetModel.from_unet`` gives the base preset's UNet, seeded random weights, the zero-initialised convs
  included (else its residuals are zero and it proves nothing);
- a diffusers-format directory (``config.json`` and one weights file);
- a single weights file (``.safetensors``): with the ``config.json`` beside it if there is one, else with the
  config ``from_unet`` gives the base UNet (diffusers-keyed files of a full-width ControlNet).

Everything the build refuses (a ControlNet for another base: cross-attention width, micro-conditioning,
residual channels or count) is found from configs alone by :func:`check_controlnets`, before any file is
written; weights are read only at export. Loading is strict: a missing, extra or mis-shaped weight is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trt.contracts import CONTROLNET_NAME_PATTERN
from sdxl_trt.errors import BuildError, ModelLoadError
from sdxl_trt.identity import file_sha256, hash_model_files
from sdxl_trt.presets import (
    CONTROLNET_PRESETS,
    PRESETS,
    SDXL_BASE_UNET,
    ControlNetPreset,
    controlnet_config_from_unet,
)

log = logging.getLogger(__name__)

_NAME = re.compile(CONTROLNET_NAME_PATTERN + r"\Z")
WEIGHT_SUFFIXES = (".safetensors", ".bin")

# ControlNetModel's defaults, for configs that leave a key out.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "conditioning_channels": 3, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "addition_embed_type": None,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None, "global_pool_conditions": False,
}


@dataclass(frozen=True)
class ControlNetSpec:
    """One ``--controlnet`` value: where the ControlNet comes from and the NAME requests use for it."""

    source: str  # a preset name or a local path
    name: str

    @classmethod
    def parse(cls, text: str) -> ControlNetSpec:
        """``PATH[:NAME]`` or ``PRESET[:NAME]``. The suffix after the last ``:`` is a NAME only when the whole
        string is not a preset or an existing path (a path may hold ``:``). Without NAME: the preset's name,
        or the directory's name / the file's stem."""
        def known(s: str) -> bool:
            return s in CONTROLNET_PRESETS or Path(s).expanduser().exists()

        source, name = text, None
        if not known(text) and ":" in text:
            head, tail = text.rsplit(":", 1)
            if _NAME.match(tail) or known(head):
                source, name = head, tail
        if name is not None and not _NAME.match(name):
            raise BuildError(f"--controlnet {text!r}: {name!r} is not a valid ControlNet name "
                             f"({CONTROLNET_NAME_PATTERN}: letters, digits, '_' and '-')")
        if not known(source):
            raise BuildError(
                f"--controlnet {text!r}: {source!r} is neither a ControlNet preset ({', '.join(CONTROLNET_PRESETS)}) "
                "nor an existing path (a diffusers-format ControlNet directory or a .safetensors file)"
            )
        if name is None:
            path = Path(source)
            name = source if source in CONTROLNET_PRESETS else (path.name if path.is_dir() else path.stem)
            if not _NAME.match(name):
                raise BuildError(
                    f"--controlnet {text!r}: its default name {name!r} is not a valid ControlNet name "
                    f"({CONTROLNET_NAME_PATTERN}); name it: --controlnet {source}:NAME"
                )
        return cls(source, name)


def parse_controlnets(values: Sequence[str]) -> list[ControlNetSpec]:
    """Every ``--controlnet``, names checked unique (a NAME is a component and a request field)."""
    specs = [ControlNetSpec.parse(v) for v in values]
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise BuildError(
                f"--controlnet: the name {s.name!r} is given twice ({seen[s.name]!r} and {s.source!r}); "
                f"name them apart: --controlnet {s.source}:OTHER_NAME"
            )
        seen[s.name] = s.source
    return specs


def controlnet_residuals(unet_config: Any) -> tuple[tuple[int, int], ...]:
    """(channels, downscale) of each residual a ControlNet adds to this UNet, in diffusers' order: conv_in's, each
    down block's ``layers_per_block`` resnets and its downsampler (not the last block's), then the mid block's."""
    cfg = _as_dict(unet_config)
    channels = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    out = [(channels[0], 1)]
    for i, c in enumerate(channels):
        n = layers[i] if isinstance(layers, (list, tuple)) else layers
        out += [(c, 2**i)] * n
        if i < len(channels) - 1:
            out.append((c, 2 ** (i + 1)))
    out.append((channels[-1], 2 ** (len(channels) - 1)))
    return tuple(out)


def base_unet_config(model: str, model_config: str | None = None) -> dict[str, Any]:
    """The base model's UNet config without loading weights: a preset's, a diffusers directory's, or (single
    files) that of ``--model-config`` or the shipped SDXL 1.0 base the single-file loader defaults to."""
    if model in PRESETS:
        return dict(PRESETS[model].unet)
    path = Path(model).expanduser()
    root = path if path.is_dir() else (Path(model_config).expanduser() if model_config else None)
    if root is None:
        return dict(SDXL_BASE_UNET)
    return _read_json(root / "unet" / "config.json")


def controlnet_config(spec: ControlNetSpec, base_unet: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet's config, read without its weights."""
    if spec.source in CONTROLNET_PRESETS:
        return dict(CONTROLNET_PRESETS[spec.source].config)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return _read_json(path / "config.json")
    beside = path.parent / "config.json"
    if beside.is_file():
        return _read_json(beside)
    return controlnet_config_from_unet(base_unet)


def check_controlnet_fits(name: str, cn: dict[str, Any], unet: dict[str, Any]) -> None:
    """Refuse a ControlNet whose config does not fit the base UNet, naming the key and both values."""
    def get(cfg: dict[str, Any], key: str) -> Any:
        v = cfg.get(key, _DEFAULTS.get(key))
        return list(v) if isinstance(v, tuple) else v

    if get(cn, "global_pool_conditions"):
        raise BuildError(f"ControlNet {name!r}: global_pool_conditions=true (the pooled ControlNets of guess-mode-only "
                         "models) is not supported; use a ControlNet without it")
    if get(cn, "conditioning_channels") != 3:
        raise BuildError(f"ControlNet {name!r}: conditioning_channels is {get(cn, 'conditioning_channels')}, but the "
                         "control image has 3 (RGB); only RGB-conditioned ControlNets are supported")
    if get(cn, "addition_embed_type") != "text_time":
        raise BuildError(
            f"ControlNet {name!r}: addition_embed_type is {get(cn, 'addition_embed_type')!r}, the base UNet's is "
            f"{get(unet, 'addition_embed_type')!r}: this is not an SDXL ControlNet (an SD 1.5 ControlNet has none); "
            "use one trained for SDXL"
        )
    checks = [
        ("cross_attention_dim", "the base UNet's context width"),
        ("projection_class_embeddings_input_dim", "the base UNet's micro-conditioning width"),
        ("addition_time_embed_dim", "the base UNet's time-id embedding width"),
        ("in_channels", "the base UNet's latent channels"),
        ("block_out_channels", "the base UNet's block channels (the residual channels)"),
        ("layers_per_block", "the base UNet's (the residual count)"),
    ]
    for key, what in checks:
        if get(cn, key) != get(unet, key):
            raise BuildError(f"ControlNet {name!r}: {key} is {get(cn, key)}, but {what} is {get(unet, key)}; "
                             "use a ControlNet trained for this base model")
    if len(get(cn, "down_block_types")) != len(get(unet, "down_block_types")):
        raise BuildError(f"ControlNet {name!r}: {len(get(cn, 'down_block_types'))} down blocks, but the base UNet has "
                         f"{len(get(unet, 'down_block_types'))} (the residual count); use a ControlNet for this model")


def check_controlnets(model: str, model_config: str | None, specs: Sequence[ControlNetSpec]) -> dict[str, dict]:
    """Configs of every ControlNet, each checked against the base UNet (configs only: no weights read)."""
    unet = base_unet_config(model, model_config)
    out = {}
    for s in specs:
        cfg = controlnet_config(s, unet)
        check_controlnet_fits(s.name, cfg, unet)
        out[s.name] = cfg
    return out


def config_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the manifest and ``sdxl-trt info`` say about a ControlNet's size."""
    layers = cfg.get("transformer_layers_per_block", 1)
    return {"block_out_channels": list(cfg.get("block_out_channels", _DEFAULTS["block_out_channels"])),
            "transformer_layers_per_block": list(layers) if isinstance(layers, (list, tuple)) else layers,
            "conditioning_embedding_out_channels": list(cfg.get("conditioning_embedding_out_channels") or [])}


def controlnet_source(spec: ControlNetSpec) -> dict[str, Any]:
    if spec.source in CONTROLNET_PRESETS:
        return {"type": "preset", "name": spec.source, "seed": CONTROLNET_PRESETS[spec.source].seed}
    path = Path(spec.source).expanduser().resolve()
    return {"type": "diffusers" if path.is_dir() else "single_file", "path": str(path)}


def controlnet_identity(spec: ControlNetSpec, config: dict[str, Any]) -> str:
    """What the exported ControlNet depends on: a preset's config and seed, or every byte of its files, plus
    the config it is built with (a single file without config.json takes the base UNet's)."""
    if spec.source in CONTROLNET_PRESETS:
        p = CONTROLNET_PRESETS[spec.source]
        files = {"preset": p.name, "seed": p.seed, "init_scheme": 1}
    else:
        path = Path(spec.source).expanduser()
        files = {"files": hash_model_files(path)}
        if path.is_file() and (path.parent / "config.json").is_file():
            files["config_file"] = file_sha256(path.parent / "config.json")
    payload = json.dumps({**files, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_controlnet(source: str, *, base_unet: dict[str, Any] | None = None, dtype: Any = None,
                    device: Any = "cpu") -> Any:
    """A ``diffusers.ControlNetModel`` from a preset name, a diffusers directory or a single file (eval mode,
    no grad). ``base_unet``: the config a single file without ``config.json`` is read with."""
    import torch

    dtype = dtype or torch.float32
    if source in CONTROLNET_PRESETS:
        model = _preset_controlnet(CONTROLNET_PRESETS[source], device)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(f"ControlNet {source!r} is neither a preset ({', '.join(CONTROLNET_PRESETS)}) nor "
                                 "an existing path")
        if path.is_dir():
            model = _from_files(_read_json(path / "config.json"), _weights_file(path), where=str(path))
        else:
            beside = path.parent / "config.json"
            if beside.is_file():
                model = _from_files(_read_json(beside), path, where=f"{path} (config {beside})")
            else:
                cfg = controlnet_config_from_unet(base_unet or dict(SDXL_BASE_UNET))
                model = _from_files(cfg, path, where=f"{path} (config: ControlNetModel.from_unet of the base UNet)",
                                    fix=f"; put the ControlNet's diffusers config.json beside it ({beside})")
    if next(model.parameters()).dtype != dtype or next(model.parameters()).device != torch.device(device):
        model = model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _preset_controlnet(preset: ControlNetPreset, device: Any) -> Any:
    import torch
    from diffusers import ControlNetModel

    from .loading_core import default_dtype_device

    log.info("creating ControlNet preset %s with seeded random weights (seed %d)", preset.name, preset.seed)
    with default_dtype_device(torch.float32, device):
        torch.manual_seed(preset.seed * 100)
        model = ControlNetModel.from_config(preset.config)
        # diffusers starts these at zero (a new ControlNet adds nothing); a random one must add residuals of the
        # UNet's feature scale, so they get Conv2d's own default initialisation instead.
        torch.manual_seed(preset.seed * 100 + 1)
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block,
                     model.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()
    return model


def _weights_file(directory: Path) -> Path:
    preferred = directory / "diffusion_pytorch_model.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(found) != 1:
        raise ModelLoadError(f"ControlNet directory {directory}: expected one weights file "
                             f"(diffusion_pytorch_model.safetensors), found {[p.name for p in found] or 'none'}")
    return found[0]


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise ModelLoadError(f"ControlNet weights {path} are not a readable safetensors file: {e}") from e
    if path.suffix == ".bin":
        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ModelLoadError(f"ControlNet weights {path}: unknown suffix {path.suffix!r}; expected "
                         f"{', '.join(WEIGHT_SUFFIXES)}")


def _from_files(config: dict[str, Any], weights: Path, *, where: str, fix: str = "") -> Any:
    """Build the model on the meta device and take the file's tensors as its weights, strictly."""
    import torch
    from diffusers import ControlNetModel

    from .loading_core import describe_key_problems

    try:
        with torch.device("meta"):
            model = ControlNetModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config diffusers cannot build
        raise ModelLoadError(f"ControlNet {where}: its config does not build a ControlNetModel: {e}") from e
    state = _read_state_dict(weights)
    expected = model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        raise ModelLoadError(f"ControlNet {where}: the weights do not fit its config: "
                             f"{describe_key_problems(missing, unexpected, mismatched)}{fix}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model


def _read_json(path: Path) -> dict[str, Any]:
    from .loading_core import read_json

    return read_json(path)


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, dict) else dict(getattr(config, "items", lambda: vars(config).items())())
