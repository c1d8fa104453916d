"""The ``Engine`` protocol: one compiled component, shaped like TensorRT's execution context.

Rules for every implementation (TensorRT, ONNX Runtime, torch):

* ``infer_shapes`` checks input shapes against the contract and the chosen profile and returns the
  output shapes. It may raise; it never touches the device.
* ``run`` binds the caller's buffers (inputs and outputs are preallocated views owned by the caller) and
  enqueues the work on ``stream``. It does not synchronise and does not allocate device memory that
  outlives the call: the caller owns buffers and stream (TensorRT-LLM's session rule).
* ``graph_safe`` is True only for engines whose ``run`` enqueues everything on ``stream`` (TensorRT,
  torch): those alone may be captured in a CUDA graph.
* Engines are loaded once; they are not thread-safe on their own, the pipeline serialises calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.errors import InvalidRequestError

Shape = tuple[int, ...]


@runtime_checkable
class Engine(Protocol):
    spec: ComponentSpec
    profiles: Sequence[Any]  # sdxl_trt.engine_dir.profiles.Profile, as stored in the manifest
    backend: str
    graph_safe: bool  # enqueues all its work on the given stream, so a CUDA graph capture records it

    def infer_shapes(self, input_shapes: Mapping[str, Shape], profile: int) -> dict[str, Shape]: ...

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        *,
        profile: int,
        stream: torch.cuda.Stream | None = None,
    ) -> None: ...


def check_input_shapes(spec: ComponentSpec, profiles: Sequence[Any], input_shapes: Mapping[str, Shape],
                       profile: int) -> dict[str, Shape]:
    """Shared ``infer_shapes``: resolve the named dimensions, check them against the profile, derive outputs."""
    values: dict[str, int] = {}
    for t in spec.inputs:
        if t.name not in input_shapes:
            raise InvalidRequestError(f"{spec.name}: missing input {t.name!r}")
        shape = tuple(input_shapes[t.name])
        if len(shape) != len(t.dims):
            raise InvalidRequestError(f"{spec.name}.{t.name}: shape {shape} has rank {len(shape)}, expected {len(t.dims)}")
    # Named dimensions are read off whole-size axes first; a feature map's side (``h/4``) is then checked
    # against them, since it cannot name h alone.
    for whole in (True, False):
        for t in spec.inputs:
            shape = tuple(input_shapes[t.name])
            for axis, d in enumerate(t.dims):
                v = shape[axis]
                if isinstance(d, int):
                    if v != d:
                        raise InvalidRequestError(f"{spec.name}.{t.name}: axis {axis} must be {d}, got {v}")
                    continue
                if (d.div == 1) != whole:
                    continue
                if not whole:
                    if d.name in values and d.of(values[d.name]) != v:
                        raise InvalidRequestError(f"{spec.name}.{t.name}: axis {axis} ({d}) is {v}, but {d.name} is "
                                                  f"{values[d.name]} in another input")
                    continue
                if v % d.scale:
                    raise InvalidRequestError(f"{spec.name}.{t.name}: axis {axis} ({d}) must be a multiple of {d.scale}, got {v}")
                if values.setdefault(d.name, v // d.scale) != v // d.scale:
                    raise InvalidRequestError(
                        f"{spec.name}.{t.name}: dimension {d.name} is {v // d.scale} here but {values[d.name]} in another input"
                    )
    if not 0 <= profile < len(profiles):
        raise InvalidRequestError(f"{spec.name}: profile {profile} does not exist ({len(profiles)} built)")
    p = profiles[profile]
    if not p.accepts(values):
        raise InvalidRequestError(
            f"{spec.name}: shapes {dict(values)} are outside profile {p.name!r} "
            f"({ {n: (r.min, r.max) for n, r in p.dims.items()} })"
        )
    return {t.name: t.shape(values) for t in spec.outputs}
