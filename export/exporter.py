"""Export a whole SDXL model (and optionally its refiner) to verified ONNX files plus ``manifest.json``.

For each component: trace -> clean -> ``onnx.checker`` -> compare with PyTorch through ONNX Runtime.
The relative error of every output is stored in the manifest and returned for the CLI's table. A
component whose file, model and settings are unchanged since the last export is not exported again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import (
    TOKENS_PER_CHUNK,
    VAE_SCALE,
    ModelDims,
    build_components,
    component_precision,
    component_specs,
    controlnet_component,
    family_of,
    io_dtype,
)
from sdxl_trt.engine_dir.environment import current_device, library_versions, sha256_file
from sdxl_trt.engine_dir.layout import WEIGHT_MAP_NAME, onnx_file_name
from sdxl_trt.errors import ExportError
from sdxl_trt.files import replace_tree
from sdxl_trt.identity import model_identity_hash
from sdxl_trt.lora import LORA_COMPONENTS, LoraSpec
from sdxl_trt.lora.weight_map import WeightMap
from sdxl_trt.presets import PRESETS
from sdxl_trt.tables import format_table, human_bytes

from .controlnet import (
    ControlNetSpec,
    check_controlnets,
    config_summary,
    controlnet_identity,
    controlnet_residuals,
    controlnet_source,
    load_controlnet,
)
from .deepcache import deepcache_features
from .loading import LoadedModel, load_model, model_dims
from .lora_fusion import fuse_loras, fused_identity
from .onnx_export import check_onnx, export_onnx, fp32_outputs, sample_inputs, verify_onnx
from .result import (
    ExportedComponent,
    ExportResult,
    component_identity,
    read_export_manifest,
    settings_key,
)
from .weight_map import lora_modules, onnx_weight_map
from .wrappers import wrap_components

log = logging.getLogger(__name__)

WEIGHT_MAP = WEIGHT_MAP_NAME  # the same name in the ONNX and the engine directory
ONNX_PRECISIONS = ("fp32", "fp16")
"""What an ONNX export is written in (INT8 is Q/DQ nodes added to the fp32 UNet by the build)."""


def _precision(component: str, precision: str, vae_fp16_safe: bool) -> str:
    """The component's ONNX precision: the one rule, for a file any ONNX backend builds from."""
    return component_precision(component, precision, backend=None, vae_fp16_safe=vae_fp16_safe)


def stale_components(
    out: Path, components: Sequence[str], *, identities: dict[str, str], precision: str, vae_fp16_safe: bool = False
) -> list[str]:
    """Components whose ONNX is missing, changed on disk, or was exported from another model/precision."""
    previous = read_export_manifest(out)
    entries = previous.components if previous else {}
    stale = []
    for name in components:
        e = entries.get(name)
        key = settings_key(name, _precision(name, precision, vae_fp16_safe), identities[name])
        if e is None or e.settings != key or not (out / e.file).exists() or sha256_file(out / e.file) != e.sha256:
            stale.append(name)
    return stale


