"""torch backend, build side: save a wrapped component with ``torch.export`` (and optionally warm Inductor).

What a torch engine is:

* ``<component>.pt2``: the component's ``ExportedProgram`` (ATen graph + weights), saved with
  ``torch.export.save``. Loading it needs torch only: no diffusers, no transformers, no Python source of
  the model (:func:`~sdxl_trt.engine_dir.torch_program.load_program` reads it, here to verify and compile,
  in the runtime to serve).
* ``<component>.inductor-cache.bin`` (optional, ``compile_shapes``): torch's portable compile cache
  (``torch.compiler.save_cache_artifacts``) for the (bucket, batch) shapes compiled at build time. A
  service that loads it before compiling gets Inductor cache hits instead of full compiles (on the H100:
  21 s instead of about 135-160 s per shape of the base UNet; see SDXL_FACTS.md).

Dynamic shapes come from the contract's named dimensions, bounded by the profiles' overall min and max
(:mod:`.torch_shapes`). :class:`TorchBuilder` is this backend's :class:`~.builder.Builder`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdxl_trt.contracts import (
    STEP_FAMILIES,
    TOKENS_PER_CHUNK,
    WARMUP_PROMPT_CHUNKS,
    ComponentSpec,
    family_of,
    io_dtype,
)
from sdxl_trt.engine_dir.layout import EXTENSIONS, WEIGHT_MAP_NAME, cache_artifacts_path, engine_file_name
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.engine_dir.torch_program import load_program
from sdxl_trt.errors import BuildError
from sdxl_trt.export.result import ExportResult
from sdxl_trt.files import atomic_path, write_atomic

from .builder import BuiltEngine
from .models import TorchModels
from .options import BuildOptions
from .torch_shapes import (
    ExportRange,
    dim_multiples_for,
    dynamic_shapes_for,
    example_dims,
    export_dims,
    export_ranges,
    multiples_from_suggested_fixes,
)

log = logging.getLogger(__name__)

ENGINE_SUFFIX = EXTENSIONS["torch"]

def _example_inputs(
    spec: ComponentSpec, values: Mapping[str, int], precision: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs in each tensor's domain (timesteps in [0, 1000), token ids below 1000: inside any CLIP
    vocabulary). The graph does not depend on the values; they only have to be valid."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = t.shape(values)
        dtype = t.torch_dtype(precision)
        if dtype.is_floating_point:
            x = torch.rand(shape, generator=g) * 999 if t.name == "timestep" else torch.randn(shape, generator=g)
        else:
            x = torch.randint(0, 1000, shape, generator=g)
        out.append(x.to(device=device, dtype=dtype))
    return tuple(out)


def _check_module(module: nn.Module, spec: ComponentSpec, precision: torch.dtype, device: torch.device) -> None:
    """The caller casts and places the module: a wrapped VAE is shared by decoder and encoder, so moving it
    here would change the caller's other components behind its back."""
    for pname, p in module.named_parameters():
        if p.device.type != device.type:
            raise BuildError(f"{spec.name}: parameter {pname} is on {p.device} but device is {device}; call .to({str(device)!r})")
        if p.is_floating_point() and p.dtype != precision:
            raise BuildError(
                f"{spec.name}: parameter {pname} is {p.dtype} but precision is {precision}; "
                f"cast the module first (module.to(dtype={precision}))"
            )


