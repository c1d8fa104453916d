"""One batch of images that share everything that shapes a step: initial latents (txt2img noise, or the
VAE-encoded image for img2img and inpainting), the base denoising loop, the refiner, and the VAE decode.

Seeds follow diffusers' order of draws per image generator: VAE posterior sample, initial noise (and
the inpainting pipeline's extra masked-image draw), then every scheduler step's noise. Draws are made
in the UNet's dtype as diffusers makes them, then kept in float32 buffers for the scheduler math.

Schedules are built on the host and cached by their settings; before a loop they are copied into the
fixed device tables of their (UNet, scheduler), which is what a captured step reads.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import TOKENS_PER_CHUNK
from sdxl_trt.engine_dir.profiles import select_profile
from sdxl_trt.errors import SdxlTrtError
from sdxl_trt.request import GenerationRequest
from sdxl_trt.samplers import SCHEDULERS

from .conditioning import Slot
from .context import MAX_STATE_TENSORS, EngineContext
from .controlnet import ControlNets
from .denoise import Denoiser, StepBuffers
from .images import image_to_tensor, mask_to_tensor, non_finite_error, to_uint8
from .progress import StepProgress
from .schedulers import Schedule, make_schedule
from .schedulers._base import FixedTables


class StageTimer:
    """Per-stage seconds of a batch. On CUDA the marks are events, read after the batch's one final sync,
    so stages are timed on the device without a synchronisation between them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> Any:
        return self._now()

    def stop(self, stage: str, started: Any) -> None:
        self.marks.append((stage, started, self._now()))

    def add_to(self, timings: dict[str, float]) -> None:
        """Add each stage's seconds (call after the device work is complete)."""
        for stage, a, b in self.marks:
            timings[stage] = timings.get(stage, 0.0) + (a.elapsed_time(b) / 1000.0 if self.cuda else b - a)