def export_model(
    model: str,
    *,
    out: Path,
    refiner: str | None = None,
    precision: str = "fp32",
    vae_fp16_safe: bool = False,
    device: str = "cpu",
    components: Sequence[str] | None = None,
    model_config: str | None = None,
    force: bool = False,
    loaded: tuple[LoadedModel, LoadedModel | None] | None = None,
    loras: Sequence[LoraSpec] = (),
    controlnets: Sequence[ControlNetSpec] = (),
    deepcache: Sequence[int] = (),
) -> ExportResult:
    """Export ``model`` (a preset or a local path) to ``out``; returns the export manifest (also saved).

    ``precision``: of the ONNX files; each component's follows the one rule (the VAE stays fp32 unless
    ``vae_fp16_safe``). ``controlnets``: each is exported as ``controlnet.NAME.onnx`` (checked against the base
    UNet's config before anything is written) and the UNet takes their residuals as inputs.

    ``loras`` are fused into the base model's PyTorch modules before export (``loaded`` modules too: pass
    them without LoRAs). The weight map of the exported text encoders and UNet goes to ``weight_map.json``.
    """
    if precision not in ONNX_PRECISIONS:
        raise ExportError(f"--precision must be one of {list(ONNX_PRECISIONS)}, got {precision!r}")
    out = Path(out)
    cn_entries = controlnet_entries(model, model_config, controlnets)  # refuses a misfit before writing
    out.mkdir(parents=True, exist_ok=True)
    model_identity = model_identity_hash(model)
    base_identity = fused_identity(model_identity, loras)
    refiner_identity = model_identity_hash(refiner) if refiner is not None else None
    if deepcache and controlnets:
        raise ExportError("--deepcache and --controlnet cannot be combined: DeepCache's shallow steps skip the "
                          "blocks a ControlNet's residuals feed; build them into separate engine directories")
    wanted = list(components) if components else build_components(refiner=refiner is not None,
                                                                   controlnets=[s.name for s in controlnets],
                                                                   deepcache=deepcache)
    identities = {name: component_identity(name, base=base_identity, refiner=refiner_identity,
                                            controlnets={n: e["identity_hash"] for n, e in cn_entries.items()},
                                            residual_unet=bool(controlnets), deepcache=deepcache)
                  for name in wanted}
    todo = wanted if force else stale_components(
        out, wanted, identities=identities, precision=precision, vae_fp16_safe=vae_fp16_safe
    )
    previous = read_export_manifest(out)
    same_refiner = previous is not None and (previous.refiner or {}).get("identity_hash") == refiner_identity
    same_controlnets = previous is not None and previous.controlnets == cn_entries
    weight_map = _read_weight_map(out)
    unmapped = _unmapped_components(weight_map, wanted, previous.components if previous else {}, todo)
    if not todo and not unmapped and previous and same_refiner and same_controlnets:
        log.info("export: all %d components up to date in %s", len(wanted), out)
        return replace(previous, components={k: previous.components[k] for k in wanted})

    if loaded is None:
        base_m = load_model(model, dtype=torch.float32, device=device, config=model_config)
        ref_m = load_model(refiner, dtype=torch.float32, device=device) if refiner else None
    else:
        base_m, ref_m = loaded
    fused = fuse_loras(base_m, loras)
    dims = with_controlnet_residuals(model_dims(base_m, ref_m), base_m.unet.config, controlnets)
    dims = replace(dims, deepcache_features=deepcache_features(base_m.unet.config, deepcache))
    specs = component_specs(dims, [s.name for s in controlnets])
    cn_modules = {controlnet_component(s.name): load_controlnet(s.source, base_unet=dict(base_m.unet.config),
                                                                 device=device)
                  for s in controlnets if controlnet_component(s.name) in todo}
    modules = wrap_components(base_m, ref_m, controlnets=cn_modules, unet_residuals=bool(controlnets),
                              deepcache=deepcache)
    buckets = PRESETS[model].buckets if model in PRESETS else None
    verify_bucket = min(buckets, key=lambda b: b.pixels) if buckets else None
    vh, vw = verify_bucket.latent_hw if verify_bucket else (64, 64)

    entries: dict[str, ExportedComponent] = dict(previous.components) if previous and not force else {}
    for i, name in enumerate(todo, 1):
        prec = _precision(name, precision, vae_fp16_safe)
        dtype = io_dtype(prec)
        verify_dims = {"B": 1 if family_of(name) == "vae" else 2, "S": TOKENS_PER_CHUNK, "h": vh, "w": vw}
        # An fp16 file is also measured against PyTorch in fp32 (the export table's "vs fp32"), computed first.
        reference = (fp32_outputs(modules[name].to(device=device), specs[name], dims=verify_dims, device=device)
                     if dtype == torch.float16 else None)
        module = modules[name].to(device=device, dtype=dtype)
        path = out / onnx_file_name(name)
        log.info("[%d/%d] %s: exporting (%s)", i, len(todo), name, prec)
        t0 = time.perf_counter()
        export_onnx(module, specs[name], path, precision=dtype, device=device)
        t_export = time.perf_counter() - t0
        log.info("[%d/%d] %s: checking with onnx.checker", i, len(todo), name)
        check_onnx(path)
        log.info("[%d/%d] %s: verifying against PyTorch with ONNX Runtime at %s", i, len(todo), name, verify_dims)
        t1 = time.perf_counter()
        ver = verify_onnx(module, specs[name], path, dims=verify_dims, precision=dtype, device=device,
                          fp32_expected=reference)
        t_verify = time.perf_counter() - t1
        if name in LORA_COMPONENTS:  # while the module holds the weights exactly as exported
            weight_map.components[name] = onnx_weight_map(
                lora_modules(base_m)[name], module, path, onnx_sha256=sha256_file(path),
                sample=_sample(specs[name], dtype, device))
        data_file = path.with_name(path.name + ".data")
        entries[name] = ExportedComponent(
            file=path.name,
            external_data=data_file.name if data_file.exists() else None,
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0),
            precision=prec,
            settings=settings_key(name, prec, identities[name]),
            export_seconds=round(t_export, 3),
            verify_seconds=round(t_verify, 3),
            verify_dims=ver.dims,
            relative_error=ver.relative_error,
            max_abs_error=ver.max_abs_error,
            fp32_relative_error=ver.fp32_relative_error,
        )
        log.info("[%d/%d] %s: done in %.1f s, relative error %.2e", i, len(todo), name,
                 t_export + t_verify, ver.worst_relative_error)
        module.to(dtype=torch.float32)
    for name in unmapped:  # exported before weight maps existed: map the file already there
        module = modules[name].to(device=device, dtype=io_dtype(_precision(name, precision, vae_fp16_safe)))
        weight_map.components[name] = onnx_weight_map(
            lora_modules(base_m)[name], module, out / entries[name].file, onnx_sha256=entries[name].sha256,
            sample=_sample(specs[name], module_dtype(module), device))
        module.to(dtype=torch.float32)
    weight_map.components = {k: v for k, v in weight_map.components.items() if k in wanted}
    weight_map.save(out / WEIGHT_MAP)

    copy_runtime_assets(base_m, ref_m, out)
    result = ExportResult(
        model=model_entry(base_m, model_identity, fused, base_identity),
        refiner=model_entry(ref_m, refiner_identity) if ref_m and refiner_identity else None,
        precision=precision,
        vae_precision=_precision("vae_decoder", precision, vae_fp16_safe),
        model_dims=dims,
        native_buckets=[str(b) for b in buckets] if buckets else None,
        pipeline=pipeline_entry(base_m, ref_m),
        versions=library_versions(),
        device=current_device(),
        components={k: entries[k] for k in wanted if k in entries},
        controlnets=cn_entries,
        weight_map=WEIGHT_MAP,
        assets_dir=out,
    )
    result.save(out)
    return result


