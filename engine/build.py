"""``sdxl-trt build``: export what is missing or stale, then build each component's engine.

The directory's layout and manifest are the ground floor's (:mod:`sdxl_trt.engine_dir`): this module
writes them, the runtime reads them.

A component is rebuilt only when its source (ONNX hash, or the model identity for torch), precision,
profiles or backend changed, or its file no longer matches the manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trt.buckets import SDXL_BUCKETS, Bucket, check_bucket_divisible, parse_buckets
from sdxl_trt.contracts import ModelDims, component_specs, contract_of, controlnet_component, controlnet_names
from sdxl_trt.engine_dir.environment import library_versions, sha256_file
from sdxl_trt.engine_dir.layout import BACKENDS, RUNTIME_ASSETS, TIMING_CACHE_NAME, WEIGHT_MAP_NAME
from sdxl_trt.engine_dir.manifest import ComponentEntry, Manifest
from sdxl_trt.engine_dir.profiles import Profile, component_profiles
from sdxl_trt.errors import BackendUnavailableError, BuildError
from sdxl_trt.identity import model_identity_hash
from sdxl_trt.lora import LoraSpec
from sdxl_trt.tables import human_bytes

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BuildOptions:
    model: str = "tiny"
    out: Path = Path("engines")
    refiner: str | None = None
    backend: str | None = None  # None: tensorrt if usable, else onnxruntime
    precision: str | None = None  # None: fp16 on a GPU, fp32 on the CPU
    buckets: str = "all"
    max_batch: int = 1
    profile_mode: str = "per-bucket"
    max_prompt_chunks: int = 3
    device: str = "cpu"  # where PyTorch runs for export
    model_config: str | None = None
    workspace_gib: float | None = None
    refittable: bool = False
    weight_streaming: bool = False
    compile_torch: bool = False
    calibration_prompts: int = 32  # INT8: prompts from engine/data/calibration_prompts.txt (2 UNet calls sampled each)
    calibration_steps: int = 20  # INT8: denoising steps per calibration prompt (the schedule samples are spread over)
    calibration_backend: str = "torch"  # INT8: "torch" (hooks, bounded memory) or "onnxruntime" (ORT calibrator)
    build_command: str = ""
    loras: tuple[str, ...] = ()  # --lora PATH[:SCALE]: fused into the base model before export and calibration
    controlnets: tuple[str, ...] = ()  # --controlnet PATH[:NAME] / PRESET[:NAME]: engines controlnet.NAME, and a
    # UNet that takes their residuals (costs one ControlNet call per step each, only when a request asks)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def resolve_backend(requested: str | None) -> str:
    """The backend to use; the default is stated in the log so a fallback is never silent."""
    if requested is not None:
        if requested not in BACKENDS:
            raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        if requested == "tensorrt":
            from .tensorrt_backend import require_tensorrt

            require_tensorrt()
        return requested
    from .tensorrt_backend import tensorrt_status

    ok, why = tensorrt_status()
    if ok:
        log.info("backend: tensorrt (importable, CUDA GPU present)")
        return "tensorrt"
    log.warning("backend: onnxruntime, because TensorRT is not usable here (%s); pass --backend to choose", why)
    return "onnxruntime"


def resolve_precision(backend: str, requested: str | None) -> str:
    gpu = cuda_available()
    precision = requested or ("fp16" if gpu else "fp32")
    if backend == "torch" and precision == "int8":
        raise BuildError("--precision int8 is for tensorrt and onnxruntime engines (explicit Q/DQ); "
                         "use fp16 or fp32 with --backend torch")
    if backend in ("onnxruntime", "torch") and precision == "fp16" and not gpu:
        raise BuildError(f"--precision fp16 with --backend {backend} needs a CUDA GPU (CPU kernels for fp16 are "
                         "missing or slow); use --precision fp32 on this machine")
    return precision


def _components(refiner: str | None, controlnets: list[str] | None = None) -> list[str]:
    return ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", *(["refiner"] if refiner else []),
            *(controlnet_component(n) for n in controlnets or [])]


def _previous_manifest(out: Path) -> Manifest | None:
    try:
        return Manifest.load(out)
    except Exception:  # noqa: BLE001 - any unreadable manifest means: rebuild everything
        return None


def _fresh(prev: Manifest | None, out: Path, name: str, entry_key: dict[str, Any], backend: str) -> bool:
    if prev is None or prev.backend != backend or name not in prev.components:
        return False
    e = prev.components[name]
    if (e.source_hash, e.precision, e.profiles) != (entry_key["source_hash"], entry_key["precision"], entry_key["profiles"]):
        return False
    path = out / e.file
    return path.exists() and path.stat().st_size == e.size_bytes and sha256_file(path) == e.sha256


def build_engines(opts: BuildOptions) -> Manifest:
    """Build (or bring up to date) every engine in ``opts.out``; returns the saved manifest."""
    backend = resolve_backend(opts.backend)  # raises before anything is written
    precision = resolve_precision(backend, opts.precision)
    lora_specs = [LoraSpec.parse(s) for s in opts.loras]  # a bad --lora is refused before anything is written
    cn_specs = _controlnet_specs(opts, precision)  # and so is a ControlNet that does not fit the model
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    components = _components(opts.refiner, [s.name for s in cn_specs])
    onnx_dir = out / "onnx"
    t_start = time.perf_counter()

    loaded = None
    if backend == "torch":
        export_info = _torch_model_info(opts)
    else:
        from sdxl_trt.export.exporter import export_model

        export_precision = "fp16" if precision == "fp16" else "fp32"
        log.info("export: %s -> %s (%s)", opts.model, onnx_dir, export_precision)
        export_info = export_model(opts.model, out=onnx_dir, refiner=opts.refiner, precision=export_precision,
                                   device=opts.device, model_config=opts.model_config, loras=lora_specs,
                                   controlnets=cn_specs)
    dims = ModelDims.from_json(export_info["model_dims"])
    specs = component_specs(dims, [s.name for s in cn_specs])
    native = [Bucket.parse(b) for b in export_info.get("native_buckets") or []] or list(SDXL_BUCKETS)
    buckets = parse_buckets(opts.buckets, default=native)
    for b in buckets:
        check_bucket_divisible(b, dims.latent_multiple)

    prev = _previous_manifest(out)
    manifest = Manifest(
        backend=backend, precision=precision, model=export_info["model"], refiner=export_info.get("refiner"),
        model_dims=dims.to_json(), buckets=[str(b) for b in buckets], max_batch=opts.max_batch,
        max_prompt_chunks=opts.max_prompt_chunks, profile_mode=opts.profile_mode, pipeline=export_info["pipeline"],
        build_command=opts.build_command or _default_build_command(opts, out, backend),
        versions=library_versions(),
    )
    for i, name in enumerate(components, 1):
        profiles = component_profiles(specs[name], buckets=buckets, max_batch=opts.max_batch,
                                      mode=opts.profile_mode,  # type: ignore[arg-type]
                                      max_prompt_chunks=opts.max_prompt_chunks)
        comp_precision = _component_precision(name, precision, backend, opts.device)
        source_hash = _source_hash(backend, name, export_info, onnx_dir, comp_precision, bool(cn_specs))
        key: dict[str, Any] = {"source_hash": source_hash, "precision": comp_precision, "profiles": [p.to_json() for p in profiles]}
        if _fresh(prev, out, name, key, backend):
            log.info("[%d/%d] %s: up to date", i, len(components), name)
            assert prev is not None
            manifest.components[name] = prev.components[name]
            continue
        log.info("[%d/%d] %s: building %s %s engine (%d profile%s)", i, len(components), name, backend,
                 comp_precision, len(profiles), "" if len(profiles) == 1 else "s")
        t0 = time.perf_counter()
        if backend == "onnxruntime":
            info = _build_onnxruntime(name, comp_precision, onnx_dir, out, opts, export_info)
        elif backend == "tensorrt":
            info = _build_tensorrt(name, comp_precision, specs, profiles, onnx_dir, out, opts, export_info)
        else:
            if loaded is None:
                loaded = _load_for_torch(opts)
            info = _build_torch(name, comp_precision, specs, profiles, out, opts, loaded)
        path = out / info.pop("file")
        manifest.components[name] = ComponentEntry(
            file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, precision=comp_precision,
            profiles=key["profiles"], source_hash=source_hash, build_seconds=round(time.perf_counter() - t0, 3),
            export_error=info.pop("export_error", None)
            or export_info.get("components", {}).get(name, {}).get("relative_error", {}),
            extra={**_controlnet_extra(name, export_info), **info},
        )
        log.info("[%d/%d] %s: built in %.1f s (%s)", i, len(components), name,
                 manifest.components[name].build_seconds, human_bytes(manifest.components[name].size_bytes))
    _drop_old_controlnets(prev, manifest, out)
    _copy_assets(onnx_dir if backend != "torch" else Path(export_info["assets_dir"]), out)
    _save_weight_map(onnx_dir, out, loaded)
    manifest.save(out)
    log.info("build finished in %.1f s", time.perf_counter() - t_start)
    return manifest


def _controlnet_specs(opts: BuildOptions, precision: str) -> list[Any]:
    """The parsed ``--controlnet`` values, each checked against the base model's UNet config (no weights read,
    nothing written). INT8 is refused: the UNet's calibration never saw residuals, so its activation ranges
    would clip what a ControlNet adds."""
    if not opts.controlnets:
        return []
    if precision == "int8":
        raise BuildError("--controlnet with --precision int8 is not supported: the UNet's INT8 ranges are calibrated "
                         "without ControlNet residuals and would clip them; rebuild with --precision fp16")
    from sdxl_trt.export.controlnet import check_controlnets, parse_controlnets

    specs = parse_controlnets(opts.controlnets)
    check_controlnets(opts.model, opts.model_config, specs)
    return specs


def _default_build_command(opts: BuildOptions, out: Path, backend: str) -> str:
    return " ".join([f"sdxl-trt build --model {opts.model} --out {out} --backend {backend}",
                     *(f"--controlnet {c}" for c in opts.controlnets)])


def _controlnet_extra(name: str, export_info: dict[str, Any]) -> dict[str, Any]:
    """A ControlNet engine's manifest ``extra``: its source, identity and config summary."""
    if contract_of(name) != "controlnet":
        return {}
    entry = export_info.get("controlnets", {})[controlnet_names([name])[0]]
    return {"controlnet": entry}


