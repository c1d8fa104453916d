"""The runtime's CUDA-graph path: captured steps replay exactly what eager execution computes, one captured step
serves every step count and strength, warm-up captures what it promises, the text encoders replay theirs, and
LoRA weights switched in place reach the next replay.

The same tests run on two targets:

* ``emulated`` (CPU, CI): graphs emulated on CPU tensors (runtime/graph_emulation.py: aten calls recorded once,
  Python values frozen, replays re-running only what was recorded) over fp32 torch engines of the tiny
  components (tests/support/torch_engines.py); ControlNet and plain cases run on a ControlNet build (zero
  residuals for the plain ones), refiner cases on a refiner build;
* ``cuda`` (marked ``gpu``, skipped without CUDA; benchmarks/gpu_acceptance.sh runs them): real CUDA graphs
  over tiny torch engines built fp16 on the GPU, carrying a refiner and two ControlNets.

Tests of CUDA's own machinery (allocator segments, device indices, bf16 kernels, streams) are ``gpu`` only, each
saying why. The proofs that the emulation is no pass-through (a host counter replays wrong, ONNX Runtime
replays a stale output, ``.item()`` is refused) close the file, with the CPU halves of the stream faults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support.torch_engines import TINY_TORCH_BUCKETS, EngineSet

from sdxl_trt.buckets import Bucket
from sdxl_trt.request import ControlNetUnit, GenerationRequest
from sdxl_trt.step_shape import GraphKey


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("cuda") / "tiny-torch"
    build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="torch", precision="fp16",
                               device="cuda", max_batch=2, buckets="256x256,384x192",
                               controlnets=("tiny-controlnet:edges", "tiny-controlnet-small:depth")))
    return out


@dataclass
class Target:
    """Where the graph tests run: engine sets by kind ("controlnet", "refiner") and the graph mode that captures."""

    name: str
    sets: dict[str, EngineSet]
    graphed_mode: str
    square: tuple[int, int]  # (width, height) of a square and a wide built bucket
    wide: tuple[int, int]
    _pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.sets["controlnet"].device

    @property
    def square_bucket(self) -> str:
        return "{}x{}".format(*self.square)

    def image(self, seed: int, size: tuple[int, int] | None = None) -> Image.Image:
        return _image(seed, *(size or self.square))

    def pipeline(self, kind: str = "controlnet", *, graphs: bool = True, **kwargs: Any) -> Any:
        return self.sets[kind].pipeline(cuda_graphs=self.graphed_mode if graphs else "off", **kwargs)

    def pair(self, kind: str) -> tuple[Any, Any]:
        """A graphed and an eager pipeline over the same engines, shared by the tests of this module."""
        if kind not in self._pairs:
            self._pairs[kind] = (self.pipeline(kind), self.pipeline(kind, graphs=False))
        return self._pairs[kind]


@pytest.fixture(scope="module")
def emulated(graph_test_engines: Any) -> Target:
    sets = {"controlnet": graph_test_engines.controlnet, "refiner": graph_test_engines.refiner}
    square, wide = (Bucket.parse(b) for b in TINY_TORCH_BUCKETS)
    return Target("emulated", sets, "emulate", (square.width, square.height), (wide.width, wide.height))


@pytest.fixture(scope="module", params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "cuda":
        torch.backends.cudnn.benchmark = True  # as Pipeline.load sets it on a GPU
        engines = EngineSet.loaded(request.getfixturevalue("cuda_engines"), torch.device("cuda", 0))
        return Target("cuda", {"controlnet": engines, "refiner": engines}, "on", (256, 256), (384, 192))
    return request.getfixturevalue("emulated")


def _image(seed: int, w: int = 256, h: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w: int, h: int) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 5 * w // 8] = 255
    return Image.fromarray(m)


def _latents(pipe: Any, req: GenerationRequest) -> tuple[torch.Tensor, Any]:
    """The final latents of a one-batch request (read from the arena right after it ran) and the result."""
    result = pipe.generate(req)
    bucket = pipe.resolve_bucket(req)
    h, w = bucket.latent_hw
    latents = pipe.ctx.arena.view("latents", (req.num_images, pipe.ctx.dims.latent_channels, h, w)).clone()
    return latents, result


def _pixels(result: Any) -> list[bytes]:
    return [np.asarray(i).tobytes() for i in result.images]


CASES: dict[str, Callable[[Target], dict[str, Any]]] = {
    "euler": lambda t: dict(scheduler="euler", steps=3),
    "euler_a": lambda t: dict(scheduler="euler_a", steps=3),
    "dpmpp_2m_sde": lambda t: dict(scheduler="dpmpp_2m_sde", steps=3),
    "unipc": lambda t: dict(scheduler="unipc", steps=3),
    "one_step": lambda t: dict(scheduler="euler", steps=1),
    "img2img_low_strength": lambda t: dict(scheduler="euler", steps=4, strength=0.3, init_image=t.image(1)),
    "inpaint": lambda t: dict(scheduler="euler_a", steps=3, strength=0.9, init_image=t.image(2),
                              mask_image=_mask(*t.square)),
    "refiner_ensemble": lambda t: dict(scheduler="dpmpp_2m_sde", steps=5, refiner_mode="ensemble", refiner_start=0.7),
    "refiner_img2img": lambda t: dict(scheduler="euler", steps=3, refiner_mode="img2img", refiner_strength=0.4),
    "guidance_off": lambda t: dict(scheduler="unipc", steps=3, guidance_scale=1.0),
    "batch_of_two_non_square": lambda t: dict(scheduler="euler_a", steps=3, num_images=2, width=t.wide[0],
                                              height=t.wide[1]),
    "controlnet": lambda t: dict(scheduler="euler", steps=3,
                                 controlnets=(ControlNetUnit("edges", t.image(3), scale=0.7),)),
    "two_controlnets_window_and_guess_mode": lambda t: dict(
        scheduler="euler_a", steps=3, num_images=2, width=t.wide[0], height=t.wide[1],
        controlnets=(ControlNetUnit("edges", t.image(4, t.wide), scale=0.6, start=0.2, end=0.8),
                     ControlNetUnit("depth", t.image(5, t.wide), scale=1.1, guess_mode=True))),
    "controlnet_img2img": lambda t: dict(scheduler="unipc", steps=4, strength=0.6, init_image=t.image(6),
                                         controlnets=(ControlNetUnit("depth", t.image(7), scale=0.9),)),
}
"""Each case's request settings on a target (its bucket sizes)."""


