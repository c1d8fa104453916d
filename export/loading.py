"""Load an SDXL model's PyTorch components: a preset, a diffusers-format directory or a single file.

Nothing is fetched from a hub: presets are built from the configs the project ships (seeded random
weights), diffusers directories and single files are read from the local path the user gives. Every
failure names the path or file that is missing or malformed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ModelDims
from sdxl_trt.errors import ModelLoadError
from sdxl_trt.presets import PRESETS, Preset

log = logging.getLogger(__name__)

# Stop transformers/diffusers from ever trying the network: every file we read is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIRED_SUBFOLDERS = {
    "base": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "refiner": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


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
        raise ModelLoadError(f"{base.name!r} is a refiner; --model needs an SDXL base model")
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
            raise ModelLoadError(f"{refiner.name!r} is not a refiner model (it has text_encoder); pass it as --model")
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
    if unet_config.addition_embed_type != "text_time" or per is None or (total - pooled) % per:
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
    """Load ``source``: a preset name, a diffusers-format directory, or a single ``.safetensors`` file.

    ``config`` (single files only) is a diffusers-format directory whose configs describe the file;
    by default the shipped SDXL base or refiner configs are used, chosen from the file's keys.
    """
    text = str(source)
    if text in PRESETS:
        return _load_preset(PRESETS[text], dtype=dtype, device=device)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path"
        )
    if path.is_dir():
        return _load_diffusers_dir(path, dtype=dtype, device=device)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return _load_single_file(path, dtype=dtype, device=device, config=config)
    raise ModelLoadError(
        f"model file {path} is not a diffusers directory or a single-file checkpoint "
        f"({', '.join(SINGLE_FILE_SUFFIXES)})"
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
    # Each component gets its own seed so that adding one never changes another's weights.
    with _default_dtype_device(dtype, device):
        torch.manual_seed(preset.seed * 100 + 1)
        unet = UNet2DConditionModel.from_config(preset.unet)
        torch.manual_seed(preset.seed * 100 + 2)
        vae = AutoencoderKL.from_config(preset.vae)
        te1 = None
        if preset.text_encoder is not None:
            torch.manual_seed(preset.seed * 100 + 3)
            te1 = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        # SDXL's refiner ships the base's OpenCLIP encoder unchanged; one seed for both keeps that true.
        torch.manual_seed(4)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    ident = hashlib.sha256(
        json.dumps({"preset": preset.name, "seed": preset.seed, "unet": preset.unet, "vae": preset.vae,
                    "te": preset.text_encoder, "te2": preset.text_encoder_2}, sort_keys=True).encode()
    ).hexdigest()
    return _finish(
        LoadedModel(
            name=preset.name,
            kind=preset.kind,
            source={"type": "preset", "name": preset.name, "seed": preset.seed},
            identity_hash=ident,
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


def check_diffusers_dir(path: Path) -> tuple[str, dict[str, Any]]:
    """Validate a diffusers-format SDXL directory; returns (kind, model_index)."""
    index = _read_json(path / "model_index.json")
    kind = _kind_from_index(index)
    missing = [s for s in REQUIRED_SUBFOLDERS[kind] if not (path / s).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is not a complete diffusers SDXL {kind} directory: missing {', '.join(s + '/' for s in missing)}"
        )
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (path / sub).is_dir():
            _read_json(path / sub / "config.json")
            if not any((path / sub).glob("*.safetensors")) and not any((path / sub).glob("*.bin")):
                raise ModelLoadError(f"{path / sub} has a config but no weights (*.safetensors or *.bin)")
    return kind, index


def _load_diffusers_dir(path: Path, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind, index = check_diffusers_dir(path)
    log.info("loading diffusers SDXL %s from %s", kind, path)

    def load(cls: Any, sub: str) -> Any:
        try:
            return cls.from_pretrained(path / sub, torch_dtype=dtype, local_files_only=True).to(device)
        except Exception as e:  # noqa: BLE001 - the libraries raise many types; name the folder
            raise ModelLoadError(f"could not load {path / sub} as {cls.__name__}: {e}") from e

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


def _load_single_file(
    path: Path, *, dtype: torch.dtype, device: str | torch.device, config: str | Path | None
) -> LoadedModel:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            f"{path} is not an SDXL checkpoint in the original Stability layout (no 'model.diffusion_model.' keys)"
        )
    kind = "base" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "refiner"
    if config is None:
        config_dir = PRESETS["sdxl-base-1.0" if kind == "base" else "sdxl-refiner-1.0"].write_config_dir(
            Path(tempfile.mkdtemp(prefix="sdxl-trt-config-"))
        )
    else:
        config_dir = Path(config)
        check_config_dir(config_dir)
    cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline
    log.info("converting single-file SDXL %s %s with configs from %s", kind, path, config_dir)
    try:
        pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not convert {path} with the configs in {config_dir}: {e}") from e
    model = LoadedModel(
        name=str(path),
        kind=kind,
        source={"type": "single_file", "path": str(path.resolve()), "config": str(config_dir)},
        identity_hash=hash_model_files(path),
        unet=pipe.unet.to(device),
        vae=pipe.vae.to(device),
        text_encoder=pipe.text_encoder.to(device) if kind == "base" else None,
        text_encoder_2=pipe.text_encoder_2.to(device),
        config_dir=config_dir,
        options=_pipeline_options(_read_json(config_dir / "model_index.json")),
    )
    return _finish(model, dtype, device)


def check_config_dir(path: Path) -> None:
    """A weightless diffusers-format directory: model_index.json plus each component's config."""
    index = _read_json(path / "model_index.json")
    kind = _kind_from_index(index)
    for sub in ("unet", "vae", "text_encoder_2") + (("text_encoder",) if kind == "base" else ()):
        _read_json(path / sub / "config.json")


def _finish(model: LoadedModel, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    for m in model.modules().values():
        p = next(m.parameters())
        if p.dtype != dtype or p.device != torch.device(device):
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return model


def hash_model_files(path: Path, *, sample_bytes: int = 1 << 22) -> str:
    """A content hash of a model directory or file: all configs in full, weights by size plus their
    first and last 4 MiB. Reading every byte of a 7 GB model at each build is too slow for staleness
    checks; changed weights virtually always change the sampled bytes too."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        size = f.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 2 * sample_bytes:
                h.update(fh.read())
            else:
                h.update(fh.read(sample_bytes))
                fh.seek(size - sample_bytes)
                h.update(fh.read(sample_bytes))
    return h.hexdigest()