def _drop_old_controlnets(prev: Manifest | None, manifest: Manifest, out: Path) -> None:
    """A rebuild without a ControlNet the directory had: its engine file goes with its manifest entry."""
    for name, entry in (prev.components.items() if prev else []):
        if contract_of(name) == "controlnet" and name not in manifest.components:
            log.info("%s: no longer built; removing %s", name, entry.file)
            (out / entry.file).unlink(missing_ok=True)


def _component_precision(name: str, precision: str, backend: str, device: str = "cpu") -> str:
    """The SDXL VAE overflows in fp16, so it runs in bf16 (fp32's range at 16-bit speed) where the torch
    backend builds on a GPU that has bf16, else in fp32; INT8 applies to the UNets only."""
    if name in ("vae_decoder", "vae_encoder"):
        return "bf16" if precision in ("fp16", "int8") and backend == "torch" and _bf16_device(device) else "fp32"
    if precision == "int8" and name not in ("unet",):
        return "fp16" if backend == "tensorrt" else "fp32"
    return precision


def _bf16_device(device: str) -> bool:
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _source_hash(backend: str, name: str, export_info: dict[str, Any], onnx_dir: Path, precision: str,
                 controlled: bool = False) -> str:
    if backend == "torch":
        if contract_of(name) == "controlnet":
            return f"{export_info['controlnets'][controlnet_names([name])[0]]['identity_hash']}:{precision}"
        entry = export_info["refiner" if name == "refiner" else "model"]
        ident = entry.get("fused_identity") or entry["identity_hash"]  # fused LoRAs make another model
        residuals = "+controlnet-residuals" if controlled and name == "unet" else ""  # another program's inputs
        return f"{ident}{residuals}:{precision}"
    return export_info["components"][name]["sha256"]


