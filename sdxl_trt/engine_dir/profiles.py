"""Optimization profiles, computed from the component contracts and SDXL's aspect-ratio buckets.

* ``per-bucket`` (default): one profile per bucket, latent h and w fixed to the bucket (static-like
  speed), batch 1 .. 2 x max_batch for the UNets (classifier-free guidance doubles it), 1 .. max_batch
  for the VAE.
* ``range``: one profile spanning all requested buckets, optimised for 1024x1024 (or the first bucket).
* Text encoders get one batch-only profile: every prompt chunk of the positive and negative prompts of
  every image is one row.

Profiles are validated before they reach a builder: inputs that share a named dimension must have the
same (min, opt, max) and the error names the tensors that disagree (TensorRT-LLM's rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import STEP_FAMILIES, TOKENS_PER_CHUNK, ComponentSpec, family_of
from sdxl_trt.errors import ProfileError

ProfileMode = Literal["per-bucket", "range"]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.opt <= self.max:
            raise ProfileError(f"dimension range must satisfy 0 < min <= opt <= max, got {self}")

    def contains(self, v: int) -> bool:
        return self.min <= v <= self.max


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one component: ranges per named dimension and per input tensor."""

    name: str  # the bucket ("1024x1024"), "range", or "batch"
    buckets: tuple[str, ...]
    dims: Mapping[str, DimRange]
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

    def accepts(self, values: Mapping[str, int]) -> bool:
        return all(r.contains(values[n]) for n, r in self.dims.items() if n in values)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "buckets": list(self.buckets),
            "dims": {n: [r.min, r.opt, r.max] for n, r in self.dims.items()},
            "shapes": {n: [list(s) for s in mom] for n, mom in self.shapes.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Profile:
        return cls(
            name=d["name"],
            buckets=tuple(d["buckets"]),
            dims={n: DimRange(*v) for n, v in d["dims"].items()},
            shapes={n: tuple(tuple(s) for s in mom) for n, mom in d["shapes"].items()},  # type: ignore[misc]
        )


def _shapes(spec: ComponentSpec, dims: Mapping[str, DimRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    lo = {n: r.min for n, r in dims.items()}
    op = {n: r.opt for n, r in dims.items()}
    hi = {n: r.max for n, r in dims.items()}
    return {t.name: (t.shape(lo), t.shape(op), t.shape(hi)) for t in spec.inputs}


def component_profiles(
    spec: ComponentSpec,
    *,
    buckets: Sequence[Bucket],
    max_batch: int,
    mode: ProfileMode = "per-bucket",
    max_prompt_chunks: int = 3,
) -> list[Profile]:
    """The profiles of one component for the requested buckets and batch."""
    if max_batch < 1:
        raise ProfileError(f"--max-batch must be at least 1, got {max_batch}")
    if max_prompt_chunks < 1:
        raise ProfileError(f"max_prompt_chunks must be at least 1, got {max_prompt_chunks}")
    if not buckets:
        raise ProfileError("no buckets requested")
    try:
        family = family_of(spec.name)
    except ValueError as e:
        raise ProfileError(f"no profile rule for component {spec.name!r}: {e}") from None
    if family == "text_encoder":
        dims = {"B": DimRange(1, 2, 2 * max_batch * max_prompt_chunks)}
        return [_validated(spec, Profile("batch", (), dims, _shapes(spec, dims)))]  # bucket-independent

    if family in STEP_FAMILIES:  # a ControlNet runs beside the UNet: the UNet's batch, S, buckets
        batch = DimRange(1, 2, 2 * max_batch)
        extra = {"S": DimRange(TOKENS_PER_CHUNK, TOKENS_PER_CHUNK, TOKENS_PER_CHUNK * max_prompt_chunks)}
    else:  # vae
        batch, extra = DimRange(1, 1, max_batch), {}

    if mode == "per-bucket":
        out = []
        for b in buckets:
            h, w = b.latent_hw
            dims = {"B": batch, "h": DimRange(h, h, h), "w": DimRange(w, w, w), **extra}
            out.append(_validated(spec, Profile(str(b), (str(b),), dims, _shapes(spec, dims))))
        return out
    if mode == "range":
        opt = next((b for b in buckets if (b.width, b.height) == (1024, 1024)), buckets[0])
        hs = [b.latent_hw[0] for b in buckets]
        ws = [b.latent_hw[1] for b in buckets]
        oh, ow = opt.latent_hw
        dims = {"B": batch, "h": DimRange(min(hs), oh, max(hs)), "w": DimRange(min(ws), ow, max(ws)), **extra}
        return [_validated(spec, Profile("range", tuple(str(b) for b in buckets), dims, _shapes(spec, dims)))]
    raise ProfileError(f"--profile must be 'per-bucket' or 'range', got {mode!r}")


def _validated(spec: ComponentSpec, profile: Profile) -> Profile:
    validate_shapes(spec, profile.shapes)
    return profile


def validate_shapes(spec: ComponentSpec, shapes: Mapping[str, tuple[Shape, Shape, Shape]]) -> dict[str, DimRange]:
    """Check per-input (min, opt, max) shapes against the contract; return the named-dimension ranges.

    Raises :class:`ProfileError` naming the tensors when inputs sharing a named dimension disagree, when an
    input is missing or has the wrong rank, or when a fixed dimension is given another size.
    """
    missing = [n for n in spec.input_names if n not in shapes]
    if missing:
        raise ProfileError(f"{spec.name}: profile has no shapes for input(s) {missing}")
    seen: dict[str, tuple[tuple[int, int, int], list[str]]] = {}
    for t in spec.inputs:
        mom = shapes[t.name]
        for s in mom:
            if len(s) != len(t.dims):
                raise ProfileError(f"{spec.name}.{t.name}: shape {tuple(s)} has rank {len(s)}, contract says {len(t.dims)}")
        for axis, d in enumerate(t.dims):
            values = tuple(s[axis] for s in mom)
            if isinstance(d, int):
                if any(v != d for v in values):
                    raise ProfileError(f"{spec.name}.{t.name}: axis {axis} is fixed at {d}, profile gives {values}")
                continue
            if any(v * d.div % d.scale for v in values):
                raise ProfileError(f"{spec.name}.{t.name}: axis {axis} ({d}) must be a multiple of {d.scale}, got {values}")
            per = tuple(v * d.div // d.scale for v in values)  # a feature map's h/4 side of 16 means h = 64
            if d.name in seen and seen[d.name][0] != per:
                first, names = seen[d.name]
                raise ProfileError(
                    f"{spec.name}: inputs sharing dimension {d.name!r} disagree: {', '.join(names)} give "
                    f"(min, opt, max) {first} but {t.name} gives {per}"
                )
            seen.setdefault(d.name, (per, []))[1].append(t.name)  # type: ignore[arg-type]
    return {n: DimRange(*v) for n, (v, _) in seen.items()}


def select_profile(profiles: Sequence[Profile], values: Mapping[str, int]) -> int:
    """Index of the first profile that accepts these dimension values, or a ProfileError listing them."""
    for i, p in enumerate(profiles):
        if p.accepts(values):
            return i
    raise ProfileError(
        f"no optimization profile accepts {dict(values)}; built profiles: {', '.join(p.name for p in profiles)}"
    )
