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

Dynamic shapes come from the contract's named dimensions, bounded by the profiles' overall min and max:

* one ``torch.export.Dim`` per named dimension (``B``, ``S``, ``h``, ``w``); every tensor that uses the
  dimension shares that Dim, so export proves they are equal;
* scaled dimensions (an image side is ``8*h``) are derived Dims (``8 * h``), not independent ones;
* a dimension the network needs divisible (a UNet that downsamples twice needs ``h % 4 == 0``) is
  written ``h = 4 * _h`` with a root Dim ``_h``: pass ``dim_multiples`` (see :func:`dim_multiples_for`).
  torch.export cannot bound a dimension by a list of allowed values (the per-bucket profiles' exact
  sizes), so the program accepts every multiple inside ``[min, max]``; the profile check in
  ``check_input_shapes`` is what restricts a call to the built buckets;
* a dimension whose min equals its max over all profiles (one bucket's ``h``) is still exported dynamic,
  over ``[min, min + multiple]``: see :class:`ExportRange` for why not static.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdxl_trt.contracts import ComponentSpec, Dim, ModelDims, contract_of
from sdxl_trt.engine_dir.layout import EXTENSIONS, cache_artifacts_path
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.engine_dir.torch_program import load_program
from sdxl_trt.errors import BuildError

log = logging.getLogger(__name__)

ENGINE_SUFFIX = EXTENSIONS["torch"]

TORCH_DTYPES = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}

ExportDim = Any
"""A value in torch.export's ``dynamic_shapes``: a ``Dim`` or a derived Dim (``4 * _h``, ``8 * h``)."""


def dim_multiples_for(component: str, dims: ModelDims) -> dict[str, int]:
    """The divisibility a component needs of its named dimensions: UNets need ``h, w % 2**downsamples == 0``.

    diffusers' UNet branches on ``h % 2**downsamples`` (to pass explicit upsample sizes), and torch.export
    refuses a dynamic ``h`` that some values in its range would send down the other branch.
    """
    downsamples = {"unet": dims.unet_downsamples, "refiner": dims.refiner_downsamples,
                   "controlnet": dims.unet_downsamples}.get(contract_of(component), 0)
    if downsamples <= 0:
        return {}
    return {"h": 2**downsamples, "w": 2**downsamples}


def dim_ranges(spec: ComponentSpec, profiles: Sequence[Profile]) -> dict[str, tuple[int, int]]:
    """Overall (min, max) of each named dimension over all profiles (the range the program must accept)."""
    if not profiles:
        raise BuildError(f"{spec.name}: no profiles given; build_torch_engine needs at least one")
    out: dict[str, tuple[int, int]] = {}
    for name in spec.named_dims:
        missing = [p.name for p in profiles if name not in p.dims]
        if missing:
            raise BuildError(f"{spec.name}: profile(s) {missing} give no range for dimension {name!r}")
        out[name] = (min(p.dims[name].min for p in profiles), max(p.dims[name].max for p in profiles))
    return out


@dataclass(frozen=True)
class ExportRange:
    """The range one named dimension is exported with: the profiles' ``[lo, hi]`` in steps of ``multiple``.

    ``widened``: the profiles fix the dimension (``lo == hi``), but it is exported as ``[lo, lo + multiple]``
    anyway. Why not static: torch.export rejects a Dim with ``min == max``, and a static side next to a
    dynamic one makes torch's symbolic shapes add guards it cannot prove (the tiny VAE decoder with static
    ``h`` and dynamic ``w`` fails on a GroupNorm reshape's ``Min(8, 64*w)`` stride guard). A dynamic
    dimension costs nothing when the program runs eagerly, and ``torch.compile(dynamic=False)`` specialises
    every shape anyway; the extra size is refused by the profile check.
    """

    lo: int
    hi: int
    multiple: int = 1
    widened: bool = False
    used: tuple[int, ...] = ()  # the sizes the profiles name (min, opt, max), largest first

    def __str__(self) -> str:
        if self.widened:
            text = f"{self.lo} (exported {self.lo}..{self.hi})"
        else:
            text = f"{self.lo}..{self.hi}"
        return text + (f", multiple of {self.multiple}" if self.multiple > 1 else "")


def export_ranges(
    spec: ComponentSpec, profiles: Sequence[Profile], multiples: Mapping[str, int], *, probe: bool = False
) -> dict[str, ExportRange]:
    """Each named dimension's export range: the profiles' overall range, checked against ``multiples``.

    ``probe``: the ranges of a trace that is to discover the multiples (none given): a fixed dimension is
    widened to ``[lo, 2 lo]`` instead of one step, because torch fails while writing its own suggested fix
    (``Dim('_h', min=8, max=8)``) when the range holds a single multiple.
    """
    unknown = sorted(set(multiples) - set(spec.named_dims))
    if unknown:
        raise BuildError(f"{spec.name}: dim_multiples names {unknown}, but its dimensions are {list(spec.named_dims)}")
    out: dict[str, ExportRange] = {}
    for name, (lo, hi) in dim_ranges(spec, profiles).items():
        used = tuple(sorted({v for p in profiles for v in (p.dims[name].min, p.dims[name].opt, p.dims[name].max)},
                            reverse=True))
        m = multiples.get(name, 1)
        if m < 1:
            raise BuildError(f"{spec.name}: dim_multiples[{name!r}] must be >= 1, got {m}")
        if lo % m or hi % m:
            raise BuildError(
                f"{spec.name}: dimension {name} must be a multiple of {m} for this network, but the profiles "
                f"span {lo}..{hi}; choose buckets whose latent sides are multiples of {m}"
            )
        widen = max(lo, 1) if probe and m == 1 else m
        out[name] = ExportRange(lo, hi + widen if lo == hi else hi, m, widened=lo == hi, used=used)
    return out