def _build_onnxruntime(name: str, precision: str, onnx_dir: Path, out: Path, opts: BuildOptions,
                       export_info: dict[str, Any]) -> dict[str, Any]:
    from .onnxruntime_backend import build_onnxruntime_engine

    src = onnx_dir / f"{name}.onnx"
    info: dict[str, Any] = {}
    if precision == "int8":
        src, info = _quantize_unet(onnx_dir, opts)
    dst = out / f"{name}.onnx"
    info.update(build_onnxruntime_engine(src, dst))
    return {"file": dst.name, **info}


def _quantize_unet(onnx_dir: Path, opts: BuildOptions) -> tuple[Path, dict[str, Any]]:
    """Explicit INT8 (Q/DQ) UNet from calibration on the shipped prompt set (engine/int8/__init__.py).

    The model is loaded inside the INT8 step and dropped before the Q/DQ file is written, so the build's peak
    host memory is the larger of the two, not their sum."""
    from .int8 import build_int8_unet

    out = onnx_dir / "unet.int8.onnx"
    native = json.loads((onnx_dir / "manifest.json").read_text()).get("native_buckets") or [str(SDXL_BUCKETS[0])]
    b = parse_buckets(opts.buckets, default=[Bucket.parse(x) for x in native])[0]
    log.info("int8: calibrating the UNet on %d prompts x %d steps at %s (%s ranges)", opts.calibration_prompts,
             opts.calibration_steps, b, opts.calibration_backend)
    report = build_int8_unet(lambda: _load_base(opts),
                             onnx_dir / "unet.onnx", out, num_prompts=opts.calibration_prompts,
                             steps=opts.calibration_steps, width=b.width, height=b.height,
                             backend=opts.calibration_backend)  # type: ignore[arg-type]
    log.info("%s", report.summary())
    return out, {"int8": report.to_json()}


