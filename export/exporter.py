"""Export a whole SDXL model (and optionally its refiner) to verified ONNX files plus ``manifest.json``.

For each component: trace -> clean -> ``onnx.checker`` -> compare with PyTorch through ONNX Runtime.
The relative error of every output is stored in the manifest and returned for the CLI's table. A
component whose file, model and settings are unchanged since the last export is not exported again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import CONTRACT_VERSION, VAE_SCALE, ModelDims, component_specs, controlnet_component
from sdxl_trt.engine_dir.environment import current_device, library_versions, sha256_file
from sdxl_trt.engine_dir.layout import WEIGHT_MAP_NAME
from sdxl_trt.errors import ExportError
from sdxl_trt.identity import file_sha256, model_identity_hash
from sdxl_trt.lora import LORA_COMPONENTS, LoraSpec
from sdxl_trt.lora.weight_map import WeightMap
from sdxl_trt.presets import PRESETS
from sdxl_trt.tables import format_table, human_bytes

from .controlnet import (
    ControlNetSpec,
    base_unet_config,
    check_controlnet_fits,
    config_summary,
    controlnet_config,
    controlnet_identity,
    controlnet_residuals,
    controlnet_source,
    load_controlnet,
)
from .loading import LoadedModel, load_model, model_dims
from .lora_fusion import fuse_loras, fused_identity
from .onnx_export import check_onnx, export_onnx, sample_inputs, verify_onnx
from .weight_map import lora_modules, onnx_weight_map
from .wrappers import wrap_components

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "manifest.json"
WEIGHT_MAP = WEIGHT_MAP_NAME  # the same name in the ONNX and the engine directory
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def component_precision(component: str, precision: str, vae_precision: str = "fp32") -> str:
    """The SDXL VAE overflows in fp16 (NaN/black images), so it stays fp32 unless asked otherwise."""
    return vae_precision if component in VAE_COMPONENTS else precision


def _settings_key(component: str, precision: str, identity: str) -> str:
    """What an exported file depends on: the model, the component, its precision, the contract."""
    return f"{identity}:{component}:{precision}:contract-v{CONTRACT_VERSION}"


def read_export_manifest(out: Path) -> dict[str, Any] | None:
    path = out / EXPORT_MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and data.get("stage") == "export" else None
    except json.JSONDecodeError:
        log.warning("%s is corrupt; exporting everything again", path)
        return None


RESIDUAL_INPUTS = "controlnet-residuals"
"""Marks the identity of a UNet exported with residual inputs: never reused for a plain build, nor the reverse."""


def _identity(identities: dict[str, str], name: str) -> str:
    """A component's own identity (a ControlNet's, a residual UNet's), else its model's."""
    return identities.get(name) or identities["refiner" if name == "refiner" else "base"]


def stale_components(
    out: Path, components: Sequence[str], *, identities: dict[str, str], precision: str, vae_precision: str = "fp32"
) -> list[str]:
    """Components whose ONNX is missing, changed on disk, or was exported from another model/precision."""
    previous = read_export_manifest(out) or {}
    entries = previous.get("components", {})
    stale = []
    for name in components:
        e = entries.get(name)
        p = component_precision(name, precision, vae_precision)
        identity = _identity(identities, name)
        if (
            e is None
            or e.get("settings") != _settings_key(name, p, identity)
            or not (out / e["file"]).exists()
            or sha256_file(out / e["file"]) != e.get("sha256")
        ):
            stale.append(name)
    return stale


def export_model(
    model: str,
    *,
    out: Path,
    refiner: str | None = None,
    precision: str = "fp32",
    vae_precision: str = "fp32",
    device: str = "cpu",
    components: Sequence[str] | None = None,
    model_config: str | None = None,
    force: bool = False,
    loaded: tuple[LoadedModel, LoadedModel | None] | None = None,
    loras: Sequence[LoraSpec] = (),
    controlnets: Sequence[ControlNetSpec] = (),
) -> dict[str, Any]:
    """Export ``model`` (a preset or a local path) to ``out``; returns the export manifest (also saved).

    ``controlnets``: each is exported as ``controlnet.NAME.onnx`` (checked against the base UNet's config before
    anything is written) and the UNet takes their residuals as inputs.

    ``loras`` are fused into the base model's PyTorch modules before export (``loaded`` modules too: pass
    them without LoRAs). The weight map of the exported text encoders and UNet goes to ``weight_map.json``.
    """
    if precision not in PRECISIONS or vae_precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}/{vae_precision!r}")
    out = Path(out)
    cn_entries = controlnet_entries(model, model_config, controlnets)  # refuses a misfit before writing
    out.mkdir(parents=True, exist_ok=True)
    model_identity = model_identity_hash(model)
    identities = {"base": fused_identity(model_identity, loras)}
    if refiner is not None:
        identities["refiner"] = model_identity_hash(refiner)
    if controlnets:
        identities["unet"] = f"{identities['base']}+{RESIDUAL_INPUTS}"
    identities.update({controlnet_component(n): e["identity_hash"] for n, e in cn_entries.items()})
    wanted = list(components) if components else [
        "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", *(["refiner"] if refiner else []),
        *(controlnet_component(s.name) for s in controlnets),
    ]
    todo = wanted if force else stale_components(
        out, wanted, identities=identities, precision=precision, vae_precision=vae_precision
    )
    previous = read_export_manifest(out) or {}
    same_refiner = (previous.get("refiner") or {}).get("identity_hash") == identities.get("refiner")
    same_controlnets = (previous.get("controlnets") or {}) == cn_entries
    weight_map = _read_weight_map(out)
    unmapped = _unmapped_components(weight_map, wanted, previous.get("components", {}), todo)
    if not todo and not unmapped and previous and same_refiner and same_controlnets:
        log.info("export: all %d components up to date in %s", len(wanted), out)
        return {**previous, "components": {k: previous["components"][k] for k in wanted}}

    if loaded is None:
        base_m = load_model(model, dtype=torch.float32, device=device, config=model_config)
        ref_m = load_model(refiner, dtype=torch.float32, device=device) if refiner else None
    else:
        base_m, ref_m = loaded
    fused = fuse_loras(base_m, loras)
    dims = with_controlnet_residuals(model_dims(base_m, ref_m), base_m.unet.config, controlnets)
    specs = component_specs(dims, [s.name for s in controlnets])
    cn_modules = {controlnet_component(s.name): load_controlnet(s.source, base_unet=dict(base_m.unet.config),
                                                                 device=device)
                  for s in controlnets if controlnet_component(s.name) in todo}
    modules = wrap_components(base_m, ref_m, controlnets=cn_modules, unet_residuals=bool(controlnets))
    buckets = PRESETS[model].buckets if model in PRESETS else None
    verify_bucket = min(buckets, key=lambda b: b.pixels) if buckets else None
    vh, vw = verify_bucket.latent_hw if verify_bucket else (64, 64)

    entries: dict[str, Any] = dict(previous.get("components", {})) if not force else {}
    for i, name in enumerate(todo, 1):
        prec = component_precision(name, precision, vae_precision)
        dtype = PRECISIONS[prec]
        module = modules[name].to(device=device, dtype=dtype)
        path = out / f"{name}.onnx"
        log.info("[%d/%d] %s: exporting (%s)", i, len(todo), name, prec)
        t0 = time.perf_counter()
        export_onnx(module, specs[name], path, precision=dtype, device=device)
        t_export = time.perf_counter() - t0
        log.info("[%d/%d] %s: checking with onnx.checker", i, len(todo), name)
        check_onnx(path)
        verify_dims = {"B": 1 if name in VAE_COMPONENTS else 2, "S": 77, "h": vh, "w": vw}
        log.info("[%d/%d] %s: verifying against PyTorch with ONNX Runtime at %s", i, len(todo), name, verify_dims)
        t1 = time.perf_counter()
        ver = verify_onnx(module, specs[name], path, dims=verify_dims, precision=dtype, device=device)
        t_verify = time.perf_counter() - t1
        if name in LORA_COMPONENTS:  # while the module holds the weights exactly as exported
            weight_map.components[name] = onnx_weight_map(
                lora_modules(base_m)[name], module, path, onnx_sha256=sha256_file(path),
                sample=_sample(specs[name], dtype, device))
        data_file = path.with_name(path.name + ".data")
        entries[name] = {
            "file": path.name,
            "external_data": data_file.name if data_file.exists() else None,
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0),
            "precision": prec,
            "settings": _settings_key(name, prec, _identity(identities, name)),
            "export_seconds": round(t_export, 3),
            "verify_seconds": round(t_verify, 3),
            "verify_dims": ver.dims,
            "relative_error": ver.relative_error,
            "max_abs_error": ver.max_abs_error,
        }
        log.info("[%d/%d] %s: done in %.1f s, relative error %.2e", i, len(todo), name,
                 t_export + t_verify, ver.worst_relative_error)
        module.to(dtype=torch.float32)
    for name in unmapped:  # exported before weight maps existed: map the file already there
        module = modules[name].to(device=device, dtype=PRECISIONS[component_precision(name, precision)])
        weight_map.components[name] = onnx_weight_map(
            lora_modules(base_m)[name], module, out / f"{name}.onnx", onnx_sha256=entries[name]["sha256"],
            sample=_sample(specs[name], module_dtype(module), device))
        module.to(dtype=torch.float32)
    weight_map.components = {k: v for k, v in weight_map.components.items() if k in wanted}
    weight_map.save(out / WEIGHT_MAP)

    _copy_runtime_assets(base_m, ref_m, out)
    manifest = {
        "stage": "export",
        "model": _model_entry(base_m, model_identity, fused, identities["base"]),
        "refiner": _model_entry(ref_m, identities["refiner"]) if ref_m else None,
        "precision": precision,
        "vae_precision": vae_precision,
        "model_dims": dims.to_json(),
        "native_buckets": [str(b) for b in buckets] if buckets else None,
        "pipeline": _pipeline_entry(base_m, ref_m),
        "versions": library_versions(),
        "device": current_device(),
        "components": {k: entries[k] for k in wanted if k in entries},
        "controlnets": cn_entries,
        "weight_map": WEIGHT_MAP,
    }
    tmp = out / (EXPORT_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / EXPORT_MANIFEST)
    return manifest


def controlnet_entries(model: str, model_config: str | None,
                       controlnets: Sequence[ControlNetSpec]) -> dict[str, dict[str, Any]]:
    """Per ControlNet NAME: its source, identity and config summary, each config checked against the base UNet
    (configs only, so a misfit is refused before anything is written or loaded)."""
    if not controlnets:
        return {}
    unet = base_unet_config(model, model_config)
    out = {}
    for s in controlnets:
        cfg = controlnet_config(s, unet)
        check_controlnet_fits(s.name, cfg, unet)
        out[s.name] = {"source": controlnet_source(s), "identity_hash": controlnet_identity(s, cfg),
                       "config": config_summary(cfg)}
    return out


def with_controlnet_residuals(dims: ModelDims, unet_config: Any, controlnets: Sequence[ControlNetSpec]) -> ModelDims:
    """``dims`` with the base UNet's residual shapes when the build has ControlNets (else unchanged)."""
    return replace(dims, controlnet_residuals=controlnet_residuals(unet_config) if controlnets else ())