def build_torch_engine(
    module: nn.Module,
    spec: ComponentSpec,
    out_path: Path,
    *,
    profiles: Sequence[Profile],
    precision: torch.dtype,
    device: str | torch.device,
    dim_multiples: Mapping[str, int] | None = None,
    compile_shapes: Sequence[Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Export ``module`` (a wrapper from export/wrappers.py, already in ``precision`` on ``device``) to
    ``out_path`` (``.pt2``) with dynamic shapes covering every profile; return the build info.

    ``dim_multiples``: divisibility the network needs, e.g. ``dim_multiples_for("unet", dims)``. When
    None, torch.export's own suggested fixes supply it, at the cost of a second trace for the UNets.
    ``compile_shapes``: named-dimension values (``{"B": 2, "h": 128, "w": 128, "S": 77}``; a missing
    dimension takes the opt of the first profile) to compile with Inductor now; their portable cache is
    saved at :func:`cache_artifacts_path`. Each shape costs a full compile (minutes for a full-size UNet
    on a GPU), so it is off by default.
    """
    device = torch.device(device)
    out_path = Path(out_path)
    if out_path.suffix != ENGINE_SUFFIX:
        raise BuildError(f"{spec.name}: torch engine path must end in {ENGINE_SUFFIX}, got {out_path}")
    _check_module(module, spec, precision, device)
    t0 = time.perf_counter()
    if dim_multiples is not None:
        multiples = dict(dim_multiples)
        program, ranges = _export(module, spec, profiles, multiples, precision, device)
    else:
        # Not told: trace with plain Dims, and if torch finds the network needs multiples (the UNets),
        # take them from its suggested fixes and trace once more (the first trace is the price).
        multiples = {}
        try:
            program, ranges = _export(module, spec, profiles, multiples, precision, device, probe=True)
        except _NeedsMultiples as e:
            multiples = e.multiples
            log.warning(
                "%s: torch.export needs dimension multiples %s; exporting again with them (pass "
                "dim_multiples=dim_multiples_for(%r, model_dims) to skip the first trace)",
                spec.name, multiples, spec.name,
            )
            program, ranges = _export(module, spec, profiles, multiples, precision, device)
    export_s = time.perf_counter() - t0
    described = {name: str(r) for name, r in ranges.items()}

    t1 = time.perf_counter()
    with atomic_path(out_path, suffix=ENGINE_SUFFIX) as tmp:  # torch.export.save wants the suffix
        torch.export.save(program, tmp)
    save_s = time.perf_counter() - t1

    info: dict[str, Any] = {
        "backend": "torch",
        "component": spec.name,
        "path": str(out_path),
        "precision": str(precision).removeprefix("torch."),
        "device": str(device),
        "torch": torch.__version__,
        "dynamic_dims": described,
        "dim_multiples": multiples,
        "trace_dims": example_dims(spec, ranges),
        "graph_nodes": len(program.graph.nodes),
        "bytes": out_path.stat().st_size,
        "export_seconds": round(export_s, 3),
        "save_seconds": round(save_s, 3),
        "compile": None,
    }
    if compile_shapes:
        info["compile"] = _compile_and_save_cache(out_path, spec, profiles, compile_shapes, device)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "torch engine %s: %d nodes, %.1f MB, %.1f s", spec.name, info["graph_nodes"], info["bytes"] / 1e6, info["seconds"]
    )
    return info


class _NeedsMultiples(BuildError):
    """torch.export found that some named dimensions must be multiples (its suggested fixes say which)."""

    def __init__(self, message: str, multiples: dict[str, int]) -> None:
        super().__init__(message)
        self.multiples = multiples


def _export(
    module: nn.Module,
    spec: ComponentSpec,
    profiles: Sequence[Profile],
    multiples: Mapping[str, int],
    precision: torch.dtype,
    device: torch.device,
    *,
    probe: bool = False,
) -> tuple[torch.export.ExportedProgram, dict[str, ExportRange]]:
    """One torch.export trace with the contract's dims over the profiles' ranges."""
    ranges = export_ranges(spec, profiles, multiples, probe=probe)
    dynamic_shapes = dynamic_shapes_for(spec, export_dims(ranges), {n: r.multiple for n, r in ranges.items()})
    trace = example_dims(spec, ranges)
    described = {name: str(r) for name, r in ranges.items()}
    args = _example_inputs(spec, trace, precision, device)
    log.info("torch.export %s: dims %s, trace %s", spec.name, described, trace)
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as e:  # constraint violations: torch says which dim and suggests a fix
        needed = multiples_from_suggested_fixes(str(e), spec.named_dims)
        message = (
            f"torch.export of {spec.name} rejected the dynamic shapes {described} (dim_multiples={dict(multiples)}): "
            f"{e}"
        )
        if needed and probe:
            raise _NeedsMultiples(message, needed) from e
        raise BuildError(message) from e
    except Exception as e:  # noqa: BLE001 - name the component and keep torch's reason
        raise BuildError(f"torch.export of {spec.name} failed: {type(e).__name__}: {e}") from e
    if len(program.graph_signature.user_outputs) != len(spec.outputs):
        raise BuildError(
            f"{spec.name}: exported program returns {len(program.graph_signature.user_outputs)} tensors, "
            f"contract has {spec.output_names}"
        )
    return program, ranges


@contextlib.contextmanager
def _fresh_cache_artifacts() -> Iterator[None]:
    """Record only this engine's compile artifacts (torch accumulates them per process otherwise)."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        ctx: contextlib.AbstractContextManager[None] = CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):  # older torch: the blob may also hold earlier compiles
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _compile_and_save_cache(
    engine_path: Path,
    spec: ComponentSpec,
    profiles: Sequence[Profile],
    shapes: Sequence[Mapping[str, int]],
    device: torch.device,
) -> dict[str, Any]:
    """Compile the saved engine for each shape exactly as the runtime will, then save torch's cache.

    The program is loaded with :func:`load_program`, the loader the runtime uses, because the cache only
    hits when the graph and the compile options are the ones a service uses.
    """
    planned: list[dict[str, int]] = []  # checked up front: fail before minutes of compiling
    for requested in shapes:
        values = _complete_shape(spec, profiles, requested)
        if not any(p.accepts(values) for p in profiles):
            raise BuildError(f"{spec.name}: compile shape {values} is outside every profile ({[p.name for p in profiles]})")
        planned.append(values)

    t0 = time.perf_counter()
    per_shape: list[dict[str, Any]] = []
    with _fresh_cache_artifacts():
        program = load_program(engine_path, spec, device=device, compile=True)
        for values in planned:
            inputs = {t.name: torch.zeros(t.shape(values), dtype=program.input_dtypes[t.name], device=device)
                      for t in spec.inputs}
            t1 = time.perf_counter()
            program(spec, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_shape.append({"dims": values, "seconds": round(time.perf_counter() - t1, 3)})
            log.info("compiled %s at %s in %.1f s", spec.name, values, per_shape[-1]["seconds"])
        saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise BuildError(f"{spec.name}: torch.compile produced no cache artifacts to save (is the Inductor cache off?)")
    blob, cache_info = saved
    path = write_atomic(cache_artifacts_path(engine_path), blob)
    return {
        "cache_path": str(path),
        "cache_bytes": len(blob),
        "shapes": per_shape,
        "artifacts": {kind: len(keys) for kind, keys in getattr(cache_info, "artifacts", {}).items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _complete_shape(spec: ComponentSpec, profiles: Sequence[Profile], values: Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(values) - set(spec.named_dims))
    if unknown:
        raise BuildError(f"{spec.name}: compile shape names {unknown}; its dimensions are {list(spec.named_dims)}")
    first = profiles[0]
    return {n: int(values[n]) if n in values else first.dims[n].opt for n in spec.named_dims}


@dataclass
class TorchBuilder:
    """:class:`~.builder.Builder` and :class:`~.builder.BuildSource` of the torch backend: programs traced from
    the PyTorch modules (loaded once, on the first component that is not up to date), each checked against its
    module at build time like the ONNX export is checked against PyTorch."""

    opts: BuildOptions
    export: ExportResult  # from export.summary.model_summary: configs only, no weights read
    _models: TorchModels | None = field(default=None, init=False)

    def source_hash(self, component: str, precision: str) -> str:
        """The model's identity (fused LoRAs, residual inputs and ControlNets included) and the precision."""
        return f"{self.export.identity(component)}:{precision}"

    def _loaded(self) -> TorchModels:
        if self._models is None:
            self._models = TorchModels.load(self.opts)
        return self._models

    def build(self, component: str, *, precision: str, spec: ComponentSpec, profiles: Sequence[Profile],
              out: Path) -> BuiltEngine:
        models, opts = self._loaded(), self.opts
        dtype = io_dtype(precision)
        module = models.wrapped()[component].to(device=opts.device, dtype=dtype)
        path = out / engine_file_name(component, "torch")
        info = build_torch_engine(module, spec, path, profiles=profiles, precision=dtype, device=opts.device,
                                  dim_multiples=dim_multiples_for(component, self.export.model_dims),
                                  compile_shapes=compile_shapes(component, profiles, opts.max_batch,
                                                                opts.max_prompt_chunks)
                                  if opts.compile_torch else None)
        return BuiltEngine(path.name, info, export_error=_verify_torch_engine(module, spec, path, profiles, dtype,
                                                                              opts.device))

    def save_weight_map(self, out: Path) -> None:
        """The torch names of the modules just built (a directory with nothing rebuilt keeps the map it has)."""
        if self._models is None:
            return
        from sdxl_trt.export.weight_map import component_weight_maps
        from sdxl_trt.lora.weight_map import WeightMap

        WeightMap(component_weight_maps(self._models.base, self._models.wrapped())).save(out / WEIGHT_MAP_NAME)


def _verify_torch_engine(module: nn.Module, spec: ComponentSpec, path: Path, profiles: Sequence[Profile],
                         dtype: torch.dtype, device: str) -> dict[str, float]:
    """The saved program against the PyTorch module on random inputs at the first profile's optimum:
    the torch backend's counterpart of the ONNX export check."""
    from sdxl_trt.export.onnx_export import sample_inputs

    program = load_program(path, spec, device=device)
    dims = {n: r.opt for n, r in profiles[0].dims.items()}
    inputs = sample_inputs(spec, dims, dtype, device=device, seed=1)
    got = dict(zip(spec.output_names, program(spec, inputs), strict=True))
    with torch.inference_mode():
        expected = module(*(inputs[n] for n in spec.input_names))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    return {name: float((got[name].double() - e.double()).norm() / e.double().norm().clamp_min(1e-30))
            for name, e in zip(spec.output_names, expected, strict=True)}


def compile_shapes(component: str, profiles: Sequence[Profile], max_batch: int,
                   max_prompt_chunks: int = WARMUP_PROMPT_CHUNKS) -> list[dict[str, int]]:
    """The shapes a default warm-up runs, compiled once at build time (each costs minutes at full size), so
    that it compiles nothing: every bucket at one image and at ``max_batch`` images, with guidance (x2 rows in
    the UNets and ControlNets) and without, at prompts of 1 to WARMUP_PROMPT_CHUNKS chunks (S; the text
    encoders' rows: a chunk per prompt, one or two prompts)."""
    family = family_of(component)
    chunks = range(1, min(WARMUP_PROMPT_CHUNKS, max_prompt_chunks) + 1)
    if family == "text_encoder":
        return [{"B": b} for b in sorted({c * prompts for c in chunks for prompts in (1, 2)})]
    shapes = []
    for p, images, c in itertools.product(profiles, sorted({1, max_batch}), chunks):
        for b in ({images, 2 * images} if family in STEP_FAMILIES else {images}):
            shapes.append({"B": b, "h": p.dims["h"].opt, "w": p.dims["w"].opt}
                          | ({"S": TOKENS_PER_CHUNK * c} if "S" in p.dims else {}))
    return [dict(t) for t in sorted({tuple(sorted(s.items())) for s in shapes})]