def controlnet_entries(model: str, model_config: str | None,
                       controlnets: Sequence[ControlNetSpec]) -> dict[str, dict[str, Any]]:
    """Per ControlNet NAME: its source, identity and config summary, each config checked against the base UNet
    (configs only, so a misfit is refused before anything is written or loaded)."""
    configs = check_controlnets(model, model_config, controlnets) if controlnets else {}
    return {s.name: {"source": controlnet_source(s), "identity_hash": controlnet_identity(s, configs[s.name]),
                     "config": config_summary(configs[s.name])} for s in controlnets}


def with_controlnet_residuals(dims: ModelDims, unet_config: Any, controlnets: Sequence[ControlNetSpec]) -> ModelDims:
    """``dims`` with the base UNet's residual shapes when the build has ControlNets (else unchanged)."""
    return replace(dims, controlnet_residuals=controlnet_residuals(unet_config) if controlnets else ())


def model_entry(m: LoadedModel, identity: str, loras: list[dict[str, Any]] | None = None,
                 fused: str | None = None) -> dict[str, Any]:
    """``identity_hash`` is the model's own (the load check compares it with the files); with LoRAs fused,
    ``loras`` lists them and ``fused_identity`` is what staleness is decided on."""
    entry: dict[str, Any] = {"name": m.name, "kind": m.kind, "source": m.source, "identity_hash": identity}
    if loras:
        entry.update(loras=loras, fused_identity=fused)
    return entry


def _sample(spec: Any, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Small inputs for the weight map's autograd check of unused weights."""
    inputs = sample_inputs(spec, {"B": 1, "S": TOKENS_PER_CHUNK, "h": 16, "w": 16}, dtype, device=device, seed=3)
    return [inputs[n] for n in spec.input_names]


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _read_weight_map(out: Path) -> WeightMap:
    """The weight map beside earlier exports, or an empty one (missing or unreadable: mapped again)."""
    try:
        return WeightMap.load(out / WEIGHT_MAP)
    except Exception:  # noqa: BLE001 - any problem means: map again
        return WeightMap()


def _unmapped_components(weight_map: WeightMap, wanted: Sequence[str], entries: dict[str, ExportedComponent],
                         todo: Sequence[str]) -> list[str]:
    """Up-to-date LoRA components whose ONNX the weight map does not describe (exported by an older sdxl-trt)."""
    return [c for c in wanted if c in LORA_COMPONENTS and c not in todo and c in entries
            and (c not in weight_map.components or weight_map.components[c].onnx_sha256 != entries[c].sha256)]


def copy_runtime_assets(base: LoadedModel, refiner: LoadedModel | None, out: Path) -> None:
    """Tokenizers and the scheduler config travel with the ONNX (the runtime needs no model directory)."""
    for sub in ("tokenizer", "tokenizer_2", "scheduler"):
        if (base.config_dir / sub).is_dir():
            replace_tree(base.config_dir / sub, out / sub)
    if refiner is not None and (refiner.config_dir / "scheduler").is_dir():
        replace_tree(refiner.config_dir / "scheduler", out / "refiner_scheduler")


def format_export_table(result: ExportResult) -> str:
    """The verification table the CLI prints."""
    rows = [("component", "precision", "size", "export s", "verify s", "rel. error", "vs PyTorch fp32")]
    for name, e in result.components.items():
        vs32 = e.fp32_relative_error if e.fp32_relative_error is not None else e.relative_error
        rows.append((
            name, e.precision, human_bytes(e.size_bytes), f"{e.export_seconds:.1f}", f"{e.verify_seconds:.1f}",
            f"{max(e.relative_error.values()):.2e}", f"{max(vs32.values()):.2e}",
        ))
    return format_table(rows) + (
        "\nrel. error: worst output against PyTorch in the file's precision (the export itself); vs PyTorch fp32: "
        "against the fp32 model (what the precision costs; the same figure for fp32 files)")


def pipeline_entry(base: LoadedModel, ref: LoadedModel | None) -> dict[str, Any]:
    return {
        "vae_scaling_factor": float(base.vae.config.scaling_factor),
        "vae_scale": VAE_SCALE,
        **base.options,
        "refiner_requires_aesthetics_score": bool(ref.options.get("requires_aesthetics_score", True)) if ref else None,
    }