def _kind(case: dict[str, Any]) -> str:
    return "refiner" if case.get("refiner_mode") else "controlnet"


@pytest.mark.parametrize("case", list(CASES))
def test_graph_replay_equals_eager_bit_for_bit(target: Target, case: str) -> None:
    settings = CASES[case](target)
    graphed, eager = target.pair(_kind(settings))
    for seed, prompt in ((5, "a lighthouse at dusk"), (17, "a red fox in the snow")):  # second replay: new inputs
        req = GenerationRequest(prompt=prompt, seed=seed, **settings)
        a, ra = _latents(graphed, req)
        b, rb = _latents(eager, req)
        assert torch.equal(a, b), f"{case}: max |graph - eager| {float((a - b).abs().max())}"
        assert _pixels(ra) == _pixels(rb)
    stats = graphed.cuda_graph_stats()
    assert stats["graphs"] > 0 and eager.cuda_graph_stats()["graphs"] == 0
    assert stats["emulated"] == (target.name == "emulated")
    assert not graphed.ctx.graphs._warned  # capture was allowed: every key of the case was captured


def test_other_step_counts_and_strengths_reuse_the_captured_step(target: Target) -> None:
    pipe = target.pipeline()
    pipe.warmup(buckets=[target.square_bucket], batch_sizes=[1], steps=2)
    before = pipe.cuda_graph_stats()
    assert before["graphs"] >= 5  # plain and per-ControlNet steps, both text encoders
    assert before["pool_bytes"] > 0 if target.name == "cuda" else before["pool_bytes"] == 0 and before["emulated"]
    for steps, strength in ((1, None), (6, None), (5, 0.35), (3, 0.9)):
        extra = {} if strength is None else {"init_image": target.image(steps), "strength": strength}
        pipe.generate(GenerationRequest(prompt="a castle", steps=steps, seed=steps, **extra))
        # each ControlNet alone was captured at warm-up, whatever its scale, window and image
        pipe.generate(GenerationRequest(prompt="a castle", steps=steps, seed=steps, **extra, controlnets=(
            ControlNetUnit("edges" if steps % 2 else "depth", target.image(steps + 1), scale=0.5, start=0.1,
                           end=0.9),)))
    assert pipe.cuda_graph_stats()["graphs"] == before["graphs"]
    assert not pipe.ctx.graphs._warned, "a request ran eagerly instead of replaying the captured step"


