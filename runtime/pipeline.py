"""``Pipeline``: load engines once, then turn requests into images (txt2img, img2img, inpainting, refiner).

Seeds follow diffusers' semantics with one generator per image: image ``k`` of a request with seed
``s`` is drawn from ``torch.Generator().manual_seed(s + k)`` in the order diffusers draws (VAE posterior
sample, initial noise, then every scheduler step's noise), so the same settings give the same image as
diffusers' SDXL pipelines called with ``generator=[Generator(s), Generator(s+1), ...]``, and an image
never depends on what it was batched with.

Thread safety: ``generate``/``generate_batch`` hold one lock; engines and the arena are shared.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.buckets import Bucket, nearest_bucket
from sdxl_trt.contracts import TOKENS_PER_CHUNK, ModelDims, component_specs
from sdxl_trt.engine_dir.manifest import Manifest, open_engine_dir
from sdxl_trt.engine_dir.profiles import Profile, select_profile
from sdxl_trt.errors import InvalidRequestError, ManifestError
from sdxl_trt.request import GenerationRequest, GenerationResult

from .arena import Arena
from .denoise import Denoiser, StepBuffers
from .engine import Engine
from .images import check_finite, image_to_tensor, mask_to_tensor, tensor_to_images
from .loader import DTYPES, default_device, load_engines
from .schedulers import make_schedule
from .text import PromptTokenizer, check_chunks, chunks_needed

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One image of one request: its generator and conditioning."""

    request_index: int
    image_index: int
    seed: int
    generator: torch.Generator
    guidance: float
    chunks: int
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # embeds/pooled/time_ids, pos & neg, per UNet


@dataclass
class _CachedSchedule:
    """A schedule with its settings key and its state buffers per latent shape."""

    key: tuple
    schedule: Any
    states: dict[tuple[int, ...], dict[str, torch.Tensor]] = field(default_factory=dict)


