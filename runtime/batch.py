"""One batch of images that share a step shape (``slots.Batch``): initial latents (txt2img
noise, or the VAE-encoded image for img2img and inpainting), the base denoising loop, the refiner, and the
VAE decode; its result is one value (``slots.BatchResult``).

Seeds follow diffusers' order of draws per image generator: VAE posterior sample, initial noise (and
the inpainting pipeline's extra masked-image draw), then every scheduler step's noise. Draws are made
in the UNet's dtype as diffusers makes them, then kept in float32 buffers for the scheduler math.

Schedules are built on the host and cached by their settings (schedule_tables.py); before a loop they are
copied into the fixed device tables of their (UNet, scheduler), which is what a captured step reads. A step's
CUDA graph is keyed by ``StepShape.graph_key``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import DEEPCACHE_FEATURE, TOKENS_PER_CHUNK, deepcache_feature_name, shallow_component
from sdxl_trt.engine_dir.profiles import select_profile

from .context import MAX_STATE_TENSORS, Bound, EngineContext
from .controlnet import ControlNets
from .denoise import Denoiser, ShallowStep, StepBuffers
from .images import image_to_tensor, mask_to_tensor, non_finite_error, to_uint8
from .progress import StepProgress
from .schedule_tables import ScheduleTables
from .schedulers import Schedule
from .slots import Batch, BatchResult


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
        self.progress = StepProgress(ctx.device, capacity=2 * ctx.max_steps)  # base + refiner steps of a batch
        self.denoisers: dict[str, Denoiser] = {n: Denoiser(ctx.engines[n], ctx.graphs, self.progress)
                                               for n in ("unet", "refiner") if n in ctx.engines}
        # One set of fixed tables per (UNet, sampler), allocated at load: a captured step reads them.
        self.schedules = ScheduleTables(scheduler_configs, self.denoisers, max_steps=ctx.max_steps,
                                        device=ctx.device)

    # ------------------------------------------------------------------ helpers
    def _randn(self, gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype).to(self.ctx.device)

    def _vae_encode(self, image: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """Image [1,3,H,W] in [-1,1] -> the latent distribution's parameters [1, 2C, h, w] (fp32)."""
        h, w = bucket.latent_hw
        vae = self.ctx.bind("vae_encoder", {"B": 1, "h": h, "w": w})
        vae.inputs["images"].copy_(image)
        self.ctx.run(vae)
        return vae.outputs["latent_parameters"].float().clone()

    def _posterior_sample(self, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """diffusers' DiagonalGaussianDistribution.sample, drawing from ``gen`` (float32, as its upcast VAE)."""
        mean, logvar = torch.chunk(params, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean + std * self._randn(gen, tuple(mean.shape), params.dtype)

    # ------------------------------------------------------------------ one batch
    def run(self, batch: Batch) -> BatchResult:
        """The batch's images (PIL, in slot order), the steps each UNet ran and each stage's seconds."""
        ctx, shape, slots = self.ctx, batch.shape, batch.slots
        m, c = len(batch), ctx.dims.latent_channels
        bucket = shape.bucket
        h, w = bucket.latent_hw
        dt = ctx.dtypes["unet"]
        latents = ctx.arena.view("latents", (m, c, h, w))
        gens = [s.generator for s in slots]
        base_host, refiner_host = self.schedules.for_shape(shape)
        schedule = self.schedules.bound("unet", shape.sampler, base_host)
        inpaint = None
        timer = StageTimer(ctx.device)
        self.progress.begin(schedule.num_steps + (refiner_host.num_steps if refiner_host is not None else 0))

        if shape.mode == "txt2img":
            noise = torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens]).float()
            latents.copy_(noise * schedule.init_noise_sigma)
        else:
            t0 = timer.start()
            params = {}
            for ri, req in batch.requests.items():
                assert req.init_image is not None  # an img2img or inpainting request (its mode says so)
                image = image_to_tensor(req.init_image, bucket.width, bucket.height)
                params[ri] = self._vae_encode(image.to(ctx.device), bucket)
            if shape.mode == "img2img":
                init = torch.cat([self._posterior_sample(params[s.request_index], s.generator) for s in slots])
                init = (init * self.vae_scaling_factor).to(dt).float()  # diffusers casts to the UNet's dtype here
                noise = torch.cat([self._randn(g, (1, c, h, w), dt) for g in gens]).float()
                latents.copy_(schedule.add_noise(init, noise, 0))
            else:
                inpaint = self._prepare_inpaint(batch, params, schedule)
            timer.stop("vae_encode", t0)

        t1 = timer.start()
        finite = {"unet": self._denoise("unet", batch, schedule, latents, inpaint=inpaint)}
        timer.stop("denoise", t1)
        steps_run = {"unet": schedule.num_steps}
        if shape.cache_branch is not None:  # step caching: the steps among them that ran the shallow UNet
            steps_run["unet_cached"] = sum(1 for i in range(schedule.num_steps) if i % shape.cache_interval)

        if refiner_host is not None:
            assert shape.refiner is not None  # a refiner schedule comes from the shape's refiner
            t2 = timer.start()
            rschedule = self.schedules.bound("refiner", shape.sampler, refiner_host)
            if shape.refiner.mode == "img2img":
                noise = torch.cat([self._randn(g, (1, c, h, w), ctx.dtypes["refiner"]) for g in gens]).float()
                latents.copy_(rschedule.add_noise(latents, noise, 0))
            finite["refiner"] = self._denoise("refiner", batch, rschedule, latents, inpaint=None)
            timer.stop("refiner", t2)
            steps_run["refiner"] = rschedule.num_steps

        t3 = timer.start()
        images, finite["decoded image"] = self._decode(latents, bucket)
        timer.stop("vae_decode", t3)
        pil = _to_pil(images)  # the batch's one synchronisation: the uint8 images reach the host
        for what, ok in finite.items():  # in pipeline order: the first stage that went non-finite is named
            if not bool(ok):
                raise non_finite_error(what if what == "decoded image" else f"{what} latents after denoising")
        timings: dict[str, float] = {}
        timer.add_to(timings)
        self.progress.end()
        return BatchResult(images=pil, steps_run=steps_run, timings=timings)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.ctx.manifest.pipeline["vae_scaling_factor"])

    def _prepare_inpaint(self, batch: Batch, params: dict[int, torch.Tensor], schedule: Schedule
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """diffusers' SDXL inpainting with a 4-channel UNet, including its generator draws (see module doc)."""
        ctx, slots, bucket = self.ctx, batch.slots, batch.shape.bucket
        m, c = len(batch), ctx.dims.latent_channels
        h, w = bucket.latent_hw
        dt = ctx.dtypes["unet"]
        image_latents, masks, noises = [], [], []
        first: dict[int, torch.Tensor] = {}
        for s in slots:
            r = s.request
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
        assert batch.shape.strength is not None  # inpainting has a strength (txt2img alone has none)
        if batch.shape.strength >= 1.0:
            latents.copy_(noise * schedule.init_noise_sigma)
        else:
            latents.copy_(schedule.add_noise(img_lat, noise, 0))
        return mask_buf, img_lat, noise

    def _denoise(self, unet: str, batch: Batch, schedule: Schedule, latents: torch.Tensor, *,
                 inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Run ``unet`` over the batch's latents in place (the base UNet with the ControlNets of the batch's
        shape); returns a device flag: all latents finite."""
        ctx, slots = self.ctx, batch.slots
        m = len(batch)
        key = batch.shape.graph_key(unet, m)
        cfg = key.guided
        h, w = key.bucket.latent_hw
        bound = ctx.bind(unet, {"B": 2 * m if cfg else m, "h": h, "w": w, "S": key.prompt_chunks * TOKENS_PER_CHUNK})
        inputs = bound.inputs
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
        names = schedule.state_names
        assert len(names) <= MAX_STATE_TENSORS, names
        state = {n: ctx.arena.view(f"state.{k}", tuple(latents.shape)) for k, n in enumerate(names)}
        for t in state.values():
            t.zero_()
        controls = []
        if unet == "unet" and self.controlnets.unet_takes_residuals:
            controls = self.controlnets.prepare(batch, inputs, schedule.num_steps)
        features = {n: t for n, t in bound.outputs.items() if n != "noise_pred"}
        shallow = self._shallow_step(batch, bound) if unet == "unet" else None
        buf = StepBuffers(latents=latents, unet_in=inputs, noise_pred=bound.outputs["noise_pred"], guidance=guidance,
                          step_index=step_index, step_noise=step_noise, state=state, inpaint=inpaint,
                          controls=controls, features=features, shallow=shallow)
        self.denoisers[unet].run(schedule, buf, cfg=cfg, profile=bound.profile, key=key)
        # Checked on the device now, read on the host after the batch's final copy (no sync here).
        return torch.isfinite(latents).all()

    def _shallow_step(self, batch: Batch, full: Bound) -> ShallowStep | None:
        """The batch's step-caching shallow UNet over the full UNet's arena views (its inputs, its noise output
        and the feature it writes), or None when the batch's shape asks for no caching."""
        shape = batch.shape
        if shape.cache_branch is None:
            return None
        name = shallow_component(shape.cache_branch)
        dims = {"B": full.inputs["sample"].shape[0], "h": shape.bucket.latent_hw[0], "w": shape.bucket.latent_hw[1],
                "S": full.inputs["encoder_hidden_states"].shape[1]}
        profile = select_profile(self.ctx.profiles[name], dims)
        inputs = {n: full.inputs[n] for n in self.ctx.specs[name].input_names if n != DEEPCACHE_FEATURE}
        inputs[DEEPCACHE_FEATURE] = full.outputs[deepcache_feature_name(shape.cache_branch)]
        engine = self.ctx.engines[name]
        engine.infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        return ShallowStep(engine, profile, inputs, shape.cache_interval,
                           shape.graph_key("unet", len(batch), shallow=True))

    def _decode(self, latents: torch.Tensor, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> uint8 images [M, H, W, 3] on the device (converted before the copy to the host), and
        whether the decoded floats were all finite (a device flag)."""
        h, w = bucket.latent_hw
        vae = self.ctx.bind("vae_decoder", {"B": latents.shape[0], "h": h, "w": w})
        vae.inputs["latent"].copy_(latents / self.vae_scaling_factor)
        self.ctx.run(vae)
        return to_uint8(vae.outputs["images"]), torch.isfinite(vae.outputs["images"]).all()


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in images.cpu().numpy()]