@pytest.mark.gpu  # CUDA only: counts the caching allocator's device segments
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


def test_an_engine_that_ignores_the_stream_is_never_captured(target: Target) -> None:
    """ONNX Runtime engines (graph_safe False) run eagerly even while capture is allowed."""
    from sdxl_trt.runtime.graphs import CudaGraphs

    graphs = CudaGraphs(target.device, enabled=True, emulate=target.name == "emulated")
    x = torch.zeros(4, device=target.device)
    ran: list[int] = []

    def work() -> None:
        ran.append(1)
        x.add_(1)

    assert graphs.get("ort", work, graph_safe=False, mutable=[x]) is None
    assert graphs.graphs == {} and ran == []
    graph = graphs.get("torch", work, graph_safe=True, mutable=[x])
    assert graph is not None and float(x.sum()) == 0  # captured, and the capture left x as it was
    graph.replay()
    assert float(x.sum()) == 4


@pytest.mark.gpu  # CUDA only: a device index and bf16 kernels
def test_explicit_device_index_and_bf16_vae(cuda_engines: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda:0")
    assert pipe.device == torch.device("cuda", 0)
    result = pipe.generate(GenerationRequest(prompt="a boat", steps=2, seed=1))
    assert result.images[0].size == (256, 256)
    if torch.cuda.is_bf16_supported():
        assert pipe.ctx.dtypes["vae_decoder"] == torch.bfloat16


def test_warmup_captures_each_sampler_and_guidance_setting(target: Target) -> None:
    """warmup(schedulers=, guidance_scales=): requests with those samplers, guided or not, replay captured steps."""
    pipe = target.pipeline()
    pipe.warmup(buckets=[target.square_bucket], batch_sizes=[1], steps=2, refiner=False, controlnets=[],
                schedulers=["unipc", "dpmpp_2m"], guidance_scales=[5.0, 0.0])
    before = pipe.cuda_graph_stats()["graphs"]
    for sampler in ("unipc", "dpmpp_2m"):
        for guidance in (7.0, 1.0):
            pipe.generate(GenerationRequest(prompt="a harbour", steps=3, seed=2, scheduler=sampler,
                                            guidance_scale=guidance))
    assert pipe.cuda_graph_stats()["graphs"] == before
    assert not pipe.ctx.graphs._warned, "a request ran eagerly instead of replaying the captured step"


def test_text_encoder_graphs_replay_new_prompts(target: Target) -> None:
    """Each encoder's graph per row count: conditioning of new prompts (a negative prompt, two chunks) equals
    the eager encoders' bit for bit."""
    graphed, eager = target.pair("controlnet")
    long = "a very detailed painting of " + ", ".join(f"item {i}" for i in range(30))  # over 75 tokens
    expected = set()
    for prompt, negative in (("a lighthouse", ""), ("a fox", "blurry"), ("a castle", "low quality"), (long, "")):
        req = GenerationRequest(prompt=prompt, negative_prompt=negative, seed=1)
        shape = graphed.admit(req)
        ours, theirs = graphed.conditioner.encode(0, req, shape)[0], eager.conditioner.encode(0, req, shape)[0]
        assert set(ours.cond) == set(theirs.cond)
        for k in ours.cond:
            assert torch.equal(ours.cond[k], theirs.cond[k]), (prompt, k)
        # rows per chunk: text_encoder the prompt (and a non-empty negative), text_encoder_2 both
        expected |= {("text", "text_encoder", shape.prompt_chunks * (2 if negative else 1)),
                     ("text", "text_encoder_2", shape.prompt_chunks * 2)}
    assert any(k[2] > 2 for k in expected)  # the long prompt took two chunks or more
    assert expected <= set(graphed.ctx.graphs.graphs)


@pytest.fixture(scope="module")
def lora_dir(target: Target, tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two LoRAs, ``style`` (diffusers keys) and ``detail`` (kohya), on every UNet and text-encoder weight the
    engines read (a weight the weight map marks unused, pruned at export, is left out)."""
    from support import lora_files as lf

    from sdxl_trt.lora import lora_weight_shapes
    from sdxl_trt.lora.weight_map import WeightMap

    base = tiny_models[0]
    shapes = lora_weight_shapes({"unet": base.unet, "text_encoder": base.text_encoder,
                                 "text_encoder_2": base.text_encoder_2})
    weights = WeightMap.load(target.sets["controlnet"].directory / "weight_map.json").components
    used = {c: {n: s for n, s in names.items() if not weights[c].weights[n].unused} for c, names in shapes.items()}
    d = tmp_path_factory.mktemp("graph-loras")
    lf.write_diffusers_lora(d / "style.safetensors", used, rank=4, std=0.08, seed=5)
    lf.write_kohya_lora(d / "detail.safetensors", used, rank=4, alpha=2.0, std=0.08, seed=6)
    return d


def test_a_lora_switch_on_a_warmed_pipeline_reaches_the_next_replay(target: Target, lora_dir: Path) -> None:
    """Weights changed in place (UNet and text encoders) are what the next replay reads: a warmed pipeline
    gives each LoRA set's images as an eager one, without capturing anything new."""
    d = lora_dir
    sets = [(), (("style", 0.8),), (("detail", -0.6), ("style", 0.3)), ()]
    graphed = target.pipeline(lora_dirs=[d])
    graphed.warmup(buckets=[target.square_bucket], batch_sizes=[1], steps=2, controlnets=[])
    captured = graphed.cuda_graph_stats()["graphs"]
    req = GenerationRequest(prompt="a watercolor of a harbour", steps=3, seed=3)
    ours = [_pixels(graphed.generate(replace(req, loras=s))) for s in sets]
    assert graphed.cuda_graph_stats()["graphs"] == captured and not graphed.ctx.graphs._warned
    eager = target.pipeline(graphs=False, lora_dirs=[d])  # after the graphed one is back on the base weights
    theirs = [_pixels(eager.generate(replace(req, loras=s))) for s in sets]
    assert ours == theirs
    assert ours[0] == ours[3] and len({b"".join(p) for p in ours[:3]}) == 3  # the LoRAs do change the image


# ------------------------------------------------------------------------------- no pass-through
def test_a_step_reading_a_host_counter_replays_wrong(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted fault: the step reads its schedule row with a Python counter of the loop's steps instead of the
    device step index. Eagerly that is the same row; a graph froze the counter's value at capture, so its
    replays are wrong, under emulation as on CUDA. (A graph that re-ran the work eagerly would be right.)"""
    from sdxl_trt.runtime import denoise
    from sdxl_trt.runtime.graphs import CudaGraphs
    from sdxl_trt.runtime.schedulers._base import Schedule

    req = GenerationRequest(prompt="a lighthouse at dusk", seed=5, scheduler="euler", steps=4)
    right, _ = _latents(target.pipeline(graphs=False), req)
    host = {"step": 0}
    real_step, real_get, real_row = denoise.Denoiser.step, CudaGraphs.get, Schedule._row

    def step(self: Any, *args: Any, **kwargs: Any) -> None:
        real_step(self, *args, **kwargs)
        host["step"] += 1

    def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        graph = real_get(self, *args, **kwargs)
        host["step"] = 0  # the loop's first step comes next (capture's warm-up runs are not the loop's)
        return graph

    def row(table: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:
        return real_row(table, step_index if isinstance(step_index, int) else host["step"])

    monkeypatch.setattr(denoise.Denoiser, "step", step)
    monkeypatch.setattr(CudaGraphs, "get", get)
    monkeypatch.setattr(Schedule, "_row", staticmethod(row))
    eager, _ = _latents(target.pipeline(graphs=False), req)
    assert torch.equal(eager, right)  # eagerly the counter is the step index
    pipe = target.pipeline()
    graphed, _ = _latents(pipe, req)
    assert [k for k in pipe.ctx.graphs.graphs if isinstance(k, GraphKey)], "the step was not captured"
    assert not torch.equal(graphed, right)


def test_an_item_inside_the_step_is_refused_at_capture(emulated: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated only: a real capture's refusal (cudaErrorStreamCaptureUnsupported) can leave the device unusable
    for the tests after it."""
    from sdxl_trt.runtime.graph_emulation import GraphCaptureError
    from sdxl_trt.runtime.schedulers._base import Schedule

    real_row = Schedule._row

    def row(table: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:  # a planted host read
        return real_row(table, step_index if isinstance(step_index, int) else int(step_index.item()))

    monkeypatch.setattr(Schedule, "_row", staticmethod(row))
    pipe = emulated.pipeline()
    with pytest.raises(GraphCaptureError, match=r"aten\._local_scalar_dense.* issued at runtime/schedulers/_base\.py"):
        pipe.generate(GenerationRequest(prompt="a fox", seed=1, steps=2))
    assert not [k for k in pipe.ctx.graphs.graphs if isinstance(k, GraphKey)]


def test_an_onnx_runtime_engine_inside_an_emulated_capture_replays_a_stale_output(tiny_pipeline: Any) -> None:
    """ONNX Runtime works outside torch: captured against its graph_safe flag, its output is the capture's for
    good. graph_safe keeps it out, so a pipeline over ONNX Runtime engines captures nothing."""
    from sdxl_trt.runtime.graphs import CudaGraphs
    from sdxl_trt.runtime.pipeline import Pipeline

    ctx, tok = tiny_pipeline.ctx, tiny_pipeline.conditioner.tokenizers[0]
    engine, dims = ctx.engines["text_encoder"], {"B": 1}
    bound = ctx.bind("text_encoder", dims)
    inputs, outputs, profile = bound.inputs, bound.outputs, bound.profile

    def work() -> None:
        engine.run(inputs, outputs, profile=profile)

    def ids(prompt: str) -> torch.Tensor:
        return tok.chunk(tok.content_ids(prompt), 1)

    graphs = CudaGraphs(torch.device("cpu"), enabled=True, emulate=True)
    assert graphs.get("ort", work, graph_safe=engine.graph_safe, mutable=()) is None
    inputs["input_ids"].copy_(ids("a lighthouse"))
    graph = graphs.get("forced", work, graph_safe=True, mutable=())
    assert graph is not None
    captured = outputs["hidden_states"].clone()
    inputs["input_ids"].copy_(ids("a red fox in the snow"))
    graph.replay()
    stale = outputs["hidden_states"].clone()
    work()
    assert torch.equal(stale, captured) and not torch.equal(outputs["hidden_states"], captured)

    pipe = Pipeline(tiny_pipeline.directory, tiny_pipeline.manifest, tiny_pipeline.engines, torch.device("cpu"),
                    cuda_graphs="emulate")
    pipe.generate(GenerationRequest(prompt="a fox", seed=1, steps=2))
    assert pipe.cuda_graph_stats() == {"graphs": 0, "pool_bytes": 0, "emulated": True}


# ------------------------------------------------------------------------------- CUDA streams
class _FakeStream:
    def __init__(self, device: Any = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cuda", 0)
        self.calls: list[str] = []

    def wait_stream(self, other: Any) -> None:
        self.calls.append("wait_stream")

    def synchronize(self) -> None:
        self.calls.append("synchronize")


def test_each_cuda_graphs_captures_on_a_stream_of_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.graph's default capture stream is one per process, made on the GPU that captured first: each
    CudaGraphs passes a stream of its own device instead (CPU check with fakes of torch.cuda)."""
    from sdxl_trt.runtime.graphs import CudaGraphs

    captured_on: list[Any] = []

    @contextlib.contextmanager
    def fake_graph(graph: Any, pool: Any = None, stream: Any = None) -> Any:
        captured_on.append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool",))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    first, second = CudaGraphs(torch.device("cuda", 0), enabled=True), CudaGraphs(torch.device("cuda", 1), enabled=True)
    for graphs in (first, second):
        assert graphs.get("step", lambda: None, graph_safe=True, mutable=()) is not None
    assert captured_on == [first.stream, second.stream]
    assert [s.device for s in captured_on] == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.gpu  # CUDA only: real streams
def test_captures_use_the_stream_of_their_device_on_cuda() -> None:
    from sdxl_trt.runtime.graphs import CudaGraphs

    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:  # one GPU: its own stream; several: the second GPU records too
        graphs = CudaGraphs(device, enabled=True)
        assert graphs.stream is not None and graphs.stream.device == device
        with torch.cuda.device(device):
            x = torch.zeros(4, device=device)
            graph = graphs.get("add", lambda x=x: x.add_(1), graph_safe=True, mutable=[x])
            assert graph is not None
            graph.replay()
            graph.replay()
            torch.cuda.synchronize(device)
        assert x.tolist() == [2.0] * 4


def test_onnx_runtime_waits_for_torchs_stream_before_it_reads_its_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch fills the bound inputs on its stream, ONNX Runtime reads them from its own: on CUDA, run()
    synchronises torch's stream first (CPU check with a fake session and stream)."""
    from sdxl_trt.runtime.onnxruntime_engine import OnnxRuntimeEngine

    events: list[str] = []

    class Stream(_FakeStream):
        def synchronize(self) -> None:
            events.append("torch stream synchronised")

    class Binding:
        def bind_input(self, *args: Any) -> None:
            events.append("bind input")

        def bind_output(self, *args: Any) -> None:
            events.append("bind output")

    class Session:
        def io_binding(self) -> Binding:
            return Binding()

        def run_with_iobinding(self, binding: Binding) -> None:
            events.append("ORT runs")

    engine = object.__new__(OnnxRuntimeEngine)
    engine.spec, engine.device, engine.session = None, torch.device("cuda", 0), Session()  # type: ignore[assignment]
    engine._ort_device, engine._device_id = "cuda", 0
    x, y = torch.zeros(2), torch.zeros(2)
    engine.run({"x": x}, {"y": y}, profile=0, stream=Stream())  # type: ignore[arg-type]
    assert events == ["bind input", "bind output", "torch stream synchronised", "ORT runs"]
    events.clear()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    engine.run({"x": x}, {"y": y}, profile=0)  # no stream given: torch's current one
    assert events[-2:] == ["torch stream synchronised", "ORT runs"]
    engine.device, engine._ort_device = torch.device("cpu"), "cpu"
    events.clear()
    engine.run({"x": x}, {"y": y}, profile=0)
    assert "torch stream synchronised" not in events


@pytest.mark.gpu  # CUDA only: ONNX Runtime's CUDA execution provider (onnxruntime-gpu)
def test_onnx_runtime_on_cuda_reads_what_torch_wrote_last(tiny_engines: Path) -> None:
    import onnxruntime as ort

    from sdxl_trt.runtime.pipeline import Pipeline

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (onnxruntime-gpu is not installed)")
    pipe = Pipeline.load(tiny_engines, device="cuda")
    ctx = pipe.ctx
    engine, dims = ctx.engines["vae_decoder"], {"B": 1, "h": 32, "w": 32}
    bound = ctx.bind("vae_decoder", dims)
    inputs, outputs, profile = bound.inputs, bound.outputs, bound.profile
    latent = torch.randn(inputs["latent"].shape, device="cuda")
    big = torch.randn(4096, 4096, device="cuda")
    inputs["latent"].zero_()
    torch.cuda.synchronize()
    for _ in range(20):  # keep torch's stream busy, then write the input last
        big = big @ big / 64
    inputs["latent"].copy_(latent)
    engine.run(inputs, outputs, profile=profile, stream=torch.cuda.current_stream())
    got = outputs["images"].clone()
    inputs["latent"].copy_(latent)
    torch.cuda.synchronize()
    engine.run(inputs, outputs, profile=profile, stream=torch.cuda.current_stream())
    assert torch.equal(got, outputs["images"])


def test_a_pipelines_work_runs_on_a_stream_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager work (VAE, uncaptured encoders, eager steps) must not run on the legacy default stream: the
    pipeline's scope makes its device and a stream of its own current (CPU check with fakes of torch.cuda)."""
    from sdxl_trt.runtime.context import DeviceScope

    entered: list[Any] = []
    default = _FakeStream(torch.device("cuda", 1))

    @contextlib.contextmanager
    def stream(s: Any) -> Any:
        entered.append(s)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: default)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    scope = DeviceScope(torch.device("cuda", 1))
    with scope():
        pass
    assert entered == [scope.stream] and scope.stream is not default
    assert scope.stream.device == torch.device("cuda", 1)
    assert scope.stream.calls == ["wait_stream"]  # after what the device's current stream holds (loaded weights)
    entered.clear()
    with DeviceScope(torch.device("cpu"))():
        pass
    assert entered == []


@pytest.mark.gpu  # CUDA only: real streams
def test_engines_run_on_the_pipelines_stream_on_cuda(cuda_engines: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda", use_cuda_graphs=False)
    seen: list[Any] = []
    for engine in pipe.engines.values():
        real = engine.run

        def run(*args: Any, real: Any = real, **kwargs: Any) -> None:
            seen.append(torch.cuda.current_stream())
            real(*args, **kwargs)

        engine.run = run  # type: ignore[method-assign]
    pipe.generate(GenerationRequest(prompt="a boat", steps=2, seed=1, init_image=_image(1), strength=0.5))
    assert seen and all(s == pipe.scope.stream for s in seen)
    assert pipe.scope.stream != torch.cuda.default_stream()
