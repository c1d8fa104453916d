"""What every part of a request shares: the loaded engines with their contracts, profiles and dtypes, the
buffer arena, the device and its CUDA graphs. Built once by ``Pipeline.load``; read by conditioning.py
(text) and batch.py (denoise, decode).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import (
    TOKENS_PER_CHUNK,
    ComponentSpec,
    ModelDims,
    component_specs,
    controlnet_names,
    io_dtype,
)
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.engine_dir.profiles import Profile, select_profile

from .arena import Arena
from .engine import Engine
from .graphs import CudaGraphs

MAX_STATE_TENSORS = 3
"""Latent-shaped history buffers the hungriest scheduler keeps (UniPC: last, x0_prev, x0_prev2)."""


class DeviceScope:
    """A pipeline's device made current for its calls, with a stream of its own on CUDA: work on the legacy
    default stream synchronises with every other stream, and TensorRT adds a synchronisation per ``enqueueV3``
    there (and warns), for the VAE, uncaptured encoders and eager steps alike."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the engines' weights, loaded on it

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield


@dataclass
class EngineContext:
    manifest: Manifest
    engines: dict[str, Engine]
    device: torch.device
    graphs: CudaGraphs
    max_steps: int
    dims: ModelDims = field(init=False)
    specs: dict[str, ComponentSpec] = field(init=False)
    profiles: dict[str, list[Profile]] = field(init=False)
    dtypes: dict[str, torch.dtype] = field(init=False)
    buckets: list[Bucket] = field(init=False)
    arena: Arena = field(init=False)

    def __post_init__(self) -> None:
        m = self.manifest
        self.dims = ModelDims.from_json(m.model_dims)
        self.specs = component_specs(self.dims, controlnet_names(m.components))
        self.profiles = {n: [Profile.from_json(p) for p in e.profiles] for n, e in m.components.items()}
        self.dtypes = {n: io_dtype(e.precision, m.backend) for n, e in m.components.items()}
        self.buckets = [Bucket.parse(b) for b in m.buckets]
        self.arena = Arena(self.device)
        self._reserve_buffers()

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    @property
    def max_chunks(self) -> int:
        return self.manifest.max_prompt_chunks

    def stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _reserve_buffers(self) -> None:
        """Every engine input/output at its profile's maximum, plus the loop's own float32 buffers."""
        largest = max(self.buckets, key=lambda b: b.latent_hw[0] * b.latent_hw[1])
        h, w = largest.latent_hw
        # Views are flat, so one buffer sized for the largest h*w serves every bucket.
        base = {"h": h * w, "w": 1, "S": TOKENS_PER_CHUNK * self.max_chunks}
        sides = [b.latent_hw for b in self.buckets]
        for name in self.engines:
            spec = self.specs[name]
            max_b = max(p.dims["B"].max for p in self.profiles[name])
            for t in spec.tensors:
                dtype = torch.int64 if t.dtype == "int64" else torch.float32 if t.dtype == "float32" else self.dtypes[name]
                # The largest bucket by elements of this tensor (feature maps h/f x w/f round per bucket).
                numel = max(math.prod(t.shape({**base, "B": max_b, "h": bh, "w": bw})) for bh, bw in sides)
                self.arena.reserve(f"{name}.{t.name}", (numel,), dtype)
        lat = (self.max_batch, self.dims.latent_channels, base["h"], 1)
        for name in ("latents", "init_noise", "image_latents", "mask",
                     *(f"state.{k}" for k in range(MAX_STATE_TENSORS))):
            self.arena.reserve(name, lat, torch.float32)
        self.arena.reserve("guidance", (self.max_batch, 1, 1, 1), torch.float32)
        self.arena.reserve("step_index", (1,), torch.int64)
        self.arena.reserve("step_noise", (self.max_steps, *lat), torch.float32)

    def bind(self, name: str, dims: Mapping[str, int]) -> Bound:
        """Component ``name`` at these dimension values: arena views of its inputs and outputs, and the profile
        they fall in, checked by the engine's ``infer_shapes`` (which refuses shapes outside it)."""
        spec, engine = self.specs[name], self.engines[name]
        inputs = {t.name: self.arena.view(f"{name}.{t.name}", t.shape(dims)) for t in spec.inputs}
        outputs = {t.name: self.arena.view(f"{name}.{t.name}", t.shape(dims)) for t in spec.outputs}
        profile = select_profile(self.profiles[name], dims)
        engine.infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        return Bound(name, engine, profile, inputs, outputs)

    def run(self, bound: Bound, *, graph_key: Hashable | None = None) -> None:
        """Run a bound component: in its CUDA graph when ``graph_key`` is given and one is (or may be) captured
        for it, eagerly otherwise. Its inputs must already hold their values."""

        def work() -> None:
            bound.run(self.stream())

        graph = None
        if graph_key is not None:
            graph = self.graphs.get(graph_key, work, graph_safe=bound.engine.graph_safe, mutable=())
        if graph is not None:
            graph.replay()
        else:
            work()


@dataclass(frozen=True)
class Bound:
    """One component bound to one set of dimension values (``EngineContext.bind``): its engine, the profile
    its shapes fall in, and the arena views it reads and writes (stable addresses, so a graph may replay it)."""

    name: str
    engine: Engine
    profile: int
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    def run(self, stream: torch.cuda.Stream | None) -> None:
        """Enqueue the engine on ``stream`` (no synchronisation, as the Engine protocol promises)."""
        self.engine.run(self.inputs, self.outputs, profile=self.profile, stream=stream)
