"""One StepShape: the service batches two requests exactly when the runtime runs them as one batch.

The runtime's verdict is counted where it happens (``BatchRunner.run`` calls inside one ``generate_batch`` of
the tiny engines); the service's is the batches ``AsyncPipeline`` forms over the same pipeline's ``admit``
(real tokenizer, real guidance rule), with the pipeline's work recorded instead of run. Each pair below
differs in one setting: those that shape a step must be split by both, those that do not must be batched by
both. Before StepShape the service batched a long prompt with a short one, and txt2img requests whose
(ignored) strength differed, which the runtime then split.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest
from PIL import Image

from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.serve.core.async_pipeline import AsyncPipeline
from sdxl_trt.step_shape import StepShape

BASE = GenerationRequest(prompt="a red lighthouse", width=256, height=256, steps=2, guidance_scale=5.0, seed=3)
LONG = " ".join(["a very detailed red lighthouse on a rocky coast at dusk"] * 12)  # > 75 tokens: 2+ chunks
GREY = Image.new("RGB", (256, 256), (120, 120, 120))

# (what differs, the second request): each pair is (BASE, second)
SPLIT = [
    ("guidance on/off", replace(BASE, guidance_scale=1.0)),
    ("prompt chunks", replace(BASE, prompt=LONG)),
    ("bucket", replace(BASE, width=384, height=192)),
    ("steps", replace(BASE, steps=3)),
    ("sampler", replace(BASE, scheduler="ddim")),
    ("mode", replace(BASE, init_image=GREY, strength=1.0)),
    ("timestep spacing", replace(BASE, timestep_spacing="trailing")),
    ("refiner", replace(BASE, refiner_mode="ensemble", refiner_start=0.5)),
]
TOGETHER = [
    ("prompts, seeds, guidance value", replace(BASE, prompt="a blue boat", negative_prompt="blurry", seed=9,
                                              guidance_scale=7.5)),
    ("txt2img strength (ignored)", replace(BASE, strength=0.3)),
    ("refiner settings without a refiner", replace(BASE, refiner_start=0.5, refiner_strength=0.9, refiner_steps=7)),
    ("micro-conditioning", replace(BASE, aesthetic_score=3.0, crop_top_left=(8, 8), original_size=(512, 512))),
]


class _Recorded:
    """The real pipeline's admission, with generate_batch recorded and answered without running."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.calls: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(len(requests))
        return [GenerationResult(images=[GREY] * r.num_images, seeds=[0] * r.num_images, timings={},
                                 parameters={}) for r in requests]


def _service_batches(pipeline, a: GenerationRequest, b: GenerationRequest) -> list[int]:
    recorded = _Recorded(pipeline)

    async def main() -> None:
        apipe = AsyncPipeline(recorded, batch_window_ms=200)  # type: ignore[arg-type]
        try:
            await asyncio.gather(apipe.generate(a), apipe.generate(b))
        finally:
            await apipe.aclose()

    asyncio.run(main())
    return recorded.calls


def _runtime_batches(pipeline, monkeypatch, a: GenerationRequest, b: GenerationRequest) -> list[int]:
    calls: list[int] = []
    original = pipeline.runner.run
    with monkeypatch.context() as m:
        m.setattr(pipeline.runner, "run", lambda batch: calls.append(len(batch)) or original(batch))
        results = pipeline.generate_batch([a, b])
    assert [len(r.images) for r in results] == [1, 1]
    return calls


@pytest.mark.parametrize(("what", "other"), SPLIT, ids=[w for w, _ in SPLIT])
def test_what_the_runtime_splits_the_service_does_not_batch(tiny_pipeline, monkeypatch, what, other) -> None:
    assert tiny_pipeline.admit(BASE) != tiny_pipeline.admit(other)
    assert _runtime_batches(tiny_pipeline, monkeypatch, BASE, other) == [1, 1], what
    assert _service_batches(tiny_pipeline, BASE, other) == [1, 1], what


@pytest.mark.parametrize(("what", "other"), TOGETHER, ids=[w for w, _ in TOGETHER])
def test_what_the_service_batches_runs_as_one_runtime_batch(tiny_pipeline, monkeypatch, what, other) -> None:
    assert tiny_pipeline.admit(BASE) == tiny_pipeline.admit(other)
    assert _service_batches(tiny_pipeline, BASE, other) == [2], what
    assert _runtime_batches(tiny_pipeline, monkeypatch, BASE, other) == [2], what


def test_the_graph_key_is_derived_from_the_shape(tiny_pipeline) -> None:
    """The captured step's key is the shape's subset: settings that only fill buffers share a graph."""
    shape = tiny_pipeline.admit(BASE)
    more_steps = tiny_pipeline.admit(replace(BASE, steps=7, timestep_spacing="trailing"))
    assert shape != more_steps and shape.graph_key("unet", 2) == more_steps.graph_key("unet", 2)
    unguided = tiny_pipeline.admit(replace(BASE, guidance_scale=1.0))
    assert unguided.graph_key("unet", 2) != shape.graph_key("unet", 2)
    with pytest.raises(ValueError, match="no refiner step"):
        shape.graph_key("refiner", 1)
    ensemble = tiny_pipeline.admit(replace(BASE, refiner_mode="ensemble", refiner_start=0.5, guidance_scale=1.0))
    assert not ensemble.graph_key("refiner", 1).guided  # the refiner guides by guidance_scale > 1 alone


def test_a_guidance_embedding_means_no_cfg_batch_at_any_guidance() -> None:
    """The runtime's rule, in the one place: a guidance-distilled UNet never runs a CFG batch, so its requests
    at guidance 7 and 0.5 share a shape (the service used to split them), while the refiner still guides."""
    from sdxl_trt.buckets import Bucket

    bucket = Bucket(256, 256)
    hi = StepShape.of(replace(BASE, guidance_scale=7.0), bucket, prompt_chunks=1, guidance_embedding=True)
    lo = StepShape.of(replace(BASE, guidance_scale=0.5), bucket, prompt_chunks=1, guidance_embedding=True)
    assert hi == lo and not hi.guided
    plain = StepShape.of(replace(BASE, guidance_scale=7.0), bucket, prompt_chunks=1, guidance_embedding=False)
    assert plain.guided and plain != hi
