"""The hot loop: one guided denoising step, replayed ``num_steps`` times.

Rules for this module (the next engineer: keep them):

* A step reads and writes only arena views and the schedule's *fixed* tables (``Schedule.bind``); the
  step index is a device tensor incremented in place. No ``.item()``, no Python branching on tensor
  values or on the request's settings, no new persistent tensors, no host synchronisation inside a step.
* Everything a step needs that changes per request (latents, conditioning, guidance, step noise, mask,
  the schedule's tables) is copied into fixed buffers *before* the loop, so one CUDA graph per shape key
  (runtime/graphs.py) replays it for every request, whatever its step count, strength or refiner split.
* Step caching (DeepCache): a full step and a shallow step are two captured graphs (keys differ in
  ``GraphKey.cache_branch``) over the same buffers; the full UNet writes the cached feature into the arena, the
  shallow UNet reads it there. Which one a step runs is decided here, on the host, between replays (step i of
  the steps run is full when i % N == 0): no step reads the interval.
* Scheduler math is float32 (latents, guidance, tables, state), as the scheduler package's rule and
  diffusers have it; only the UNet's own inputs and outputs are in the engine's dtype.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .controlnet import ControlBuffers, run_controls
from .engine import Engine
from .graphs import CudaGraphs
from .progress import StepProgress


@dataclass
class StepBuffers:
    """Views the step reads and writes; all live in the arena, so their addresses are stable per shape."""

    latents: torch.Tensor  # [M, C, h, w] float32
    unet_in: dict[str, torch.Tensor]  # the UNet's inputs: sample, timestep, encoder_hidden_states, ...
    noise_pred: torch.Tensor  # [B, C, h, w] in the UNet's dtype, B = 2M with guidance
    guidance: torch.Tensor  # [M, 1, 1, 1] float32
    step_index: torch.Tensor  # 0-d int64
    step_noise: torch.Tensor | None  # [max_steps, M, C, h, w] float32, for ancestral / SDE schedulers
    state: dict[str, torch.Tensor]  # the scheduler's multistep state, float32
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # mask, image latents, initial noise
    controls: list[ControlBuffers] = field(default_factory=list)  # ControlNets feeding the UNet's residuals
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # the full UNet's cached features (arena)
    shallow: ShallowStep | None = None  # step caching: the shallow UNet run between full steps

    def mutable(self) -> list[torch.Tensor]:
        """What a step changes in place (restored after a capture)."""
        return [self.latents, self.step_index, *self.state.values()]


@dataclass(frozen=True)
class ShallowStep:
    """The shallow UNet of one cache branch, bound over the full UNet's buffers: the same input views, the
    full UNet's feature output as its ``deepcache_feature`` input, the same noise prediction output."""

    engine: Engine
    profile: int
    inputs: dict[str, torch.Tensor]
    interval: int  # a full step every ``interval`` steps
    key: Hashable  # its captured graph's key

    def full_at(self, step: int) -> bool:
        """DeepCache's uniform mode: the steps run are counted from 0, the first one run being full."""
        return step % self.interval == 0


class Denoiser:
    """Runs a UNet engine through a schedule with classifier-free guidance; graphs the step on CUDA."""

    def __init__(self, unet: Engine, graphs: CudaGraphs, progress: StepProgress | None = None) -> None:
        self.unet = unet
        self.graphs = graphs
        self.progress = progress

    def step(self, schedule: Any, buf: StepBuffers, *, cfg: bool, profile: int, shallow: bool = False) -> None:
        """One guided step at ``buf.step_index`` (then the index is advanced); ``shallow``: the step-caching
        shallow UNet on the feature the last full step left in the arena."""
        m = buf.latents.shape[0]
        sample = buf.unet_in["sample"]
        i = buf.step_index
        x = buf.latents
        if cfg:
            sample[:m].copy_(schedule.scale_model_input(x, i))
            sample[m:].copy_(sample[:m])
        else:
            sample.copy_(schedule.scale_model_input(x, i))
        buf.unet_in["timestep"].copy_(schedule.timestep(i).expand(sample.shape[0]))
        stream = torch.cuda.current_stream(x.device) if x.is_cuda else None
        if buf.controls:
            run_controls(buf.controls, buf.unet_in, i, stream)
        if shallow:
            assert buf.shallow is not None
            buf.shallow.engine.run(buf.shallow.inputs, {"noise_pred": buf.noise_pred}, profile=buf.shallow.profile,
                                   stream=stream)
        else:
            self.unet.run(buf.unet_in, {"noise_pred": buf.noise_pred, **buf.features}, profile=profile, stream=stream)
        eps = buf.noise_pred.float()
        if cfg:
            uncond, text = eps[:m], eps[m:]
            eps = uncond + buf.guidance * (text - uncond)
        x.copy_(schedule.step(eps, x, i, buf.state, buf.step_noise))
        if buf.inpaint is not None:
            # diffusers' 4-channel inpainting: the known region follows the image, re-noised to the next
            # step's level (after the last step, row num_steps of the tables returns the image unchanged).
            mask, image_latents, init_noise = buf.inpaint
            proper = schedule.add_noise(image_latents, init_noise, i + 1)
            x.copy_((1 - mask) * proper + mask * x)
        i.add_(1)

    def run(self, schedule: Any, buf: StepBuffers, *, cfg: bool, profile: int, key: Hashable) -> None:
        """All steps of ``schedule`` (bound to fixed tables): graph replay where captured, eager otherwise."""
        graph_safe = self.unet.graph_safe and all(c.engine.graph_safe for c in buf.controls)
        graph = self.graphs.get(key, lambda: self.step(schedule, buf, cfg=cfg, profile=profile),
                                graph_safe=graph_safe, mutable=buf.mutable())
        shallow_graph = None
        if buf.shallow is not None:
            # Captured after the full step: its capture restores what it mutates, and the feature it reads is
            # only a buffer's contents, which the full step rewrites before any shallow step replays.
            shallow_graph = self.graphs.get(buf.shallow.key,
                                            lambda: self.step(schedule, buf, cfg=cfg, profile=profile, shallow=True),
                                            graph_safe=graph_safe and buf.shallow.engine.graph_safe,
                                            mutable=buf.mutable())
        for i in range(schedule.num_steps):
            shallow = buf.shallow is not None and not buf.shallow.full_at(i)
            g = shallow_graph if shallow else graph
            if g is not None:
                g.replay()
            else:
                self.step(schedule, buf, cfg=cfg, profile=profile, shallow=shallow)
            if self.progress is not None:
                self.progress.mark()  # between steps, outside any capture: an event record or a count