def _build_tensorrt(name: str, precision: str, specs: dict, profiles: list[Profile], onnx_dir: Path, out: Path,
                    opts: BuildOptions, export_info: dict[str, Any]) -> dict[str, Any]:
    from .tensorrt_backend import TensorRTBuildConfig, build_engine

    src = onnx_dir / f"{name}.onnx"
    extra: dict[str, Any] = {}
    if precision == "int8":
        src, extra = _quantize_unet(onnx_dir, opts)
    config = TensorRTBuildConfig(
        precision=precision,  # type: ignore[arg-type]
        strongly_typed=True if export_info.get("precision") == "fp16" else None,  # fp16 ONNX decides dtypes
        workspace_gib=opts.workspace_gib, timing_cache=out / TIMING_CACHE_NAME, refittable=opts.refittable,
        weight_streaming=opts.weight_streaming,
    )
    plan = out / f"{name}.plan"
    info = build_engine(src, plan, spec=specs[name], profiles=profiles, config=config)
    return {"file": plan.name, **extra, **info}


def _torch_model_info(opts: BuildOptions) -> dict[str, Any]:
    """What the torch backend records without exporting ONNX: identity, widths, assets."""
    from sdxl_trt.export.controlnet import parse_controlnets
    from sdxl_trt.export.exporter import model_summary

    return model_summary(opts.model, refiner=opts.refiner, model_config=opts.model_config,
                         loras=[LoraSpec.parse(s) for s in opts.loras],
                         controlnets=parse_controlnets(opts.controlnets))


def _load_base(opts: BuildOptions, **kwargs: Any) -> Any:
    """The base model as the engines will hold it: loaded, with ``--lora`` fused (torch programs and INT8
    calibration see the same weights as the ONNX export)."""
    from sdxl_trt.export.loading import load_model
    from sdxl_trt.export.lora_fusion import fuse_loras

    model = load_model(opts.model, config=opts.model_config, device=opts.device, **kwargs)
    fuse_loras(model, [LoraSpec.parse(s) for s in opts.loras])
    return model


def _load_for_torch(opts: BuildOptions) -> Any:
    """(base, refiner, {controlnet.NAME: ControlNetModel}) in fp32 for the torch backend."""
    import torch

    from sdxl_trt.export.controlnet import load_controlnet, parse_controlnets
    from sdxl_trt.export.loading import load_model

    base = _load_base(opts, dtype=torch.float32)
    ref = load_model(opts.refiner, dtype=torch.float32, device=opts.device) if opts.refiner else None
    controlnets = {controlnet_component(s.name): load_controlnet(s.source, base_unet=dict(base.unet.config),
                                                                  device=opts.device)
                   for s in parse_controlnets(opts.controlnets)}
    return base, ref, controlnets