def _model_entry(m: LoadedModel, identity: str, loras: list[dict[str, Any]] | None = None,
                 fused: str | None = None) -> dict[str, Any]:
    """``identity_hash`` is the model's own (the load check compares it with the files); with LoRAs fused,
    ``loras`` lists them and ``fused_identity`` is what staleness is decided on."""
    entry: dict[str, Any] = {"name": m.name, "kind": m.kind, "source": m.source, "identity_hash": identity}
    if loras:
        entry.update(loras=loras, fused_identity=fused)
    return entry


def _sample(spec: Any, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Small inputs for the weight map's autograd check of unused weights."""
    inputs = sample_inputs(spec, {"B": 1, "S": 77, "h": 16, "w": 16}, dtype, device=device, seed=3)
    return [inputs[n] for n in spec.input_names]


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _read_weight_map(out: Path) -> WeightMap:
    """The weight map beside earlier exports, or an empty one (missing or unreadable: mapped again)."""
    try:
        return WeightMap.load(out / WEIGHT_MAP)
    except Exception:  # noqa: BLE001 - any problem means: map again
        return WeightMap()


def _unmapped_components(weight_map: WeightMap, wanted: Sequence[str], entries: dict[str, Any],
                         todo: Sequence[str]) -> list[str]:
    """Up-to-date LoRA components whose ONNX the weight map does not describe (exported by an older sdxl-trt)."""
    return [c for c in wanted if c in LORA_COMPONENTS and c not in todo and c in entries
            and (c not in weight_map.components or weight_map.components[c].onnx_sha256 != entries[c].get("sha256"))]


def _copy_runtime_assets(base: LoadedModel, refiner: LoadedModel | None, out: Path) -> None:
    """Tokenizers and the scheduler config travel with the ONNX (the runtime needs no model directory)."""
    for sub in ("tokenizer", "tokenizer_2", "scheduler"):
        src = base.config_dir / sub
        if src.is_dir():
            dst = out / sub
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
    if refiner is not None and (refiner.config_dir / "scheduler").is_dir():
        dst = out / "refiner_scheduler"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(refiner.config_dir / "scheduler", dst)


def format_export_table(manifest: dict[str, Any]) -> str:
    """The verification table the CLI prints."""
    rows = [("component", "precision", "size", "export s", "verify s", "rel. error (worst output)")]
    for name, e in manifest["components"].items():
        rows.append((
            name, e["precision"], human_bytes(e["size_bytes"]), f"{e['export_seconds']:.1f}", f"{e['verify_seconds']:.1f}",
            f"{max(e['relative_error'].values()):.2e}",
        ))
    return format_table(rows)




def _config_only(config_dir: Path, name: str, source: dict[str, Any], identity: str) -> LoadedModel:
    """A LoadedModel whose modules are just their configs: enough for widths and options, no weights."""
    from types import SimpleNamespace

    from .loading_core import pipeline_options, read_json
    from .loading_diffusers import check_config_dir

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
        d = preset.write_config_dir(Path(tempfile.mkdtemp(prefix=f"sdxl-trt-{source}-")))
        return d, {"type": "preset", "name": source, "seed": preset.seed}
    path = Path(source).expanduser()
    if path.is_dir():
        return path, {"type": "diffusers", "path": str(path.resolve())}
    if model_config is None:
        raise ExportError(f"{source}: a single-file model needs --model-config for the torch backend's summary")
    return Path(model_config), {"type": "single_file", "path": str(path.resolve()), "config": model_config}


def model_summary(model: str, *, refiner: str | None = None, model_config: str | None = None,
                  loras: Sequence[LoraSpec] = (), controlnets: Sequence[ControlNetSpec] = ()) -> dict[str, Any]:
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
    buckets = PRESETS[model].buckets if model in PRESETS else None
    assets = Path(tempfile.mkdtemp(prefix="sdxl-trt-assets-"))
    _copy_runtime_assets(base, ref, assets)
    return {
        "model": _model_entry(base, base.identity_hash, fused, fused_identity(base.identity_hash, loras)),
        "refiner": _model_entry(ref, ref.identity_hash) if ref else None,
        "model_dims": dims.to_json(),
        "native_buckets": [str(b) for b in buckets] if buckets else None,
        "pipeline": _pipeline_entry(base, ref),
        "assets_dir": str(assets),
        "components": {},
        "controlnets": cn_entries,
    }


def _pipeline_entry(base: LoadedModel, ref: LoadedModel | None) -> dict[str, Any]:
    return {
        "vae_scaling_factor": float(base.vae.config.scaling_factor),
        "vae_scale": VAE_SCALE,
        **base.options,
        "refiner_requires_aesthetics_score": bool(ref.options.get("requires_aesthetics_score", True)) if ref else None,
    }
