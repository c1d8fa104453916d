"""A model described from its configs alone: what the torch backend builds from instead of an ONNX export.

The torch backend saves programs traced from the PyTorch modules, so it needs the export's description of the
model (identity, widths, pipeline options, runtime assets) but no ONNX files: :func:`model_summary` gives that
as an :class:`~.result.ExportResult` with no components, without reading a weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sdxl_trt.errors import ExportError
from sdxl_trt.files import process_temp_dir
from sdxl_trt.identity import file_sha256, model_identity_hash
from sdxl_trt.lora import LoraSpec
from sdxl_trt.presets import PRESETS

from .controlnet import ControlNetSpec
from .deepcache import deepcache_features
from .exporter import (
    controlnet_entries,
    copy_runtime_assets,
    model_entry,
    pipeline_entry,
    with_controlnet_residuals,
)
from .loading import LoadedModel, model_dims
from .loading_core import pipeline_options, read_json
from .loading_diffusers import check_config_dir
from .lora_fusion import fused_identity
from .result import ExportResult


def model_summary(model: str, *, refiner: str | None = None, model_config: str | None = None,
                  loras: Sequence[LoraSpec] = (), controlnets: Sequence[ControlNetSpec] = (),
                  deepcache: Sequence[int] = ()) -> ExportResult:
    """Identity, widths, pipeline options and runtime assets of a model, read from configs only (``loras``:
    recorded by file hash and scale; the torch build fuses them when it loads the weights; ``controlnets``:
    checked against the base UNet and recorded like the export records them)."""
    cn_entries = controlnet_entries(model, model_config, controlnets)
    base_dir, base_src = _config_dir_of(model, model_config)
    base = _config_only(base_dir, model, base_src, model_identity_hash(model))
    fused = [{"path": str(s.path.resolve()), "sha256": file_sha256(s.path), "scale": s.scale} for s in loras]
    ref = None
    if refiner:
        ref_dir, ref_src = _config_dir_of(refiner, None)
        ref = _config_only(ref_dir, refiner, ref_src, model_identity_hash(refiner))
    dims = with_controlnet_residuals(model_dims(base, ref), base.unet.config, controlnets)
    dims = replace(dims, deepcache_features=deepcache_features(base.unet.config, deepcache))
    buckets = PRESETS[model].buckets if model in PRESETS else None
    assets = process_temp_dir("assets")
    copy_runtime_assets(base, ref, assets)
    return ExportResult(
        model=model_entry(base, base.identity_hash, fused, fused_identity(base.identity_hash, loras)),
        refiner=model_entry(ref, ref.identity_hash) if ref else None,
        model_dims=dims,
        native_buckets=[str(b) for b in buckets] if buckets else None,
        pipeline=pipeline_entry(base, ref),
        controlnets=cn_entries,
        assets_dir=assets,
    )


def _config_only(config_dir: Path, name: str, source: dict[str, Any], identity: str) -> LoadedModel:
    """A LoadedModel whose modules are just their configs: enough for widths and options, no weights."""
    check_config_dir(config_dir)
    index = read_json(config_dir / "model_index.json")

    def cfg(sub: str) -> Any:
        path = config_dir / sub / "config.json"
        return SimpleNamespace(config=SimpleNamespace(**read_json(path))) if path.exists() else None

    te1 = cfg("text_encoder")
    return LoadedModel(
        name=name, kind="base" if te1 is not None else "refiner", source=source, identity_hash=identity,
        unet=cfg("unet"), vae=cfg("vae"), text_encoder=te1, text_encoder_2=cfg("text_encoder_2"),
        config_dir=config_dir, options=pipeline_options(index),
    )


def _config_dir_of(source: str, model_config: str | None) -> tuple[Path, dict[str, Any]]:
    if source in PRESETS:
        preset = PRESETS[source]
        d = preset.config_dir()
        return d, {"type": "preset", "name": source, "seed": preset.seed}
    path = Path(source).expanduser()
    if path.is_dir():
        return path, {"type": "diffusers", "path": str(path.resolve())}
    if model_config is None:
        raise ExportError(f"{source}: a single-file model needs --model-config for the torch backend's summary")
    return Path(model_config), {"type": "single_file", "path": str(path.resolve()), "config": model_config}
