"""The hot loop: one guided denoising step, replayed ``num_steps`` times.

Rules for this module (the next engineer: keep them):

* A step reads and writes only arena views and the schedule's device tables; the step index is a
  device tensor incremented in place. No ``.item()``, no Python branching on tensor values, no new
  persistent tensors, no host synchronisation inside a step.
* Everything a step needs that changes per request (latents, conditioning, guidance, noise, mask) is
  copied into fixed buffers *before* the loop, so a CUDA graph captured once per
  (component, bucket, batch, schedule) replays it for every request.
* Graphs are captured during warm-up only. A step shape that was not warmed runs eagerly (correct, just
  slower) and is logged once; capturing later would stall every request behind a capture.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Engine

log = logging.getLogger(__name__)


@dataclass
class StepBuffers:
    """Views the step reads and writes; all live in the arena, so their addresses are stable."""

    latents: torch.Tensor  # [M, C, h, w]
    unet_in: dict[str, torch.Tensor]  # the UNet's inputs: sample, timestep, encoder_hidden_states, ...
    noise_pred: torch.Tensor  # [B, C, h, w], B = 2M with guidance
    guidance: torch.Tensor  # [M, 1, 1, 1]
    step_index: torch.Tensor  # 0-d int64
    step_noise: torch.Tensor | None  # [steps, M, C, h, w] for ancestral / SDE schedulers
    state: dict[str, torch.Tensor]  # the scheduler's multistep state
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # mask, image latents, initial noise


class Denoiser:
    """Runs a UNet engine through a schedule with classifier-free guidance; graphs it on CUDA."""

    def __init__(self, unet: Engine, *, use_cuda_graphs: bool) -> None:
        self.unet = unet
        self.use_cuda_graphs = use_cuda_graphs
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.capture_allowed = True
        self._warned: set[Hashable] = set()

    def step(self, schedule: Any, buf: StepBuffers, *, cfg: bool, profile: int) -> None:
        """One guided step at ``buf.step_index`` (then the index is advanced)."""
        m = buf.latents.shape[0]
        sample = buf.unet_in["sample"]
        i = buf.step_index
        x = buf.latents
        if cfg:
            sample[:m].copy_(schedule.scale_model_input(x, i))
            sample[m:].copy_(sample[:m])
        else:
            sample.copy_(schedule.scale_model_input(x, i))
        buf.unet_in["timestep"].copy_(schedule.timestep(i).to(torch.float32).expand(sample.shape[0]))
        self.unet.run(buf.unet_in, {"noise_pred": buf.noise_pred}, profile=profile,
                      stream=torch.cuda.current_stream() if x.is_cuda else None)
        if cfg:
            uncond, text = buf.noise_pred[:m], buf.noise_pred[m:]
            guided = uncond + buf.guidance * (text - uncond)
        else:
            guided = buf.noise_pred
        noise = buf.step_noise.index_select(0, i.view(1)).squeeze(0) if buf.step_noise is not None else None
        x.copy_(schedule.step(guided, x, i, buf.state, noise))
        if buf.inpaint is not None:
            # diffusers' 4-channel inpainting: the known region follows the image, re-noised to the next
            # step's level (at the last step, index num_steps, add_noise returns the image unchanged).
            mask, image_latents, init_noise = buf.inpaint
            proper = schedule.add_noise(image_latents, init_noise, i + 1)
            x.copy_((1 - mask) * proper + mask * x)
        i.add_(1)

    def run(self, schedule: Any, buf: StepBuffers, *, cfg: bool, profile: int, key: Hashable) -> None:
        """All steps of ``schedule``: graph replay where captured, eager otherwise."""
        graph = self._graph(schedule, buf, cfg=cfg, profile=profile, key=key)
        for _ in range(schedule.num_steps):
            if graph is not None:
                graph.replay()
            else:
                self.step(schedule, buf, cfg=cfg, profile=profile)

    def _graph(self, schedule: Any, buf: StepBuffers, *, cfg: bool, profile: int,
               key: Hashable) -> torch.cuda.CUDAGraph | None:
        if not (self.use_cuda_graphs and buf.latents.is_cuda):
            return None
        if key in self.graphs:
            return self.graphs[key]
        if not self.capture_allowed:
            if key not in self._warned:
                log.warning("no CUDA graph was captured for %s at warm-up; running it eagerly", key)
                self._warned.add(key)
            return None
        # Capture from a snapshot of the mutable state so the real run starts from the right values.
        saved = [t.clone() for t in self._mutable(buf)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation must not happen during capture
                self.step(schedule, buf, cfg=cfg, profile=profile)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(schedule, buf, cfg=cfg, profile=profile)
        for t, s in zip(self._mutable(buf), saved, strict=True):
            t.copy_(s)
        self.graphs[key] = graph
        log.info("captured a CUDA graph for %s", key)
        return graph

    @staticmethod
    def _mutable(buf: StepBuffers) -> list[torch.Tensor]:
        return [buf.latents, buf.step_index, *buf.state.values()]
