"""A pipeline stand-in for serving tests where timing matters more than pixels: it blocks in
``generate_batch`` until released and records what it ran. It implements serve's whole ``PipelineLike``
(tests/test_serve_protocol.py checks that it does)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdxl_trt.buckets import Bucket
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.presets import TINY_BUCKETS
from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.step_shape import StepShape


@dataclass
class FakeModelFacts:
    """No model identity (A1111's model list is empty) and no refiner."""

    model: dict[str, Any] = field(default_factory=dict)
    refiner: dict[str, Any] | None = None
    precision: str = "fp32"


@dataclass(frozen=True)
class IdleCounts:
    step: int = 0
    steps: int = 0
    fraction: float = 0.0
    eta_s: float = 0.0


class NoProgress:
    """A stand-in that never counts a step (the fake pipelines run no denoising loop)."""

    def snapshot(self) -> IdleCounts:
        return IdleCounts()


class NoLoras:
    def available(self) -> Mapping[str, Path]:
        return {}


class GatedPipeline:
    max_batch = 2
    max_steps = 150
    has_refiner = False
    default_scheduler = "euler"
    controlnet_names: tuple[str, ...] = ()
    backend = "fake"
    device = "cpu"
    cache_branches: tuple[int, ...] = ()

    def __init__(self, *, open_gate: bool = False) -> None:
        self.progress = NoProgress()
        self.buckets = list(TINY_BUCKETS)
        self.manifest = FakeModelFacts()
        self.loras = NoLoras()
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.started = threading.Event()
        self.ran: list[list[str]] = []
        self.warmed: list[tuple[str | None, int]] = []  # (bucket or None for all, batch size) per warm-up call

    def warmup(self, *, buckets: Sequence[str] | None, batch_sizes: Sequence[int], steps: int,
               refiner: bool, schedulers: Sequence[str] | None = None,
               guidance_scales: Sequence[float] | None = None, prompt_chunks: int = 2) -> float:
        self.warmed += [(b, n) for b in (buckets if buckets is not None else [None]) for n in batch_sizes]
        self.warm_samplers = (schedulers, guidance_scales)
        return 0.0

    def cuda_graph_stats(self) -> dict[str, int]:
        return {"graphs": len(self.warmed), "pool_bytes": 1024 * len(self.warmed)}

    def admit(self, request: GenerationRequest, *, max_images: int, max_steps: int | None) -> StepShape:
        from sdxl_trt.samplers import SCHEDULERS

        request.validate(max_images=max_images, max_steps=max_steps or self.max_steps)
        if request.scheduler not in SCHEDULERS:
            raise InvalidRequestError(f"unknown scheduler {request.scheduler!r}", param="scheduler")
        bucket = self.buckets[0]
        if request.width is not None or request.height is not None:
            bucket = Bucket(request.width or 0, request.height or 0)
            if bucket not in self.buckets:
                raise InvalidRequestError(f"size {bucket} is not a built bucket", param="size")
        return StepShape.of(request, bucket, prompt_chunks=1, guidance_embedding=False)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.started.set()
        assert self.gate.wait(30), "the test never released the gate"
        self.ran.append([r.prompt for r in requests])
        if any(r.prompt == "poison" for r in requests):
            raise InvalidRequestError("poison", param="prompt")
        return [GenerationResult(images=[Image.new("RGB", (8, 8))] * r.num_images,
                                 seeds=[(r.seed or 0) + k for k in range(r.num_images)],
                                 timings={"denoise": 0.01}, parameters={"steps": r.steps})
                for r in requests]


if TYPE_CHECKING:  # mypy proves the double is a whole PipelineLike, signatures included
    from sdxl_trt.serve.core.pipeline_like import PipelineLike

    def _implements_the_protocol(double: GatedPipeline) -> PipelineLike:
        return double
