"""``sdxl-trt build``: export what is missing or stale, then build each component's engine.

The directory's layout and manifest are the ground floor's (:mod:`sdxl_trt.engine_dir`): this module
writes them, the runtime reads them. The work is split along its seams:

* :mod:`.options`: the options, and the backend and model-wide precision chosen before anything is written;
* :mod:`.builder`: the one protocol every backend implements (a source to build from, a builder per component);
* :mod:`.onnx_source` (tensorrt, onnxruntime) and :mod:`.torch_backend` (torch): the sources;
* :mod:`.freshness`: which components are up to date (rebuilt only when source, precision, profiles, backend
  or contract version changed, or the file no longer matches the manifest).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sdxl_trt.buckets import SDXL_BUCKETS, Bucket, check_bucket_divisible, parse_buckets
from sdxl_trt.contracts import (
    CONTROLNET,
    build_components,
    component_precision,
    component_specs,
    contract_of,
    controlnet_names,
)
from sdxl_trt.engine_dir.environment import library_versions, sha256_file
from sdxl_trt.engine_dir.layout import RUNTIME_ASSETS
from sdxl_trt.engine_dir.manifest import ComponentEntry, Manifest
from sdxl_trt.engine_dir.profiles import component_profiles
from sdxl_trt.errors import BackendUnavailableError, BuildError
from sdxl_trt.files import replace_tree
from sdxl_trt.identity import model_identity_hash
from sdxl_trt.lora import LoraSpec
from sdxl_trt.tables import human_bytes

from .builder import Builder, BuildSource
from .freshness import BuildKey, drop_old_controlnets, is_fresh, previous_manifest
from .options import BuildOptions, bf16_device, resolve_backend, resolve_precision

log = logging.getLogger(__name__)


def build_engines(opts: BuildOptions) -> Manifest:
    """Build (or bring up to date) every engine in ``opts.out``; returns the saved manifest."""
    backend = resolve_backend(opts.backend)  # raises before anything is written
    precision = resolve_precision(backend, opts.precision, fp8_attention=opts.fp8_attention)
    lora_specs = [LoraSpec.parse(s) for s in opts.loras]  # a bad --lora is refused before anything is written
    cn_specs = _controlnet_specs(opts, precision)  # and so is a ControlNet that does not fit the model
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    components = build_components(refiner=opts.refiner is not None, controlnets=[s.name for s in cn_specs],
                                  deepcache=opts.deepcache)
    t_start = time.perf_counter()

    source, builder = _backend(backend, opts, out, precision, lora_specs, cn_specs)
    export = source.export
    specs = component_specs(export.model_dims, [s.name for s in cn_specs])
    native = [Bucket.parse(b) for b in export.native_buckets or []] or list(SDXL_BUCKETS)
    buckets = parse_buckets(opts.buckets, default=native)
    for b in buckets:
        check_bucket_divisible(b, export.model_dims.latent_multiple)
    bf16 = bf16_device(opts.device)

    prev = previous_manifest(out)
    manifest = Manifest(
        backend=backend, precision=precision, model=export.model, refiner=export.refiner,
        model_dims=export.model_dims.to_json(), buckets=[str(b) for b in buckets], max_batch=opts.max_batch,
        max_prompt_chunks=opts.max_prompt_chunks, profile_mode=opts.profile_mode, pipeline=export.pipeline,
        build_command=opts.build_command or _default_build_command(opts, out, backend),
        versions=library_versions(),
    )
    for i, name in enumerate(components, 1):
        profiles = component_profiles(specs[name], buckets=buckets, max_batch=opts.max_batch,
                                      mode=opts.profile_mode,  # type: ignore[arg-type]
                                      max_prompt_chunks=opts.max_prompt_chunks)
        comp_precision = component_precision(name, precision, backend=backend, bf16_device=bf16)
        key = BuildKey(source.source_hash(name, comp_precision), comp_precision, [p.to_json() for p in profiles])
        if is_fresh(prev, out, name, key, backend):
            log.info("[%d/%d] %s: up to date", i, len(components), name)
            assert prev is not None
            manifest.components[name] = prev.components[name]
            continue
        log.info("[%d/%d] %s: building %s %s engine (%d profile%s)", i, len(components), name, backend,
                 comp_precision, len(profiles), "" if len(profiles) == 1 else "s")
        t0 = time.perf_counter()
        built = builder.build(name, precision=comp_precision, spec=specs[name], profiles=profiles, out=out)
        path = out / built.file
        manifest.components[name] = ComponentEntry(
            file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, precision=comp_precision,
            profiles=key.profiles, source_hash=key.source_hash, build_seconds=round(time.perf_counter() - t0, 3),
            export_error=built.export_error or export.relative_error(name),
            extra={**_controlnet_extra(name, export.controlnets), **built.info},
        )
        log.info("[%d/%d] %s: built in %.1f s (%s)", i, len(components), name,
                 manifest.components[name].build_seconds, human_bytes(manifest.components[name].size_bytes))
    drop_old_controlnets(prev, manifest, out)
    if export.assets_dir is not None:
        _copy_assets(export.assets_dir, out)
    source.save_weight_map(out)
    manifest.save(out)
    log.info("build finished in %.1f s", time.perf_counter() - t_start)
    return manifest


def _backend(backend: str, opts: BuildOptions, out: Path, precision: str, loras: list[LoraSpec],
             controlnets: list[Any]) -> tuple[BuildSource, Builder]:
    """The backend's source (exported or summarised now, before any engine) and its builder."""
    if backend == "torch":
        from sdxl_trt.export.controlnet import parse_controlnets
        from sdxl_trt.export.summary import model_summary

        from .torch_backend import TorchBuilder

        torch_builder = TorchBuilder(opts, model_summary(opts.model, refiner=opts.refiner,
                                                         model_config=opts.model_config, loras=loras,
                                                         controlnets=parse_controlnets(opts.controlnets),
                                                         deepcache=opts.deepcache))
        return torch_builder, torch_builder
    from .onnx_source import OnnxExport

    source = OnnxExport.run(opts, out, precision, loras=loras, controlnets=controlnets, backend=backend)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBuilder

        return source, TensorRTBuilder(source, opts)
    from .onnxruntime_backend import OnnxRuntimeBuilder

    return source, OnnxRuntimeBuilder(source)


