"""torch backend: the dynamic shapes a component is exported with, from its contract and profiles. Pure.

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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdxl_trt.contracts import ComponentSpec, Dim, ModelDims, contract_of
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.errors import BuildError

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