class BatchRunner:
    """Runs batches of slots through the base UNet, the refiner and the VAE on one engine context."""

    def __init__(self, ctx: EngineContext, scheduler_configs: Mapping[str, Mapping[str, Any]]) -> None:
        self.ctx = ctx
        self.controlnets = ControlNets(ctx)
        self.scheduler_configs = scheduler_configs  # per UNet ("unet", "refiner")
        self.progress = StepProgress(ctx.device, capacity=2 * ctx.max_steps)  # base + refiner steps of a batch
        self.denoisers: dict[str, Denoiser] = {n: Denoiser(ctx.engines[n], ctx.graphs, self.progress)
                                               for n in ("unet", "refiner") if n in ctx.engines}
        # One set of fixed tables per (UNet, sampler), allocated at load: a captured step reads them.
        self.tables: dict[tuple[str, str], FixedTables] = {}
        for unet in self.denoisers:
            for name in SCHEDULERS:
                try:
                    width = self.schedule(unet, name, 2).table_width
                except SdxlTrtError:  # a sampler this model's config cannot run: refused per request instead
                    continue
                self.tables[(unet, name)] = FixedTables.allocate(ctx.max_steps, width, ctx.device)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - host tables, tiny; the runner lives as long as its pipeline
    def schedule(self, unet: str, name: str, steps: int, *, strength: float = 1.0,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 timestep_spacing: str | None = None, timesteps: tuple[int, ...] | None = None,
                 eta: float | None = None) -> Schedule:
        """The host-side schedule for these settings (float32 tables, as diffusers steps in float32)."""
        return make_schedule(name, steps, config=self.scheduler_configs[unet], strength=strength,
                             denoising_start=denoising_start, denoising_end=denoising_end,
                             timestep_spacing=timestep_spacing, timesteps=timesteps, eta=eta, device="cpu",
                             dtype=torch.float32)

    def host_schedules(self, req: GenerationRequest) -> tuple[Schedule, Schedule | None]:
        """The base's and (with a refiner mode) the refiner's host schedules of ``req``; building them is also
        the check that refuses settings a sampler cannot take (Pipeline.check calls it before queueing).

        Spacing and eta apply to both UNets; explicit timesteps to the base and to an ensemble's refiner (one
        schedule, split), not to an img2img refiner, which re-noises on its own ``refiner_steps`` schedule.
        """
        options = {"timestep_spacing": req.timestep_spacing, "eta": req.eta}
        base_end = req.refiner_start if req.refiner_mode == "ensemble" else None
        strength = req.strength if req.mode != "txt2img" else 1.0
        base = self.schedule("unet", req.scheduler, req.steps, strength=strength, denoising_end=base_end,
                             timesteps=req.timesteps, **options)
        if req.refiner_mode == "ensemble":
            return base, self.schedule("refiner", req.scheduler, req.steps, denoising_start=req.refiner_start,
                                       timesteps=req.timesteps, **options)
        if req.refiner_mode == "img2img":
            return base, self.schedule("refiner", req.scheduler, req.refiner_steps or req.steps,
                                       strength=req.refiner_strength, **options)
        return base, None

    def bound(self, unet: str, name: str, schedule: Schedule) -> Schedule:
        return schedule.bind(self.tables[(unet, name)])

    # ------------------------------------------------------------------ helpers
    def _randn(self, gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype).to(self.ctx.device)

    def _vae_encode(self, image: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """Image [1,3,H,W] in [-1,1] -> the latent distribution's parameters [1, 2C, h, w] (fp32)."""
        h, w = bucket.latent_hw
        dims = {"B": 1, "h": h, "w": w}
        inputs, outputs = self.ctx.io_views("vae_encoder", dims)
        inputs["images"].copy_(image)
        self.ctx.run("vae_encoder", inputs, outputs, dims)
        return outputs["latent_parameters"].float().clone()

    def _posterior_sample(self, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """diffusers' DiagonalGaussianDistribution.sample, drawing from ``gen`` (float32, as its upcast VAE)."""
        mean, logvar = torch.chunk(params, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean + std * self._randn(gen, tuple(mean.shape), params.dtype)

    # ------------------------------------------------------------------ one batch
    def run(self, req: GenerationRequest, bucket: Bucket, slots: list[Slot], requests: list[GenerationRequest],
            timings: dict[str, float]) -> tuple[list[Any], dict[str, int]]:
        """Images (PIL) of ``slots``, which share ``req``'s step-shaping settings, and the steps each UNet ran;
        adds the stage seconds to ``timings``."""
        ctx = self.ctx
        m, c = len(slots), ctx.dims.latent_channels
        h, w = bucket.latent_hw
        dt = ctx.dtypes["unet"]
        latents = ctx.arena.view("latents", (m, c, h, w))
        gens = [s.generator for s in slots]
        mode = req.mode
        base_host, refiner_host = self.host_schedules(req)
        schedule = self.bound("unet", req.scheduler, base_host)
        inpaint = None
        timer = StageTimer(ctx.device)
        self.progress.begin(schedule.num_steps + (refiner_host.num_steps if refiner_host is not None else 0))

        if mode == "txt2img":
            noise = torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens]).float()
            latents.copy_(noise * schedule.init_noise_sigma)
        else:
            t0 = timer.start()
            params = {}
            for s in slots:
                if s.request_index not in params:
                    init_image = requests[s.request_index].init_image
                    assert init_image is not None  # an img2img or inpainting request (its mode says so)
                    image = image_to_tensor(init_image, bucket.width, bucket.height)
                    params[s.request_index] = self._vae_encode(image.to(ctx.device), bucket)
            if mode == "img2img":
                init = torch.cat([self._posterior_sample(params[s.request_index], s.generator) for s in slots])
                init = (init * self.vae_scaling_factor).to(dt).float()  # diffusers casts to the UNet's dtype here
                noise = torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens]).float()
                latents.copy_(schedule.add_noise(init, noise, 0))
            else:
                inpaint = self._prepare_inpaint(req, bucket, slots, params, schedule, requests)
            timer.stop("vae_encode", t0)

        t1 = timer.start()
        finite = {"unet": self._denoise("unet", req.scheduler, schedule, slots, bucket, latents, inpaint=inpaint,
                                        requests=requests)}
        timer.stop("denoise", t1)
        steps_run = {"unet": schedule.num_steps}

        if refiner_host is not None:
            t2 = timer.start()
            rschedule = self.bound("refiner", req.scheduler, refiner_host)
            if req.refiner_mode == "img2img":
                noise = torch.cat([self._randn(g, (1, c, h, w), ctx.dtypes["refiner"]) for g in gens]).float()
                latents.copy_(rschedule.add_noise(latents, noise, 0))
            finite["refiner"] = self._denoise("refiner", req.scheduler, rschedule, slots, bucket, latents,
                                              inpaint=None, requests=requests)
            timer.stop("refiner", t2)
            steps_run["refiner"] = rschedule.num_steps

        t3 = timer.start()
        images, finite["decoded image"] = self._decode(latents, bucket)
        timer.stop("vae_decode", t3)
        pil = _to_pil(images)  # the batch's one synchronisation: the uint8 images reach the host
        for what, ok in finite.items():  # in pipeline order: the first stage that went non-finite is named
            if not bool(ok):
                raise non_finite_error(what if what == "decoded image" else f"{what} latents after denoising")
        timer.add_to(timings)
        self.progress.end()
        return pil, steps_run

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.ctx.manifest.pipeline["vae_scaling_factor"])

    def _prepare_inpaint(self, req: GenerationRequest, bucket: Bucket, slots: list[Slot], params: dict,
                         schedule: Schedule, requests: list[GenerationRequest]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """diffusers' SDXL inpainting with a 4-channel UNet, including its generator draws (see module doc)."""
        ctx = self.ctx
        m, c = len(slots), ctx.dims.latent_channels
        h, w = bucket.latent_hw
        dt = ctx.dtypes["unet"]
        image_latents, masks, noises = [], [], []
        first: dict[int, torch.Tensor] = {}
        for s in slots:
            r = requests[s.request_index]
            if s.request_index not in first:
                # diffusers encodes the (single) init image with the request's first generator only
                sample = self._posterior_sample(params[s.request_index], s.generator)
                first[s.request_index] = (sample * self.vae_scaling_factor).to(dt).float()
            image_latents.append(first[s.request_index])
            assert r.mask_image is not None and r.init_image is not None  # an inpainting request
            mask = mask_to_tensor(r.mask_image, bucket.width, bucket.height, r.init_image.size)
            masks.append(torch.nn.functional.interpolate(mask, size=(h, w)).to(device=ctx.device))
        for s in slots:
            noises.append(self._randn(s.generator, (1, c, h, w), dt).float())
        for s in slots:
            if s.image_index == 0:
                # diffusers also encodes the masked image (unused by a 4-channel UNet), drawing once more.
                self._randn(s.generator, (1, c, h, w), torch.float32)
        img_lat = ctx.arena.view("image_latents", (m, c, h, w))
        img_lat.copy_(torch.cat(image_latents))
        noise = ctx.arena.view("init_noise", (m, c, h, w))
        noise.copy_(torch.cat(noises))
        mask_buf = ctx.arena.view("mask", (m, 1, h, w))
        mask_buf.copy_(torch.cat(masks))
        latents = ctx.arena.view("latents", (m, c, h, w))
        if req.strength >= 1.0:
            latents.copy_(noise * schedule.init_noise_sigma)
        else:
            latents.copy_(schedule.add_noise(img_lat, noise, 0))
        return mask_buf, img_lat, noise

    def _denoise(self, unet: str, scheduler: str, schedule: Schedule, slots: list[Slot], bucket: Bucket,
                 latents: torch.Tensor, *, inpaint: tuple | None,
                 requests: list[GenerationRequest]) -> torch.Tensor:
        """Run ``unet`` over the batch's latents in place (``requests``, the slots' requests: the base UNet's
        ControlNets, which every slot of a batch shares); returns a device flag: all latents finite."""
        ctx = self.ctx
        m = len(slots)
        h, w = bucket.latent_hw
        # The refiner has no guidance embedding: it guides whenever guidance_scale > 1 (diffusers' refiner pipeline).
        cfg = slots[0].cfg if unet == "unet" else slots[0].guidance > 1.0
        s_len = slots[0].chunks * TOKENS_PER_CHUNK
        dims = {"B": 2 * m if cfg else m, "h": h, "w": w, "S": s_len}
        inputs, outputs = ctx.io_views(unet, dims)
        order = (["neg"] if cfg else []) + ["pos"]
        for part, tensor in (("embeds", "encoder_hidden_states"), ("pooled", "text_embeds"), ("time_ids", "time_ids")):
            inputs[tensor].copy_(torch.cat([s.cond[f"{unet}.{side}.{part}"] for side in order for s in slots]))
        if "timestep_cond" in inputs:  # a guidance-distilled UNet: its guidance embedding, never a CFG batch
            inputs["timestep_cond"].copy_(torch.cat([s.cond[f"{unet}.pos.timestep_cond"] for s in slots]))
        guidance = ctx.arena.view("guidance", (m, 1, 1, 1))
        guidance.copy_(torch.tensor([max(s.guidance, 1.0) for s in slots]).view(m, 1, 1, 1))
        step_index = ctx.arena.view("step_index", (1,)).view(())
        step_index.zero_()
        step_noise = None
        if schedule.needs_noise:
            # Always the full [max_steps, ...] view: a captured step indexes it, whatever the request's steps.
            step_noise = ctx.arena.view("step_noise", (ctx.max_steps, *latents.shape))
            drawn = schedule.draw_step_noise(tuple(latents.shape), [s.generator for s in slots], ctx.dtypes[unet])
            step_noise[: schedule.num_steps].copy_(drawn)
        names = list(schedule.make_state(torch.empty(0)))
        assert len(names) <= MAX_STATE_TENSORS, names
        state = {n: ctx.arena.view(f"state.{k}", tuple(latents.shape)) for k, n in enumerate(names)}
        for t in state.values():
            t.zero_()
        profile = select_profile(ctx.profiles[unet], dims)
        ctx.engines[unet].infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        signature: tuple[tuple[str, bool], ...] = ()
        controls = []
        if unet == "unet" and self.controlnets.unet_takes_residuals:
            signature = requests[slots[0].request_index].control_signature
            controls = self.controlnets.prepare(requests, [s.request_index for s in slots], signature, inputs,
                                                bucket=bucket, cfg=cfg, steps=schedule.num_steps)
        buf = StepBuffers(latents=latents, unet_in=inputs, noise_pred=outputs["noise_pred"], guidance=guidance,
                          step_index=step_index, step_noise=step_noise, state=state, inpaint=inpaint,
                          controls=controls)
        key = ("step", unet, str(bucket), m, cfg, s_len, inpaint is not None, scheduler, signature)
        self.denoisers[unet].run(schedule, buf, cfg=cfg, profile=profile, key=key)
        # Checked on the device now, read on the host after the batch's final copy (no sync here).
        return torch.isfinite(latents).all()

    def _decode(self, latents: torch.Tensor, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> uint8 images [M, H, W, 3] on the device (converted before the copy to the host), and
        whether the decoded floats were all finite (a device flag)."""
        h, w = bucket.latent_hw
        dims = {"B": latents.shape[0], "h": h, "w": w}
        inputs, outputs = self.ctx.io_views("vae_decoder", dims)
        inputs["latent"].copy_(latents / self.vae_scaling_factor)
        self.ctx.run("vae_decoder", inputs, outputs, dims)
        return to_uint8(outputs["images"]), torch.isfinite(outputs["images"]).all()


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in images.cpu().numpy()]
