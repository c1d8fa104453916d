"""``Pipeline``: load engines once, then turn requests into images (txt2img, img2img, inpainting, refiner).

Seeds follow diffusers' semantics with one generator per image: image ``k`` of a request with seed
``s`` is drawn from ``torch.Generator().manual_seed(s + k)`` in the order diffusers draws (VAE posterior
sample, initial noise, then every scheduler step's noise), so the same settings give the same image as
diffusers' SDXL pipelines called with ``generator=[Generator(s), Generator(s+1), ...]``, and an image
never depends on what it was batched with.

The work is split along its seams: conditioning.py checks a request's inputs and encodes its prompts (one
slot per image), batch.py runs a batch of slots through the UNets and the VAE, context.py holds what both
share (engines, buffers, CUDA graphs). This module admits requests (:meth:`Pipeline.admit`: every refusal,
and the request's :class:`~sdxl_trt.step_shape.StepShape`), groups their images into batches by that shape
(the same value a service batches by) and owns the lock.

Thread safety: ``generate``/``generate_batch`` hold one lock; engines, buffers and graphs are shared.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import WARMUP_PROMPT_CHUNKS, shallow_branches
from sdxl_trt.engine_dir.manifest import Manifest, open_engine_dir, unpassed_guidance_embedding
from sdxl_trt.errors import InvalidRequestError, ManifestError
from sdxl_trt.request import ControlNetUnit, GenerationRequest, GenerationResult
from sdxl_trt.samplers import SCHEDULERS, scheduler_for_config
from sdxl_trt.step_shape import StepShape

from .batch import BatchRunner, StageTimer
from .conditioning import Conditioner, resolve_bucket
from .context import DeviceScope, EngineContext
from .engine import Engine
from .graphs import CudaGraphs, graph_mode
from .loader import load_engines, resolve_device
from .lora import LoraSet, LoraSwitcher, check_lora_set
from .slots import Batch, Slot
from .text import CONTENT_TOKENS

log = logging.getLogger(__name__)


def _with_deepcache(command: str, branches: Sequence[int]) -> str:
    """A build command with ``--deepcache`` naming ``branches`` (replacing the one it has)."""
    words = command.split()
    if "--deepcache" in words:
        i = words.index("--deepcache")
        del words[i:i + 2]
    return " ".join([*words, "--deepcache", ",".join(map(str, sorted(set(branches))))])


class Pipeline:
    def __init__(self, directory: Path, manifest: Manifest, engines: dict[str, Engine], device: torch.device, *,
                 max_steps: int = 150, use_cuda_graphs: bool = True, lora_dirs: Sequence[str | Path] = (),
                 cuda_graphs: str | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.engines = engines
        self.device = device
        self.backend = manifest.backend
        self.max_steps = max_steps
        self.scope = DeviceScope(device)  # every call runs on the pipeline's GPU and its own stream
        with self._on_device():
            mode = graph_mode(cuda_graphs, use_cuda_graphs)
            graphs = CudaGraphs(device, enabled=mode != "off", emulate=mode == "emulate")
            self.ctx = EngineContext(manifest, engines, device, graphs, max_steps)
            self.conditioner = Conditioner(self.ctx, self.directory)
            self.runner = BatchRunner(self.ctx, self._scheduler_configs())
            self.loras = LoraSwitcher(self.ctx, self.directory, lora_dirs)
        self.buckets = self.ctx.buckets
        self.progress = self.runner.progress  # the running batch's steps, for progress endpoints (any thread)
        self.max_batch = manifest.max_batch
        self.has_refiner = "refiner" in engines
        # Step caching (DeepCache): the branches whose shallow UNets were built (``--deepcache``).
        self.cache_branches: tuple[int, ...] = tuple(shallow_branches(engines))
        self._lock = threading.Lock()
        # What `sdxl-trt run` uses when no --scheduler is given: the model's own (LCMScheduler config -> lcm).
        self.default_scheduler = scheduler_for_config(self.runner.schedules.scheduler_configs["unet"]) or "euler"
        self._unpassed_time_cond = unpassed_guidance_embedding(manifest)
        if self._unpassed_time_cond:
            log.warning("%s: the model's UNet takes a guidance embedding (time_cond_proj_dim %d) that these engines "
                        "were built without; requests are refused until it is rebuilt: %s", directory,
                        self._unpassed_time_cond, manifest.rebuild_hint(directory))
        log.info("pipeline ready: backend %s on %s, buckets %s, max batch %d, arena %.1f MB, CUDA graphs %s",
                 self.backend, device, ", ".join(map(str, self.buckets)), self.max_batch,
                 self.ctx.arena.nbytes / 2**20, "emulated" if graphs.emulated else "on" if graphs.enabled else "off")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = None, verify_hashes: bool = True,
             compile: bool = False, max_steps: int = 150, use_cuda_graphs: bool = True,
             lora_dirs: Sequence[str | Path] = (), cuda_graphs: str | None = None) -> Pipeline:
        """Check the engine directory against this machine and load every engine once.

        ``lora_dirs``: folders of ``NAME.safetensors`` LoRAs that requests may name (``GenerationRequest.loras``;
        paths work too from Python). A LoRA switch updates the engines' weights between batches, in place.

        ``cuda_graphs``: "on" (the default: CUDA graphs on a GPU, none on the CPU), "off", or "emulate": graph
        semantics emulated on CPU tensors, for tests of the graph path (runtime/graph_emulation.py; slower than
        eager). ``use_cuda_graphs=False`` is the older spelling of "off"."""
        directory = Path(directory)
        manifest = open_engine_dir(directory, verify_hashes=verify_hashes)
        dev = resolve_device(device, manifest.backend)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: the autotuned kernels pay off
        t0 = time.perf_counter()
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            engines = load_engines(directory, manifest, device=dev, compile_torch=compile)
        log.info("loaded %d engines from %s in %.2f s", len(engines), directory, time.perf_counter() - t0)
        return cls(directory, manifest, engines, dev, max_steps=max_steps, use_cuda_graphs=use_cuda_graphs,
                   lora_dirs=lora_dirs, cuda_graphs=cuda_graphs)

    def _scheduler_configs(self) -> dict[str, dict[str, Any]]:
        base = json.loads((self.directory / "scheduler" / "scheduler_config.json").read_text())
        ref = self.directory / "refiner_scheduler" / "scheduler_config.json"
        return {"unet": base, "refiner": json.loads(ref.read_text()) if ref.exists() else base}

    def _on_device(self) -> contextlib.AbstractContextManager[None]:
        """Make the pipeline's GPU (``cuda:1`` must not launch on ``cuda:0``) and its non-default stream current."""
        return self.scope()

    # ------------------------------------------------------------------ public API
    def warmup(self, *, buckets: Sequence[str | Bucket] | None = None, batch_sizes: Sequence[int] | None = None,
               steps: int = 2, scheduler: str | None = None, guidance_scale: float = 5.0,
               refiner: bool | None = None, controlnets: Sequence[str] | None = None,
               schedulers: Sequence[str] | None = None, guidance_scales: Sequence[float] | None = None,
               prompt_chunks: int = WARMUP_PROMPT_CHUNKS) -> float:
        """Run each bucket (default: every built one) at each batch size (default: 1 and max_batch) once,
        capturing CUDA graphs; then forbid capture. Returns the seconds spent.

        Call it once after ``load`` in a service, before taking traffic: afterwards no request waits behind a
        capture, and shapes first seen after warm-up run eagerly instead. One captured step serves every
        step count and strength of a scheduler, so a short warm-up (``steps``) captures everything.

        Every graph key a request can reach within these buckets, batch sizes, samplers and guidance settings is
        captured: prompts of 1 to ``prompt_chunks`` chunks of 75 tokens (capped at the engines'), with an empty
        or a given negative prompt, txt2img/img2img and inpainting. A step is captured per sampler and per
        guidance on/off: ``schedulers`` (default: ``scheduler``, else the model's own, ``lcm`` for an LCM model)
        and ``guidance_scales`` (default: ``guidance_scale``; one at or below 1 captures the step without
        classifier-free guidance, as few-step recipes run).
        ``refiner`` (default: when there is one) runs the ensemble too, capturing the refiner's step.
        Engines built with ``--deepcache`` also capture each branch's shallow step (a request at interval 2).
        ``controlnets`` (default: every built one) also captures the step with each ControlNet alone; other
        ControlNet sets (two at once, guess mode) are captured on first use, or run eagerly after warm-up.

        After the last capture (which empties the allocator's cache) each (bucket, batch size) runs one img2img
        request, capture forbidden: the VAE encoder and decoder, never captured, run eagerly at every shape once
        (cuDNN's autotuning included) before traffic does. On the CPU without graphs, where nothing is captured
        or cached, each bucket and batch size just runs once.
        """
        use_refiner = self.has_refiner if refiner is None else refiner and self.has_refiner
        if use_refiner:
            steps = max(steps, 5)  # the base's 80% and the refiner's 20% must each keep a step
        t0 = time.perf_counter()
        chosen = self.buckets if buckets is None else [b if isinstance(b, Bucket) else Bucket.parse(b) for b in buckets]
        unknown = [str(b) for b in chosen if b not in self.buckets]
        if unknown:
            raise InvalidRequestError(f"warm-up bucket(s) {', '.join(unknown)} were not built; built: "
                                      f"{', '.join(map(str, self.buckets))}", param="warmup")
        samplers = list(schedulers or [scheduler or self.default_scheduler])
        unknown = [s for s in samplers if s not in SCHEDULERS]
        if unknown:
            raise InvalidRequestError(f"warm-up scheduler(s) {', '.join(unknown)} are unknown; choose from "
                                      f"{', '.join(SCHEDULERS)}", param="warmup_schedulers")
        if prompt_chunks < 1:
            raise InvalidRequestError(f"warm-up prompt chunks must be at least 1, got {prompt_chunks}",
                                      param="warmup_prompt_chunks")
        guidances = list(guidance_scales or [guidance_scale])
        sizes = batch_sizes or sorted({1, self.max_batch}, reverse=True)
        largest_first = sorted(chosen, key=lambda b: -b.pixels)  # like vLLM
        control_names = self.controlnet_names if controlnets is None else controlnets
        thorough = self.ctx.graphs.enabled or self.device.type == "cuda"
        chunks = range(1, min(prompt_chunks, self.ctx.max_chunks) + 1 if thorough else 2)
        for bucket, n, sampler, guidance, c in itertools.product(largest_first, sizes, samplers, guidances, chunks):
            req = GenerationRequest(prompt=warmup_prompt(c), width=bucket.width, height=bucket.height, steps=steps,
                                    scheduler=sampler, guidance_scale=guidance, seed=0, num_images=n,
                                    refiner_mode="ensemble" if use_refiner else None)
            self.generate(req)  # the base's (and refiner's) step; text encoders with an empty negative prompt
            for branch in self.cache_branches:  # step caching: the shallow step of each branch (steps >= 2)
                self.generate(replace(req, steps=max(steps, 2), cache_interval=2, cache_branch=branch))
            blank = Image.new("RGB", (bucket.width, bucket.height))
            if thorough:
                self.generate(replace(req, refiner_mode=None, init_image=blank, strength=1.0,
                                      mask_image=Image.new("L", blank.size, 255)))  # inpainting's step
            for name in control_names:
                self.generate(replace(req, refiner_mode=None, controlnets=(ControlNetUnit(name, blank),)))
        with self._lock, self._on_device():  # the text encoders' rows with a negative prompt encoded too
            for guidance, c in itertools.product(guidances, chunks if thorough else ()):
                req = GenerationRequest(prompt=warmup_prompt(c), negative_prompt="warm-up", guidance_scale=guidance,
                                        seed=0)
                shape = self.admit(req)
                if shape.guided:
                    self.conditioner.encode(0, req, shape)
        self.ctx.graphs.forbid_capture()
        for bucket, n in itertools.product(largest_first, sizes if thorough else ()):
            self.generate(GenerationRequest(prompt="warm-up", width=bucket.width, height=bucket.height,
                                            steps=max(steps, 2), scheduler=samplers[0], guidance_scale=guidances[0],
                                            seed=0, num_images=n, strength=0.5,
                                            init_image=Image.new("RGB", (bucket.width, bucket.height))))
        stats = self.cuda_graph_stats()
        log.info("warm-up done in %.1f s: %d %sCUDA graphs, pool %.1f MB", time.perf_counter() - t0, stats["graphs"],
                 "emulated " if stats["emulated"] else "", stats["pool_bytes"] / 2**20)
        return time.perf_counter() - t0

    def cuda_graph_stats(self) -> dict[str, int]:
        """How many CUDA graphs are captured, the bytes their shared memory pool holds (0 on the CPU), and whether
        they are emulated on the CPU (``cuda_graphs="emulate"``)."""
        with self._on_device():
            return self.ctx.graphs.stats()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate several requests, batching their images where the engines allow; thread-safe."""
        if not requests:
            return []
        with self._lock, self._on_device():
            return self._generate(list(requests))

    def resolve_bucket(self, request: GenerationRequest) -> Bucket:
        """The request's size as a built bucket, or an error listing the buckets."""
        return resolve_bucket(request, self.buckets)

    def admit(self, request: GenerationRequest, *, max_images: int = 10_000,
              max_steps: int | None = None) -> StepShape:
        """Everything that can be refused before any work runs (prompt length in tokens, sampler options, LoRAs
        and ControlNets included); returns the request's step shape, which is also the key a service batches
        by: requests with equal shapes run as one batch here. Services call it before queueing, so a bad
        request never waits or joins a batch."""
        if self._unpassed_time_cond:
            raise ManifestError(
                f"the model's UNet is guidance-distilled (time_cond_proj_dim {self._unpassed_time_cond}), but the "
                f"engines in {self.directory} were built before sdxl-trt passed its guidance embedding "
                "(timestep_cond): they would ignore guidance_scale. Rebuild: "
                f"{self.manifest.rebuild_hint(self.directory)}")
        bucket, chunks = self.conditioner.check_inputs(request, max_images=max_images, schedulers=SCHEDULERS,
                                                       max_steps=min(max_steps or self.max_steps, self.max_steps))
        shape = StepShape.of(request, bucket, prompt_chunks=chunks,
                             guidance_embedding=bool(self.ctx.dims.unet_time_cond_dim),
                             cache_branch=self._cache_branch(request))
        self.runner.schedules.for_shape(shape)  # refuses what the sampler cannot take (spacing, timesteps, eta)
        if request.loras:
            self.loras.read_set(check_lora_set(request.loras))  # unknown names, bad files, INT8 engines
        self.runner.controlnets.check_names(request, self.manifest.rebuild_hint(self.directory))
        return shape

    def _cache_branch(self, request: GenerationRequest) -> int | None:
        """The request's step-caching branch (its default: the lowest built), or a refusal naming the value, the
        branches these engines have and the rebuild command."""
        n, k = request.cache_interval, request.cache_branch
        if n == 1 and k is None:
            return None
        built = ", ".join(map(str, self.cache_branches)) or "none"
        rebuild = self.manifest.rebuild_hint(self.directory)
        if not self.cache_branches:
            raise InvalidRequestError(
                f"cache_interval {n}{f' / cache_branch {k}' if k is not None else ''}: these engines were built "
                f"without step caching (built branches: none); rebuild with it: {rebuild} --deepcache {k or 0}",
                param="cache_interval" if k is None else "cache_branch")
        if k is not None and k not in self.cache_branches:
            raise InvalidRequestError(
                f"cache_branch {k} was not built; built branches: {built}; rebuild with it: "
                f"{_with_deepcache(rebuild, (*self.cache_branches, k))}", param="cache_branch")
        if n > 1 and request.controlnets:
            raise InvalidRequestError(
                f"cache_interval {n} with ControlNets {[u.name for u in request.controlnets]}: step caching skips "
                "the UNet blocks a ControlNet feeds; send cache_interval 1 or no ControlNet", param="cache_interval")
        if n > 1 and request.loras:
            raise InvalidRequestError(
                f"cache_interval {n} with LoRAs {[name for name, _ in request.loras]}: run-time LoRA switching does "
                "not reach the shallow UNets yet; send cache_interval 1, or fuse the LoRA at build (--lora)",
                param="cache_interval")
        return self.cache_branches[0] if k is None else k

    def check(self, req: GenerationRequest, *, max_images: int = 10_000, max_steps: int | None = None) -> Bucket:
        """:meth:`admit`'s checks, returning the request's bucket only (the pre-queue check services have
        called since before step shapes; kept as it was)."""
        return self.admit(req, max_images=max_images, max_steps=max_steps).bucket

    @property
    def controlnet_names(self) -> list[str]:
        """The ControlNets built into these engines (``GenerationRequest.controlnets`` names them)."""
        return list(self.runner.controlnets.names)

    # ------------------------------------------------------------------ the work
    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        timings: dict[str, float] = {"text_encoders": 0.0, "vae_encode": 0.0, "denoise": 0.0, "refiner": 0.0,
                                     "vae_decode": 0.0}
        admitted: list[tuple[GenerationRequest, StepShape]] = []
        for req in requests:
            shape = self.admit(req)
            seed = req.seed if req.seed is not None else secrets.randbits(32)
            admitted.append((req.with_seed(seed), shape))
        images: dict[tuple[int, int], Any] = {}
        steps_run: dict[int, dict[str, int]] = {}
        text_timer = StageTimer(self.device)
        # A LoRA set changes the engines' weights (text encoders included): one switch per set, then its
        # requests are encoded and run.
        by_lora: OrderedDict[LoraSet, list[int]] = OrderedDict()
        for ri, (req, _) in enumerate(admitted):
            by_lora.setdefault(check_lora_set(req.loras), []).append(ri)
        for lora_set, indices in by_lora.items():
            switch_s = self.loras.activate(lora_set)
            if switch_s:
                timings["lora_switch"] = timings.get("lora_switch", 0.0) + switch_s
            t0 = text_timer.start()
            by_shape: OrderedDict[StepShape, list[Slot]] = OrderedDict()
            for ri in indices:
                req, shape = admitted[ri]
                by_shape.setdefault(shape, []).extend(self.conditioner.encode(ri, req, shape))
            text_timer.stop("text_encoders", t0)
            for batch in self._batches(by_shape):
                result = self.runner.run(batch)
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
                for s, img in zip(batch.slots, result.images, strict=True):
                    images[(s.request_index, s.image_index)] = img
                    steps_run[s.request_index] = result.steps_run
        text_timer.add_to(timings)  # the batches' final copies have waited for the encoders' work

        results = []
        for ri, (req, shape) in enumerate(admitted):
            n = req.num_images
            results.append(GenerationResult(
                images=[images[(ri, k)] for k in range(n)],
                seeds=[req.seed + k for k in range(n)],  # type: ignore[operator]
                timings=dict(timings),
                parameters=self._parameters(req, shape.bucket),
                steps_run=dict(steps_run[ri]),
            ))
        return results

    def _batches(self, by_shape: Mapping[StepShape, list[Slot]]) -> Iterator[Batch]:
        """Images batch together when their step shapes are equal, at most ``max_batch`` at a time."""
        for shape, slots in by_shape.items():
            for start in range(0, len(slots), self.max_batch):
                yield Batch(shape, tuple(slots[start : start + self.max_batch]))

    def _parameters(self, req: GenerationRequest, bucket: Bucket) -> dict[str, Any]:
        p = {
            "prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": bucket.width,
            "height": bucket.height, "steps": req.steps, "guidance_scale": req.guidance_scale,
            "scheduler": req.scheduler, "seed": req.seed, "num_images": req.num_images, "mode": req.mode,
            "model": self.manifest.model.get("name"), "backend": self.backend,
        }
        if req.timestep_spacing is not None:
            p["timestep_spacing"] = req.timestep_spacing
        if req.timesteps is not None:
            p["timesteps"] = list(req.timesteps)
        if req.eta is not None:
            p["eta"] = req.eta
        if req.loras:
            p["loras"] = [[name, scale] for name, scale in req.loras]
        if req.controlnets:
            p["controlnets"] = [{"name": u.name, "scale": u.scale, "start": u.start, "end": u.end,
                                 "guess_mode": u.guess_mode} for u in req.controlnets]
        if req.cache_interval > 1:
            p.update(cache_interval=req.cache_interval,
                     cache_branch=req.cache_branch if req.cache_branch is not None else self.cache_branches[0])
        if req.mode != "txt2img":
            p["strength"] = req.strength
        if req.refiner_mode:
            p.update(refiner_mode=req.refiner_mode, refiner=(self.manifest.refiner or {}).get("name"),
                     refiner_start=req.refiner_start, refiner_strength=req.refiner_strength)
        return p



def warmup_prompt(chunks: int) -> str:
    """A prompt that takes ``chunks`` chunks of 75 tokens ("a" is one token in CLIP's vocabulary)."""
    return "warm-up" + " a" * (CONTENT_TOKENS * (chunks - 1))