def _build_torch(name: str, precision: str, specs: dict, profiles: list[Profile], out: Path, opts: BuildOptions,
                 loaded: Any) -> dict[str, Any]:
    import torch

    from sdxl_trt.export.exporter import with_controlnet_residuals
    from sdxl_trt.export.loading import model_dims
    from sdxl_trt.export.wrappers import wrap_components

    from .torch_backend import build_torch_engine, dim_multiples_for

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    base, refiner, controlnets = loaded
    module = wrap_components(base, refiner, controlnets=controlnets)[name].to(device=opts.device, dtype=dtype)
    path = out / f"{name}.pt2"
    dims = with_controlnet_residuals(model_dims(base, refiner), base.unet.config, list(controlnets))
    info = build_torch_engine(module, specs[name], path, profiles=profiles, precision=dtype, device=opts.device,
                              dim_multiples=dim_multiples_for(name, dims),
                              compile_shapes=_compile_shapes(name, profiles, opts) if opts.compile_torch else None)
    return {"file": path.name, "export_error": _verify_torch_engine(module, specs[name], path, profiles, dtype, opts),
            **info}


def _verify_torch_engine(module: Any, spec: Any, path: Path, profiles: list[Profile], dtype: Any,
                         opts: BuildOptions) -> dict[str, float]:
    """The saved program against the PyTorch module on random inputs at the first profile's optimum:
    the torch backend's counterpart of the ONNX export check."""
    import torch

    from sdxl_trt.engine_dir.torch_program import load_program
    from sdxl_trt.export.onnx_export import sample_inputs

    program = load_program(path, spec, device=opts.device)
    dims = {n: r.opt for n, r in profiles[0].dims.items()}
    inputs = sample_inputs(spec, dims, dtype, device=opts.device, seed=1)
    got = dict(zip(spec.output_names, program(spec, inputs), strict=True))
    with torch.inference_mode():
        expected = module(*(inputs[n] for n in spec.input_names))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    return {name: float((got[name].double() - e.double()).norm() / e.double().norm().clamp_min(1e-30))
            for name, e in zip(spec.output_names, expected, strict=True)}


def _compile_shapes(name: str, profiles: list[Profile], opts: BuildOptions) -> list[dict[str, int]]:
    """The shapes a service runs, compiled once at build time (each costs minutes at full size):
    every bucket at one image and at --max-batch images (x2 for guidance in the UNets)."""
    shapes = []
    for p in profiles:
        for images in sorted({1, opts.max_batch}):
            b = 2 * images if contract_of(name) in ("unet", "refiner", "controlnet") else images
            if name in ("text_encoder", "text_encoder_2"):
                shapes.append({"B": 2})  # one prompt chunk, positive and negative
                break
            shapes.append({"B": b, "h": p.dims["h"].opt, "w": p.dims["w"].opt} | ({"S": 77} if "S" in p.dims else {}))
    return [dict(t) for t in {tuple(sorted(s.items())) for s in shapes}]


def _save_weight_map(onnx_dir: Path, out: Path, loaded: Any) -> None:
    """``weight_map.json`` beside the engines: the export's (ONNX and torch names), or for torch engines the
    torch names of the modules just built (a directory with nothing rebuilt keeps the map it has)."""
    if (onnx_dir / WEIGHT_MAP_NAME).exists():
        shutil.copyfile(onnx_dir / WEIGHT_MAP_NAME, out / WEIGHT_MAP_NAME)
    elif loaded is not None:
        from sdxl_trt.export.weight_map import component_weight_maps
        from sdxl_trt.export.wrappers import wrap_components
        from sdxl_trt.lora.weight_map import WeightMap

        base, refiner, controlnets = loaded
        wrapped = wrap_components(base, refiner, controlnets=controlnets)
        WeightMap(component_weight_maps(base, wrapped)).save(out / WEIGHT_MAP_NAME)


def _copy_assets(src_dir: Path, out: Path) -> None:
    for sub in RUNTIME_ASSETS:
        src = src_dir / sub
        if src.is_dir():
            dst = out / sub
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)


__all__ = ["BuildOptions", "build_engines", "resolve_backend",
           "BackendUnavailableError", "model_identity_hash"]
