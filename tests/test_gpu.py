"""GPU-only checks of the runtime (marked ``gpu``, skipped without CUDA): captured steps replay exactly what
eager execution computes, one captured step serves every step count and strength, and a warmed pipeline
allocates no device memory across requests.

They run on the tiny model with torch engines (fp16) so they finish in seconds on any CUDA GPU;
benchmarks/gpu_acceptance.sh runs them before the full-size measurements. The engines carry two ControlNets,
so every plain case also runs a ControlNet-built UNet with zero residuals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_trt.request import ControlNetUnit, GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("cuda") / "tiny-torch"
    build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="torch", precision="fp16",
                               device="cuda", max_batch=2, buckets="256x256,384x192",
                               controlnets=("tiny-controlnet:edges", "tiny-controlnet-small:depth")))
    return out


@pytest.fixture(scope="module")
def pipes(cuda_engines: Path) -> tuple[Any, Any]:
    from sdxl_trt.runtime.pipeline import Pipeline

    return (Pipeline.load(cuda_engines, device="cuda", use_cuda_graphs=True),
            Pipeline.load(cuda_engines, device="cuda", use_cuda_graphs=False))


def _image(seed: int, w: int = 256, h: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w: int = 256, h: int = 256) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[64:192, 64:160] = 255
    return Image.fromarray(m)


def _latents(pipe: Any, req: GenerationRequest) -> tuple[torch.Tensor, Any]:
    """The final latents of a one-batch request (read from the arena right after it ran) and the result."""
    result = pipe.generate(req)
    bucket = pipe.resolve_bucket(req)
    h, w = bucket.latent_hw
    latents = pipe.ctx.arena.view("latents", (req.num_images, pipe.ctx.dims.latent_channels, h, w)).clone()
    return latents, result


CASES = {
    "euler": dict(scheduler="euler", steps=6),
    "euler_a": dict(scheduler="euler_a", steps=6),
    "dpmpp_2m_sde": dict(scheduler="dpmpp_2m_sde", steps=6),
    "unipc": dict(scheduler="unipc", steps=6),
    "one_step": dict(scheduler="euler", steps=1),
    "img2img_low_strength": dict(scheduler="euler", steps=4, strength=0.3, init_image=_image(1)),
    "inpaint": dict(scheduler="euler_a", steps=5, strength=0.9, init_image=_image(2), mask_image=_mask()),
    "refiner_ensemble": dict(scheduler="dpmpp_2m_sde", steps=8, refiner_mode="ensemble", refiner_start=0.7),
    "refiner_img2img": dict(scheduler="euler", steps=4, refiner_mode="img2img", refiner_strength=0.3),
    "guidance_off": dict(scheduler="unipc", steps=5, guidance_scale=1.0),
    "batch_of_two_non_square": dict(scheduler="euler_a", steps=4, num_images=2, width=384, height=192),
    "controlnet": dict(scheduler="euler", steps=5, controlnets=(ControlNetUnit("edges", _image(3), scale=0.7),)),
    "two_controlnets_window_and_guess_mode": dict(
        scheduler="euler_a", steps=6, num_images=2, width=384, height=192,
        controlnets=(ControlNetUnit("edges", _image(4), scale=0.6, start=0.2, end=0.8),
                     ControlNetUnit("depth", _image(5), scale=1.1, guess_mode=True))),
    "controlnet_img2img": dict(scheduler="unipc", steps=6, strength=0.6, init_image=_image(6),
                               controlnets=(ControlNetUnit("depth", _image(7), scale=0.9),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_replay_equals_eager_bit_for_bit(pipes: tuple[Any, Any], case: str) -> None:
    graphed, eager = pipes
    for seed, prompt in ((5, "a lighthouse at dusk"), (17, "a red fox in the snow")):  # second replay: new inputs
        req = GenerationRequest(prompt=prompt, seed=seed, **CASES[case])
        a, ra = _latents(graphed, req)
        b, rb = _latents(eager, req)
        assert torch.equal(a, b), f"{case}: max |graph - eager| {float((a - b).abs().max())}"
        assert [np.asarray(i).tobytes() for i in ra.images] == [np.asarray(i).tobytes() for i in rb.images]
    assert graphed.cuda_graph_stats()["graphs"] > 0 and eager.cuda_graph_stats()["graphs"] == 0


def test_other_step_counts_and_strengths_reuse_the_captured_step(cuda_engines: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda")
    pipe.warmup(buckets=["256x256"], batch_sizes=[1], steps=2)
    before = pipe.cuda_graph_stats()
    assert before["graphs"] >= 5 and before["pool_bytes"] > 0  # plain and per-ControlNet steps, both text encoders
    for steps, strength in ((1, None), (7, None), (30, None), (10, 0.35), (6, 0.9)):
        extra = {} if strength is None else {"init_image": _image(steps), "strength": strength}
        pipe.generate(GenerationRequest(prompt="a castle", steps=steps, seed=steps, **extra))
        # each ControlNet alone was captured at warm-up, whatever its scale, window and image
        pipe.generate(GenerationRequest(prompt="a castle", steps=steps, seed=steps, **extra, controlnets=(
            ControlNetUnit("edges" if steps % 2 else "depth", _image(steps + 1), scale=0.5, start=0.1, end=0.9),)))
    assert pipe.cuda_graph_stats()["graphs"] == before["graphs"]
    assert not pipe.ctx.graphs._warned, "a request ran eagerly instead of replaying the captured step"


def test_no_device_allocation_across_mixed_requests_after_warmup(cuda_engines: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda")
    pipe.warmup(steps=2)  # every built bucket at 1 and max_batch images
    requests = []
    for i in range(20):
        w, h = ((256, 256), (384, 192))[i % 2]
        extra: dict[str, Any] = {"init_image": _image(i, w, h), "strength": 0.5 + 0.02 * i} if i % 3 == 0 else {}
        requests.append(GenerationRequest(prompt=f"request {i} " + "word " * (i % 5), negative_prompt="blur" * (i % 2),
                                          steps=3 + i % 9, seed=i, width=w, height=h, num_images=1 + i % 2, **extra))
    pipe.generate(requests[0])  # the first request after warm-up may still fill allocator caches of its own
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for req in requests:
        pipe.generate(req)
    torch.cuda.synchronize()
    # The caching allocator asked the device for nothing new: requests lived in the arena, the graphs' pool
    # and blocks freed by the request before.
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
    assert torch.cuda.memory_reserved() == reserved


def test_an_engine_that_ignores_the_stream_is_never_captured() -> None:
    """ONNX Runtime engines (graph_safe False) run eagerly even while capture is allowed."""
    from sdxl_trt.runtime.graphs import CudaGraphs

    graphs = CudaGraphs(torch.device("cuda", torch.cuda.current_device()), enabled=True)
    x = torch.zeros(4, device="cuda")
    ran: list[int] = []

    def work() -> None:
        ran.append(1)
        x.add_(1)

    assert graphs.get("ort", work, graph_safe=False, mutable=[x]) is None
    assert graphs.graphs == {} and ran == []
    graph = graphs.get("torch", work, graph_safe=True, mutable=[x])
    assert graph is not None and float(x.sum()) == 0  # captured, and the capture left x as it was
    graph.replay()
    torch.cuda.synchronize()
    assert float(x.sum()) == 4


def test_explicit_device_index_and_bf16_vae(cuda_engines: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda:0")
    assert pipe.device == torch.device("cuda", 0)
    result = pipe.generate(GenerationRequest(prompt="a boat", steps=2, seed=1))
    assert result.images[0].size == (256, 256)
    if torch.cuda.is_bf16_supported():
        assert pipe.ctx.dtypes["vae_decoder"] == torch.bfloat16


def test_warmup_captures_each_sampler_and_guidance_setting(cuda_engines: Path) -> None:
    """warmup(schedulers=, guidance_scales=): requests with those samplers, guided or not, replay captured steps."""
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda")
    pipe.warmup(buckets=["256x256"], batch_sizes=[1], steps=2, refiner=False, controlnets=[],
                schedulers=["unipc", "dpmpp_2m"], guidance_scales=[5.0, 0.0])
    before = pipe.cuda_graph_stats()["graphs"]
    for sampler in ("unipc", "dpmpp_2m"):
        for guidance in (7.0, 1.0):
            pipe.generate(GenerationRequest(prompt="a harbour", steps=4, seed=2, scheduler=sampler,
                                            guidance_scale=guidance))
    assert pipe.cuda_graph_stats()["graphs"] == before
    assert not pipe.ctx.graphs._warned, "a request ran eagerly instead of replaying the captured step"