def _controlnet_specs(opts: BuildOptions, precision: str) -> list[Any]:
    """The parsed ``--controlnet`` values, each checked against the base model's UNet config (no weights read,
    nothing written). INT8 is refused: the UNet's calibration never saw residuals, so its activation ranges
    would clip what a ControlNet adds."""
    if opts.deepcache and opts.controlnets:
        raise BuildError("--deepcache and --controlnet cannot be combined: DeepCache's shallow steps skip the blocks "
                         "a ControlNet's residuals feed; build them into separate engine directories")
    if opts.deepcache and precision in ("int8", "fp8"):
        raise BuildError(f"--deepcache with --precision {precision} is not supported: the UNet's "
                         f"{precision.upper()} ranges are calibrated without the cached features and the shallow "
                         "UNets; rebuild with --precision fp16")
    if not opts.controlnets:
        return []
    if precision in ("int8", "fp8"):
        raise BuildError(f"--controlnet with --precision {precision} is not supported: the UNet's {precision.upper()} "
                         "ranges are calibrated without ControlNet residuals and would clip them; rebuild with "
                         "--precision fp16")
    from sdxl_trt.export.controlnet import check_controlnets, parse_controlnets

    specs = parse_controlnets(opts.controlnets)
    check_controlnets(opts.model, opts.model_config, specs)
    return specs


def _default_build_command(opts: BuildOptions, out: Path, backend: str) -> str:
    """The rebuild command for API callers (the CLI records its own argv): what decides the files' contents."""
    return " ".join([f"sdxl-trt build --model {opts.model} --out {out} --backend {backend}",
                     *([f"--precision {opts.precision}"] if opts.precision else []),
                     *(["--fp8-attention"] if opts.fp8_attention else []),
                     *(f"--controlnet {c}" for c in opts.controlnets),
                     *([f"--deepcache {','.join(map(str, sorted(set(opts.deepcache))))}"] if opts.deepcache else [])])


def _controlnet_extra(name: str, controlnets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A ControlNet engine's manifest ``extra``: its source, identity and config summary."""
    if contract_of(name) != CONTROLNET:
        return {}
    return {"controlnet": controlnets[controlnet_names([name])[0]]}


def _copy_assets(src_dir: Path, out: Path) -> None:
    for sub in RUNTIME_ASSETS:
        if (src_dir / sub).is_dir():
            replace_tree(src_dir / sub, out / sub)


__all__ = ["BuildOptions", "build_engines", "resolve_backend",
           "BackendUnavailableError", "model_identity_hash"]
