"""What serve reads of a pipeline, all of it: a :class:`~sdxl_trt.runtime.pipeline.Pipeline` is one, and so is
every test double (tests/support/serve_fakes.py).

Rule (keep it): serve reads a pipeline only through these members, never past them with ``getattr(...,
default)``, so a double that lacks one fails the protocol check (``isinstance`` on this runtime-checkable
protocol, and mypy) instead of quietly serving a default. A new read means a new member here, on the real
pipeline and on the doubles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sdxl_trt.buckets import Bucket
from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.step_shape import StepShape


@runtime_checkable
class ModelFacts(Protocol):
    """The manifest's model identities serve shows (A1111's model list, the refiner checkpoint it accepts):
    ``name`` and ``identity_hash`` of each; ``refiner`` None for engines built without one."""

    @property
    def model(self) -> Mapping[str, Any]: ...

    @property
    def refiner(self) -> Mapping[str, Any] | None: ...

    @property
    def precision(self) -> str: ...


@runtime_checkable
class LoraListing(Protocol):
    """The LoRAs a request may name (the server's ``--lora-dir``): name -> file."""

    def available(self) -> Mapping[str, Path]: ...


class StepCounts(Protocol):
    """One reading of the running batch's progress (runtime/progress.py's ``ProgressSnapshot``)."""

    @property
    def step(self) -> int: ...

    @property
    def steps(self) -> int: ...

    @property
    def fraction(self) -> float: ...

    @property
    def eta_s(self) -> float: ...


@runtime_checkable
class ProgressReader(Protocol):
    """The steps the device has finished of the running batch, readable from any thread without blocking."""

    def snapshot(self) -> StepCounts: ...


@runtime_checkable
class PipelineLike(Protocol):
    """Everything serve needs of a pipeline; read-only, except the two calls that do the work."""

    @property
    def max_batch(self) -> int: ...

    @property
    def max_steps(self) -> int: ...

    @property
    def buckets(self) -> Sequence[Bucket]: ...

    @property
    def has_refiner(self) -> bool: ...

    @property
    def default_scheduler(self) -> str: ...

    @property
    def controlnet_names(self) -> Sequence[str]: ...

    @property
    def manifest(self) -> ModelFacts: ...

    @property
    def loras(self) -> LoraListing: ...

    @property
    def backend(self) -> str: ...

    @property
    def device(self) -> object:
        """Where the engines run (a ``torch.device``; serve shows ``str()`` of it)."""

    @property
    def progress(self) -> ProgressReader: ...

    @property
    def cache_branches(self) -> Sequence[int]:
        """The step-caching branches the engines were built with (empty: none)."""

    def admit(self, request: GenerationRequest, *, max_images: int, max_steps: int | None) -> StepShape: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def warmup(self, *, buckets: Sequence[str] | None, batch_sizes: Sequence[int], steps: int,
               refiner: bool, schedulers: Sequence[str] | None = None,
               guidance_scales: Sequence[float] | None = None, prompt_chunks: int = 2) -> float: ...

    def cuda_graph_stats(self) -> dict[str, int]: ...