class Pipeline:
    def __init__(self, directory: Path, manifest: Manifest, engines: dict[str, Engine], device: torch.device, *,
                 max_steps: int = 150, use_cuda_graphs: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.engines = engines
        self.device = device
        self.backend = manifest.backend
        self.max_steps = max_steps
        self.dims = ModelDims.from_json(manifest.model_dims)
        self.specs = component_specs(self.dims)
        self.buckets = [Bucket.parse(b) for b in manifest.buckets]
        self.max_batch = manifest.max_batch
        self.max_chunks = manifest.max_prompt_chunks
        self.dtypes = {n: DTYPES[e.precision] for n, e in manifest.components.items()}
        self.profiles = {n: [Profile.from_json(p) for p in e.profiles] for n, e in manifest.components.items()}
        self.tokenizers = [PromptTokenizer(self.directory / "tokenizer"), PromptTokenizer(self.directory / "tokenizer_2")]
        self.scheduler_config = json.loads((self.directory / "scheduler" / "scheduler_config.json").read_text())
        ref_sched = self.directory / "refiner_scheduler" / "scheduler_config.json"
        self.refiner_scheduler_config = json.loads(ref_sched.read_text()) if ref_sched.exists() else self.scheduler_config
        self.vae_scaling_factor = float(manifest.pipeline["vae_scaling_factor"])
        self.force_zeros_for_empty_prompt = bool(manifest.pipeline.get("force_zeros_for_empty_prompt", True))
        self.has_refiner = "refiner" in engines
        self._lock = threading.Lock()
        self._schedules: OrderedDict[tuple, _CachedSchedule] = OrderedDict()
        self.denoisers = {n: Denoiser(engines[n], use_cuda_graphs=use_cuda_graphs)
                          for n in ("unet", "refiner") if n in engines}
        self.arena = Arena(device)
        self._reserve_buffers()
        log.info("pipeline ready: backend %s on %s, buckets %s, max batch %d, arena %.1f MB", self.backend, device,
                 ", ".join(map(str, self.buckets)), self.max_batch, self.arena.nbytes / 2**20)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = None, verify_hashes: bool = True,
             compile: bool = False, max_steps: int = 150, use_cuda_graphs: bool = True) -> Pipeline:
        """Check the engine directory against this machine and load every engine once."""
        directory = Path(directory)
        manifest = open_engine_dir(directory, verify_hashes=verify_hashes)
        dev = torch.device(device) if device is not None else default_device(manifest.backend)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ManifestError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use device='cpu' "
                                "with onnxruntime or torch engines")
        t0 = time.perf_counter()
        engines = load_engines(directory, manifest, device=dev, compile_torch=compile)
        log.info("loaded %d engines from %s in %.2f s", len(engines), directory, time.perf_counter() - t0)
        return cls(directory, manifest, engines, dev, max_steps=max_steps, use_cuda_graphs=use_cuda_graphs)

    def _max_dims(self) -> dict[str, int]:
        hw = max(self.buckets, key=lambda b: b.latent_hw[0] * b.latent_hw[1])
        h, w = hw.latent_hw
        # Views are flat, so one buffer sized for the largest h*w serves every bucket.
        return {"h": h * w, "w": 1, "S": TOKENS_PER_CHUNK * self.max_chunks}

    def _reserve_buffers(self) -> None:
        """Every engine input/output at its profile's maximum, plus the loop's own buffers."""
        base = self._max_dims()
        for name in self.engines:
            spec = self.specs[name]
            max_b = max(p.dims["B"].max for p in self.profiles[name])
            for t in spec.tensors:
                dtype = torch.int64 if t.dtype == "int64" else torch.float32 if t.dtype == "float32" else self.dtypes[name]
                self.arena.reserve(f"{name}.{t.name}", t.shape({**base, "B": max_b}), dtype)
        m, c = self.max_batch, self.dims.latent_channels
        lat = (m, c, base["h"], 1)
        dt = self.dtypes["unet"]
        for name in ("latents", "init_noise", "image_latents", "mask"):
            self.arena.reserve(name, lat, dt)
        self.arena.reserve("guidance", (m, 1, 1, 1), dt)
        self.arena.reserve("step_index", (1,), torch.int64)
        self.arena.reserve("step_noise", (self.max_steps, *lat), dt)

    # ------------------------------------------------------------------ public API
    def warmup(self, *, buckets: Sequence[str | Bucket] | None = None, batch_sizes: Sequence[int] | None = None,
               steps: int = 30, scheduler: str = "euler", guidance_scale: float = 5.0, refiner: bool = False) -> float:
        """Run each bucket (default: every built one) at each batch size (default: 1 and max_batch) once,
        capturing CUDA graphs; then forbid capture. Returns the seconds spent.

        Call it once after ``load`` in a service, before taking traffic: afterwards no request waits behind a
        capture, and shapes first seen after warm-up run eagerly instead.
        """
        t0 = time.perf_counter()
        chosen = self.buckets if buckets is None else [b if isinstance(b, Bucket) else Bucket.parse(b) for b in buckets]
        unknown = [str(b) for b in chosen if b not in self.buckets]
        if unknown:
            raise InvalidRequestError(f"warm-up bucket(s) {', '.join(unknown)} were not built; built: "
                                      f"{', '.join(map(str, self.buckets))}", param="warmup")
        for bucket in sorted(chosen, key=lambda b: -b.pixels):  # largest first, like vLLM
            for n in batch_sizes or sorted({1, self.max_batch}, reverse=True):
                req = GenerationRequest(prompt="warm-up", width=bucket.width, height=bucket.height, steps=steps,
                                        scheduler=scheduler, guidance_scale=guidance_scale, seed=0, num_images=n,
                                        refiner_mode="ensemble" if refiner and self.has_refiner else None)
                self.generate(req)
        for d in self.denoisers.values():
            d.capture_allowed = False
        return time.perf_counter() - t0

    def cuda_graph_stats(self) -> dict[str, int]:
        """How many CUDA graphs are captured and the bytes their shared memory pool holds (0 on the CPU)."""
        return {"graphs": sum(len(d.graphs) for d in self.denoisers.values()), "pool_bytes": 0}

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate several requests, batching their images where the engines allow; thread-safe."""
        if not requests:
            return []
        with self._lock:
            return self._generate(list(requests))

    def resolve_bucket(self, request: GenerationRequest) -> Bucket:
        """The request's size as a built bucket, or an error listing the buckets."""
        width, height = request.width, request.height
        if width is None and height is None and request.init_image is not None:
            width, height = request.init_image.size
        if width is None or height is None:
            if width is None and height is None:
                return self.buckets[0]
            raise InvalidRequestError("give both width and height, or neither", param="size")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)) or width <= 0 or height <= 0:
            raise InvalidRequestError(f"width and height must be positive integers, got {width!r}x{height!r}",
                                      param="size")
        b = Bucket(width, height)
        if b in self.buckets:
            return b
        if request.snap_to_bucket:
            return nearest_bucket(width, height, self.buckets)
        raise InvalidRequestError(
            f"size {width}x{height} is not a built bucket; built: {', '.join(map(str, self.buckets))} "
            "(rebuild with --buckets to add it, or set snap_to_bucket to use the nearest)",
            param="size",
        )

    # ------------------------------------------------------------------ the work
    def check(self, req: GenerationRequest, *, max_images: int = 10_000, max_steps: int | None = None) -> Bucket:
        """Everything that can be refused before any work runs; returns the request's bucket.

        Services call it before queueing, so a bad request never waits or joins a batch."""
        req.validate(max_steps=min(max_steps or self.max_steps, self.max_steps), max_images=max_images)
        from .schedulers import SCHEDULERS

        if req.scheduler not in SCHEDULERS:
            raise InvalidRequestError(
                f"unknown scheduler {req.scheduler!r}; choose one of {', '.join(SCHEDULERS)}", param="scheduler")
        if req.refiner_mode is not None and not self.has_refiner:
            raise InvalidRequestError(f"refiner_mode {req.refiner_mode!r} needs a refiner engine, and these engines "
                                      "were built without one (build with --refiner)", param="refiner_mode")
        if req.mode != "txt2img" and "vae_encoder" not in self.engines:
            raise InvalidRequestError("img2img and inpainting need the vae_encoder engine; rebuild the engines",
                                      param="init_image")
        if req.refiner_mode == "img2img" and (req.refiner_steps or req.steps) > self.max_steps:
            raise InvalidRequestError(f"refiner_steps must be at most {self.max_steps}", param="refiner_steps")
        if req.seed is not None and req.seed + req.num_images > 2**64:
            raise InvalidRequestError(f"seed + number of images must stay below 2**64, got seed {req.seed}",
                                      param="seed")
        return self.resolve_bucket(req)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        timings: dict[str, float] = {"text_encoders": 0.0, "vae_encode": 0.0, "denoise": 0.0, "refiner": 0.0,
                                     "vae_decode": 0.0}
        resolved = []
        for req in requests:
            bucket = self.check(req)
            seed = req.seed if req.seed is not None else secrets.randbits(32)
            resolved.append((req.with_seed(seed), bucket))
        t0 = time.perf_counter()
        slots: list[_Slot] = []
        for ri, (req, bucket) in enumerate(resolved):
            slots.extend(self._encode_request(ri, req, bucket))
        timings["text_encoders"] = time.perf_counter() - t0

        images: dict[tuple[int, int], Any] = {}
        # Images batch together when everything that shapes the step agrees.
        groups: OrderedDict[tuple, list[_Slot]] = OrderedDict()
        for s in slots:
            req, bucket = resolved[s.request_index]
            key = (bucket, req.steps, req.scheduler, req.mode, req.strength, req.refiner_mode, req.refiner_start,
                   req.refiner_strength, req.refiner_steps, s.chunks, s.guidance > 1.0)
            groups.setdefault(key, []).append(s)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                batch = group[start : start + self.max_batch]
                req, bucket = resolved[batch[0].request_index]
                for s, img in zip(batch, self._run_batch(req, bucket, batch, resolved, timings), strict=True):
                    images[(s.request_index, s.image_index)] = img

        results = []
        for ri, (req, bucket) in enumerate(resolved):
            n = req.num_images
            results.append(GenerationResult(
                images=[images[(ri, k)] for k in range(n)],
                seeds=[req.seed + k for k in range(n)],  # type: ignore[operator]
                timings=dict(timings),
                parameters=self._parameters(req, bucket),
            ))
        return results

    def _parameters(self, req: GenerationRequest, bucket: Bucket) -> dict[str, Any]:
        p = {
            "prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": bucket.width,
            "height": bucket.height, "steps": req.steps, "guidance_scale": req.guidance_scale,
            "scheduler": req.scheduler, "seed": req.seed, "num_images": req.num_images, "mode": req.mode,
            "model": self.manifest.model.get("name"), "backend": self.backend,
        }
        if req.mode != "txt2img":
            p["strength"] = req.strength
        if req.refiner_mode:
            p.update(refiner_mode=req.refiner_mode, refiner=(self.manifest.refiner or {}).get("name"),
                     refiner_start=req.refiner_start, refiner_strength=req.refiner_strength)
        return p

    # ------------------------------------------------------------------ text
    def _encode(self, name: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[name]
        r = ids.shape[0]
        dims = {"B": r}
        shapes = {t.name: t.shape(dims) for t in spec.tensors}
        inputs = {"input_ids": self.arena.view(f"{name}.input_ids", shapes["input_ids"])}
        inputs["input_ids"].copy_(ids)
        outputs = {t.name: self.arena.view(f"{name}.{t.name}", shapes[t.name]) for t in spec.outputs}
        profile = select_profile(self.profiles[name], dims)
        self.engines[name].infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        self.engines[name].run(inputs, outputs, profile=profile, stream=self._stream())
        return {k: v.clone() for k, v in outputs.items()}

    def _stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream() if self.device.type == "cuda" else None

    def _encode_request(self, ri: int, req: GenerationRequest, bucket: Bucket) -> list[_Slot]:
        tok1, tok2 = self.tokenizers
        pos1, neg1 = tok1.content_ids(req.prompt), tok1.content_ids(req.negative_prompt)
        pos2, neg2 = tok2.content_ids(req.prompt), tok2.content_ids(req.negative_prompt)
        n = chunks_needed(pos1, neg1, pos2, neg2)
        check_chunks(n, self.max_chunks, req.prompt if len(pos1) >= len(neg1) else req.negative_prompt)
        cfg = req.guidance_scale > 1.0
        zero_neg = req.negative_prompt == "" and self.force_zeros_for_empty_prompt
        rows1 = [tok1.chunk(pos1, n)] + ([tok1.chunk(neg1, n)] if cfg and not zero_neg else [])
        rows2 = [tok2.chunk(pos2, n)] + ([tok2.chunk(neg2, n)] if cfg or req.refiner_mode else [])
        h1 = self._encode("text_encoder", torch.cat(rows1).to(self.device))["hidden_states"]
        out2 = self._encode("text_encoder_2", torch.cat(rows2).to(self.device))
        h2, pooled = out2["hidden_states"], out2["text_embeds"]

        def seq(h: torch.Tensor, k: int) -> torch.Tensor:  # chunk rows k*n..(k+1)*n -> [1, n*77, d]
            return h[k * n : (k + 1) * n].reshape(1, n * TOKENS_PER_CHUNK, h.shape[-1])

        dt = self.dtypes["unet"]
        cond: dict[str, torch.Tensor] = {
            "unet.pos.embeds": torch.cat([seq(h1, 0), seq(h2, 0)], dim=-1).to(dt),
            "unet.pos.pooled": pooled[0:1].to(dt),
        }
        if cfg:
            if zero_neg:
                cond["unet.neg.embeds"] = torch.zeros_like(cond["unet.pos.embeds"])
                cond["unet.neg.pooled"] = torch.zeros_like(cond["unet.pos.pooled"])
            else:
                cond["unet.neg.embeds"] = torch.cat([seq(h1, 1), seq(h2, 1)], dim=-1).to(dt)
                cond["unet.neg.pooled"] = pooled[n : n + 1].to(dt)
        h, w = bucket.height, bucket.width
        orig = req.original_size or (h, w)
        target = req.target_size or (h, w)
        crop = req.crop_top_left
        ids = [*orig, *crop, *target]
        cond["unet.pos.time_ids"] = torch.tensor([ids], dtype=dt, device=self.device)
        cond["unet.neg.time_ids"] = cond["unet.pos.time_ids"]
        if req.refiner_mode:
            rdt = self.dtypes["refiner"]
            # The refiner's model_index has force_zeros_for_empty_prompt False: an empty negative is encoded.
            cond["refiner.pos.embeds"] = seq(h2, 0).to(rdt)
            cond["refiner.pos.pooled"] = pooled[0:1].to(rdt)
            cond["refiner.neg.embeds"] = seq(h2, 1).to(rdt)
            cond["refiner.neg.pooled"] = pooled[n : n + 1].to(rdt)
            cond["refiner.pos.time_ids"] = torch.tensor([[*orig, *crop, req.aesthetic_score]], dtype=rdt, device=self.device)
            cond["refiner.neg.time_ids"] = torch.tensor([[*orig, *crop, req.negative_aesthetic_score]], dtype=rdt,
                                                        device=self.device)
        return [
            _Slot(ri, k, req.seed + k, torch.Generator().manual_seed(req.seed + k),  # type: ignore[operator]
                  guidance=float(req.guidance_scale), chunks=n, cond=cond)
            for k in range(req.num_images)
        ]

    # ------------------------------------------------------------------ one batch of images
    def _schedule(self, name: str, steps: int, *, unet: str, strength: float = 1.0,
                  denoising_start: float | None = None, denoising_end: float | None = None) -> _CachedSchedule:
        """Schedules (and their scheduler state buffers) are cached by their settings: a CUDA graph points at
        their device tables, so a schedule lives as long as the pipeline once a graph uses it."""
        key = (unet, name, steps, strength, denoising_start, denoising_end)
        cached = self._schedules.get(key)
        if cached is not None:
            self._schedules.move_to_end(key)
            return cached
        config = self.refiner_scheduler_config if unet == "refiner" else self.scheduler_config
        s = make_schedule(name, steps, config=config, strength=strength, denoising_start=denoising_start,
                          denoising_end=denoising_end, device=self.device, dtype=self.dtypes[unet])
        if s.num_steps > self.max_steps:
            raise InvalidRequestError(f"{s.num_steps} steps exceed this pipeline's max_steps {self.max_steps}",
                                      param="steps")
        cached = _CachedSchedule(key, s)
        self._schedules[key] = cached
        graphed = {k[-1] for d in self.denoisers.values() for k in d.graphs}
        while len(self._schedules) > 64:
            old = next((k for k in self._schedules if k not in graphed), None)
            if old is None:
                break
            del self._schedules[old]
        return cached

    def _states(self, cached: _CachedSchedule, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The schedule's multistep state for this shape, zeroed for a new request (same buffers every time)."""
        shape = tuple(latents.shape)
        state = cached.states.get(shape)
        if state is None:
            state = cached.states[shape] = cached.schedule.make_state(latents)
        for t in state.values():
            t.zero_()
        return state

    def _randn(self, gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype).to(self.device)

    def _vae_encode(self, image: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """Image [1,3,H,W] in [-1,1] -> the latent distribution's parameters [1, 2C, h, w] (fp32)."""
        name = "vae_encoder"
        h, w = bucket.latent_hw
        dims = {"B": 1, "h": h, "w": w}
        spec = self.specs[name]
        images = self.arena.view(f"{name}.images", spec.tensor("images").shape(dims))
        images.copy_(image)
        out = self.arena.view(f"{name}.latent_parameters", spec.tensor("latent_parameters").shape(dims))
        profile = select_profile(self.profiles[name], dims)
        self.engines[name].run({"images": images}, {"latent_parameters": out}, profile=profile, stream=self._stream())
        return out.float().clone()

    def _posterior_sample(self, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """diffusers' DiagonalGaussianDistribution.sample, drawing from ``gen``."""
        mean, logvar = torch.chunk(params, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean + std * self._randn(gen, tuple(mean.shape), params.dtype)

    def _run_batch(self, req: GenerationRequest, bucket: Bucket, slots: list[_Slot],
                   resolved: list[tuple[GenerationRequest, Bucket]], timings: dict[str, float]) -> list[Any]:
        m, c = len(slots), self.dims.latent_channels
        h, w = bucket.latent_hw
        shape = (m, c, h, w)
        dt = self.dtypes["unet"]
        latents = self.arena.view("latents", shape)
        gens = [s.generator for s in slots]
        mode = req.mode
        base_end = req.refiner_start if req.refiner_mode == "ensemble" else None
        strength = req.strength if mode != "txt2img" else 1.0
        cached = self._schedule(req.scheduler, req.steps, unet="unet", strength=strength, denoising_end=base_end)
        schedule = cached.schedule
        inpaint = None
        t0 = time.perf_counter()

        if mode == "txt2img":
            latents.copy_(torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens]) * schedule.init_noise_sigma)
        else:
            params = {}
            for s in slots:
                if s.request_index not in params:
                    r = resolved[s.request_index][0]
                    params[s.request_index] = self._vae_encode(image_to_tensor(r.init_image, bucket.width,
                                                                               bucket.height).to(self.device), bucket)
            if mode == "img2img":
                init = torch.cat([self._posterior_sample(params[s.request_index], s.generator) for s in slots])
                init = (init * self.vae_scaling_factor).to(dt)
                noise = torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens])
                latents.copy_(schedule.add_noise(init, noise, torch.zeros((), dtype=torch.long, device=self.device)))
            else:
                inpaint = self._prepare_inpaint(req, bucket, slots, params, schedule, resolved)
        timings["vae_encode"] += time.perf_counter() - t0 if mode != "txt2img" else 0.0

        t1 = time.perf_counter()
        self._denoise("unet", cached, slots, bucket, latents, inpaint=inpaint)
        timings["denoise"] += time.perf_counter() - t1

        if req.refiner_mode:
            t2 = time.perf_counter()
            if req.refiner_mode == "ensemble":
                rcached = self._schedule(req.scheduler, req.steps, unet="refiner", denoising_start=req.refiner_start)
            else:
                rcached = self._schedule(req.scheduler, req.refiner_steps or req.steps, unet="refiner",
                                         strength=req.refiner_strength)
                noise = torch.cat([self._randn(g, (1, c, h, w), self.dtypes["refiner"]) for g in gens])
                latents.copy_(rcached.schedule.add_noise(latents.to(self.dtypes["refiner"]), noise,
                                                         torch.zeros((), dtype=torch.long, device=self.device)))
            self._denoise("refiner", rcached, slots, bucket, latents, inpaint=None)
            timings["refiner"] += time.perf_counter() - t2

        t3 = time.perf_counter()
        images = self._decode(latents, bucket)
        timings["vae_decode"] += time.perf_counter() - t3
        return images

    def _prepare_inpaint(self, req: GenerationRequest, bucket: Bucket, slots: list[_Slot], params: dict,
                         schedule: Any, resolved: list) -> tuple[torch.Tensor, ...]:
        """diffusers' SDXL inpainting with a 4-channel UNet, including its generator draws (see module doc)."""
        m, c = len(slots), self.dims.latent_channels
        h, w = bucket.latent_hw
        dt = self.dtypes["unet"]
        image_latents, masks, noises = [], [], []
        first: dict[int, torch.Tensor] = {}
        for s in slots:
            r = resolved[s.request_index][0]
            if s.request_index not in first:
                # diffusers encodes the (single) init image with the request's first generator only
                first[s.request_index] = (self._posterior_sample(params[s.request_index], s.generator)
                                          * self.vae_scaling_factor).to(dt)
            image_latents.append(first[s.request_index])
            mask = mask_to_tensor(r.mask_image, bucket.width, bucket.height, r.init_image.size)
            masks.append(torch.nn.functional.interpolate(mask, size=(h, w)).to(device=self.device, dtype=dt))
        for s in slots:
            noises.append(self._randn(s.generator, (1, c, h, w), dt))
        for s in slots:
            if s.image_index == 0:
                # diffusers also encodes the masked image (unused by a 4-channel UNet), drawing once more.
                self._randn(s.generator, (1, c, h, w), torch.float32)
        img_lat = self.arena.view("image_latents", (m, c, h, w))
        img_lat.copy_(torch.cat(image_latents))
        noise = self.arena.view("init_noise", (m, c, h, w))
        noise.copy_(torch.cat(noises))
        mask_buf = self.arena.view("mask", (m, 1, h, w))
        mask_buf.copy_(torch.cat(masks))
        latents = self.arena.view("latents", (m, c, h, w))
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        if req.strength >= 1.0:
            latents.copy_(noise * schedule.init_noise_sigma)
        else:
            latents.copy_(schedule.add_noise(img_lat, noise, zero))
        return mask_buf, img_lat, noise

    def _denoise(self, unet: str, cached: _CachedSchedule, slots: list[_Slot], bucket: Bucket,
                 latents: torch.Tensor, *, inpaint: tuple | None) -> None:
        schedule = cached.schedule
        m = len(slots)
        h, w = bucket.latent_hw
        cfg = slots[0].guidance > 1.0
        b = 2 * m if cfg else m
        s_len = slots[0].chunks * TOKENS_PER_CHUNK
        dims = {"B": b, "h": h, "w": w, "S": s_len}
        spec = self.specs[unet]
        inputs = {t.name: self.arena.view(f"{unet}.{t.name}", t.shape(dims)) for t in spec.inputs}
        order = (["neg"] if cfg else []) + ["pos"]
        for key, tensor in (("embeds", "encoder_hidden_states"), ("pooled", "text_embeds"), ("time_ids", "time_ids")):
            rows = [s.cond[f"{unet}.{side}.{key}"] for side in order for s in slots]
            inputs[tensor].copy_(torch.cat(rows))
        guidance = self.arena.view("guidance", (m, 1, 1, 1))
        guidance.copy_(torch.tensor([max(s.guidance, 1.0) for s in slots]).view(m, 1, 1, 1))
        noise_pred = self.arena.view(f"{unet}.noise_pred", spec.tensor("noise_pred").shape(dims))
        step_index = self.arena.view("step_index", (1,)).view(())
        step_index.zero_()
        step_noise = None
        if schedule.needs_noise:
            step_noise = self.arena.view("step_noise", (schedule.num_steps, *latents.shape))
            step_noise.copy_(schedule.draw_step_noise(tuple(latents.shape), [s.generator for s in slots],
                                                      latents.dtype))
        if latents.dtype != self.dtypes[unet]:
            raise RuntimeError("base and refiner UNets must share a precision")
        profile = select_profile(self.profiles[unet], dims)
        self.engines[unet].infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        buf = StepBuffers(latents=latents, unet_in=inputs, noise_pred=noise_pred, guidance=guidance,
                          step_index=step_index, step_noise=step_noise, state=self._states(cached, latents),
                          inpaint=inpaint)
        key = (unet, str(bucket), m, cfg, s_len, inpaint is not None, cached.key)
        self.denoisers[unet].run(schedule, buf, cfg=cfg, profile=profile, key=key)
        check_finite(latents, f"{unet} latents after denoising")

    def _decode(self, latents: torch.Tensor, bucket: Bucket) -> list[Any]:
        name = "vae_decoder"
        h, w = bucket.latent_hw
        m = latents.shape[0]
        dims = {"B": m, "h": h, "w": w}
        spec = self.specs[name]
        lat = self.arena.view(f"{name}.latent", spec.tensor("latent").shape(dims))
        lat.copy_(latents.to(lat.dtype) / self.vae_scaling_factor)
        out = self.arena.view(f"{name}.images", spec.tensor("images").shape(dims))
        profile = select_profile(self.profiles[name], dims)
        self.engines[name].run({"latent": lat}, {"images": out}, profile=profile, stream=self._stream())
        return tensor_to_images(out)
