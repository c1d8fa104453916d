"""A pipeline's schedules: host tables built per request settings (cached), and the fixed device tables a
captured step reads, one set per (UNet, sampler), allocated at load.

Building a step shape's schedules is also the check that refuses the settings a sampler cannot take
(spacing, explicit timesteps, eta, too many steps): ``Pipeline.admit`` calls :meth:`ScheduleTables.for_shape`
before a request is queued, and a batch calls it again (from the cache) before its loop.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sdxl_trt.errors import SdxlTrtError
from sdxl_trt.samplers import SCHEDULERS
from sdxl_trt.step_shape import StepShape

from .schedulers import Schedule, make_schedule
from .schedulers._base import FixedTables


class ScheduleTables:
    """Host schedules by their settings, and the device tables they are bound into before a loop."""

    def __init__(self, scheduler_configs: Mapping[str, Mapping[str, Any]], unets: Iterable[str], *,
                 max_steps: int, device: torch.device) -> None:
        self.scheduler_configs = scheduler_configs  # per UNet ("unet", "refiner")
        self.fixed: dict[tuple[str, str], FixedTables] = {}
        for unet in unets:
            for name in SCHEDULERS:
                try:
                    width = self.host(unet, name, 2).table_width
                except SdxlTrtError:  # a sampler this model's config cannot run: refused per request instead
                    continue
                self.fixed[(unet, name)] = FixedTables.allocate(max_steps, width, device)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - host tables, tiny; they live as long as their pipeline
    def host(self, unet: str, name: str, steps: int, *, strength: float = 1.0,
             denoising_start: float | None = None, denoising_end: float | None = None,
             timestep_spacing: str | None = None, timesteps: tuple[int, ...] | None = None,
             eta: float | None = None) -> Schedule:
        """The host-side schedule for these settings (float32 tables, as diffusers steps in float32)."""
        return make_schedule(name, steps, config=self.scheduler_configs[unet], strength=strength,
                             denoising_start=denoising_start, denoising_end=denoising_end,
                             timestep_spacing=timestep_spacing, timesteps=timesteps, eta=eta, device="cpu",
                             dtype=torch.float32)

    def for_shape(self, shape: StepShape) -> tuple[Schedule, Schedule | None]:
        """The base's and (with a refiner) the refiner's host schedules of a step shape.

        Spacing and eta apply to both UNets; explicit timesteps to the base and to an ensemble's refiner (one
        schedule, split), not to an img2img refiner, which re-noises on its own schedule of ``refiner.steps``.
        """
        options = {"timestep_spacing": shape.timestep_spacing, "eta": shape.eta}
        refiner = shape.refiner
        ensemble = refiner is not None and refiner.mode == "ensemble"
        base = self.host("unet", shape.sampler, shape.steps, strength=1.0 if shape.strength is None else shape.strength,
                         denoising_end=refiner.start if refiner is not None and ensemble else None,
                         timesteps=shape.timesteps, **options)
        if refiner is None:
            return base, None
        if ensemble:
            return base, self.host("refiner", shape.sampler, shape.steps, denoising_start=refiner.start,
                                   timesteps=shape.timesteps, **options)
        assert refiner.steps is not None and refiner.strength is not None  # an img2img refiner has both
        return base, self.host("refiner", shape.sampler, refiner.steps, strength=refiner.strength, **options)

    def bound(self, unet: str, sampler: str, schedule: Schedule) -> Schedule:
        """``schedule`` copied into the fixed tables of (``unet``, ``sampler``), which a captured step reads."""
        return schedule.bind(self.fixed[(unet, sampler)])