def export_dims(ranges: Mapping[str, ExportRange]) -> dict[str, ExportDim]:
    """One torch.export Dim per named dimension, ``m * Dim`` (a derived Dim) where it must be a multiple."""
    out: dict[str, ExportDim] = {}
    for name, r in ranges.items():
        if r.multiple == 1:
            out[name] = torch.export.Dim(name, min=r.lo, max=r.hi)
        else:
            out[name] = r.multiple * torch.export.Dim(f"_{name}", min=r.lo // r.multiple, max=r.hi // r.multiple)
    return out


def example_dims(spec: ComponentSpec, ranges: Mapping[str, ExportRange]) -> dict[str, int]:
    """Trace values for the named dimensions.

    Never 0 or 1 (torch.export would specialise them). Always a size the profiles name if there is one
    (a real bucket side: with no ``dim_multiples`` known, an odd size such as 33 would send a UNet down
    its non-divisible branch, and torch suggests no fix for that), preferring one that differs from the
    other dimensions and the contract's fixed sizes. Equal sizes are harmless with explicit Dims (each
    has its own symbol); distinct ones only make the graph easier to read.
    """
    taken = {d for t in spec.tensors for d in t.dims if isinstance(d, int)}
    out: dict[str, int] = {}
    for name, r in ranges.items():
        used = [v for v in r.used if v > 1 and v % r.multiple == 0]
        others = [v for v in range(r.hi, r.lo - 1, -r.multiple) if v > 1 and v not in r.used]
        ranked = [v for v in used if v not in taken] + used + [v for v in others if v not in taken] + others
        if not ranked:
            raise BuildError(f"{spec.name}: dimension {name} has no traceable size in {r} (need >= 2)")
        out[name] = ranked[0]
        taken.add(out[name])
    return out


def dynamic_shapes_for(spec: ComponentSpec, dims: Mapping[str, ExportDim],
                       multiples: Mapping[str, int] | None = None) -> dict[str, dict[int, ExportDim] | None]:
    """torch.export's ``dynamic_shapes`` (by input name): every axis with a named dimension, scaled as the
    contract says (``Dim("h", 8)`` -> ``8 * h``); fixed axes are left out (static).

    A divided axis (a ControlNet residual's ``h/4``) is a derived Dim of the root: with ``h = 4 * _h`` it is
    ``_h``, ``h/2`` is ``2 * _h``. So ``multiples`` must make the dimension a multiple of every divisor."""
    out: dict[str, dict[int, ExportDim] | None] = {}
    for t in spec.inputs:
        axes = {axis: _axis_dim(spec, t.name, d, dims[d.name], (multiples or {}).get(d.name, 1))
                for axis, d in enumerate(t.dims) if isinstance(d, Dim)}
        out[t.name] = axes or None
    return out


def _axis_dim(spec: ComponentSpec, tensor: str, d: Dim, dim: ExportDim, multiple: int) -> ExportDim:
    if d.div == 1:
        return dim if d.scale == 1 else d.scale * dim
    if multiple % d.div:
        raise BuildError(f"{spec.name}.{tensor}: axis {d} needs dimension {d.name} exported as a multiple of {d.div}, "
                         f"but dim_multiples gives {multiple}; pass dim_multiples_for({spec.name!r}, model_dims)")
    factor = d.scale * multiple // d.div
    return dim.root if factor == 1 else factor * dim.root


def _example_inputs(
    spec: ComponentSpec, values: Mapping[str, int], precision: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs in each tensor's domain (timesteps in [0, 1000), token ids below 1000: inside any CLIP
    vocabulary). The graph does not depend on the values; they only have to be valid."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = t.shape(values)
        dtype = precision if t.dtype == "float" else TORCH_DTYPES[t.dtype]
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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp{ENGINE_SUFFIX}")  # torch.export.save wants the suffix
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
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


_DERIVED_FIX = re.compile(r"^\s*(\w+) = (\d+)\*(\w+)\s*$")


def multiples_from_suggested_fixes(message: str, names: Sequence[str]) -> dict[str, int]:
    """Read ``h = 4*_h`` lines from a torch.export constraint-violation message: ``{"h": 4}``.

    Only fixes that make one of our named dimensions a multiple count; any other suggestion (a
    specialisation such as ``B = 2``) is not something a profile-wide engine can honour.
    """
    if "Suggested fixes:" not in message:
        return {}
    out: dict[str, int] = {}
    for line in message.split("Suggested fixes:", 1)[1].splitlines():
        if m := _DERIVED_FIX.match(line):
            name, factor = m.group(1), int(m.group(2))
            if name in names and factor > 1:
                out[name] = factor
    return out


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
    path = cache_artifacts_path(engine_path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
