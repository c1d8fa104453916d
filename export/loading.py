"""Load an SDXL model's PyTorch components: a preset, a diffusers-format directory or a single file.

Nothing is fetched from a hub: presets are built from the configs the project ships (seeded random
weights), diffusers directories and single files are read from the local path the user gives, and a
single file's configs come from the project (SDXL 1.0) or a local directory the user names. Every
failure is a ``ModelLoadError`` that names the path, file or weight that is missing or malformed.

Loading is strict: a weight the config expects but the files lack, or a weight the files have but the
config does not describe, is an error. (The libraries only warn and leave such weights random.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ModelDims
from sdxl_trt.errors import ModelLoadError
from sdxl_trt.identity import hash_model_files, preset_identity_hash
from sdxl_trt.presets import PRESETS, Preset

__all__ = ["LoadedModel", "check_config_dir", "check_diffusers_dir", "hash_model_files", "load_model", "model_dims"]

log = logging.getLogger(__name__)

# Stop transformers/diffusers from ever trying the network: every file we read is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIRED_SUBFOLDERS = {
    "base": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "refiner": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Key prefixes of the original Stability single-file layout (sd_xl_base_1.0.safetensors).
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "conditioner.embedders.0.transformer."  # base: CLIP ViT-L, stored in the HF transformers layout
LDM_OPEN_CLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}

# Weights that checkpoints may carry but models rebuild themselves (non-persistent buffers).
_IGNORABLE = re.compile(r"(^|\.)position_ids$")


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
        return _load_preset(PRESETS[text], dtype=dtype, device=device)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path "
            "(a diffusers-format directory or a single-file .safetensors checkpoint)"
        )
    if path.is_dir():
        _no_config(config, f"diffusers directory {path}")
        return _load_diffusers_dir(path, dtype=dtype, device=device)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return _load_single_file(path, dtype=dtype, device=device, config=config)
    raise ModelLoadError(
        f"model file {path} has an unknown suffix {path.suffix!r}: pass a diffusers-format directory or a "
        f"single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
    )


def _no_config(config: str | Path | None, what: str) -> None:
    if config is not None:
        raise ModelLoadError(
            f"a config directory ({config}) only applies to single-file checkpoints; {what} has its own configs"
        )


@contextlib.contextmanager
def _default_dtype_device(dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Create parameters directly in the target dtype and device (20 s saved per full UNet on a GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _load_preset(preset: Preset, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    log.info("creating preset %s with seeded random weights (seed %d)", preset.name, preset.seed)
    config_dir = preset.write_config_dir(Path(tempfile.mkdtemp(prefix=f"sdxl-trt-{preset.name}-")))
    # Each component gets its own seed so that adding one never changes another's weights. The weights
    # are drawn in float32 whatever ``dtype`` is, then cast (in _finish): a bf16/fp16 load is the fp32
    # model rounded, so half-precision engines can be checked against it. (Drawn on ``device``: CUDA's
    # generator gives other numbers than the CPU's, so a preset on a GPU is not the CPU one.)
    with _default_dtype_device(torch.float32, device):
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
    return _finish(
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
            options=_pipeline_options(preset.model_index()),
        ),
        dtype,
        device,
    )


def _pipeline_options(model_index: dict[str, Any]) -> dict[str, Any]:
    return {
        "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(model_index.get("requires_aesthetics_score", False)),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


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
    return _read_json(path / "model_index.json")


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
            _read_json(path / sub / "config.json")
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
        _read_json(path / sub / "config.json")
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


def _load_diffusers_dir(path: Path, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
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
        options=_pipeline_options(index),
    )
    return _finish(model, dtype, device)


def _check_loading_info(folder: Path, info: Mapping[str, Any]) -> None:
    """diffusers and transformers leave missing weights random with a warning; refuse instead."""
    missing = sorted(k for k in info.get("missing_keys") or () if not _IGNORABLE.search(k))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not _IGNORABLE.search(k))
    mismatched = [str(m) for m in info.get("mismatched_keys") or ()]
    problems = _describe_key_problems(missing, unexpected, mismatched)
    if problems:
        raise ModelLoadError(f"the weights in {folder} do not match {folder / 'config.json'}: {problems}")


def _describe_key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
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


# --- single-file checkpoints -------------------------------------------------------------------------


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


def _load_single_file(
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
            config_dir = preset.write_config_dir(Path(tempfile.mkdtemp(prefix="sdxl-trt-config-")))
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
            cfg = _read_json(cfg_file)
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
            with _default_dtype_device(dtype, device):
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
        options=_pipeline_options(_read_json(config_dir / "model_index.json")),
    )
    return _finish(model, dtype, device)


def _check_weights(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *, what: str,
                   hint: str) -> None:
    """Every parameter and buffer the config implies must come from the file, at its shape, and every
    weight in the file must have a place."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not _IGNORABLE.search(k))
    mismatched = [
        f"{k}: {_shape(weights[k])} in the file, {_shape(v)} in the config"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = _describe_key_problems(missing, unexpected, mismatched)
    if problems:
        raise ModelLoadError(f"{what}: {problems} {hint}".rstrip())


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _finish(model: LoadedModel, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
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
