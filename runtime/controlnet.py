"""ControlNets inside the denoising step: each requested ControlNet engine runs on the step's UNet input, and
the UNet takes the sum of their residuals, as diffusers' SDXL ControlNet pipelines (and MultiControlNet) do.

What changes per request is data in fixed buffers, never a branch in the step:

* the control image (resized to the bucket as diffusers' control image processor resizes it, in [0, 1]) is
  copied into the ControlNet's ``controlnet_cond`` input once, before the loop;
* ``scale``, ``start``/``end`` and guess mode become one table per ControlNet, ``[max_steps, rows, R]``:
  row ``b`` of step ``i`` holds ``scale * keep_i`` for each of the R residuals (diffusers'
  ``controlnet_keep``: 0 outside ``[start, end)`` of the steps), times guess mode's geometric factors
  (0.1 at the first residual to 1 at the mid block). The step reads the row of its device step index;
* guess mode with classifier-free guidance runs the ControlNet on the prompt half only, and the unconditional
  half of the UNet's residuals stays zero. Which ControlNets run, each on which rows, is the request's
  ``control_signature``: part of its StepShape and of the step's graph key.

A UNet built with ControlNet inputs and asked for none gets zero residuals (which change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdxl_trt.contracts import controlnet_component, controlnet_names, residual_specs
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import ControlNetUnit, GenerationRequest

from .context import Bound, EngineContext
from .engine import Engine
from .images import control_image_to_tensor
from .slots import Batch

GUESS_MODE_LOW = -1.0
"""Guess mode scales residual i by ``logspace(-1, 0, R)[i]``: 0.1 at the first down block, 1 at the mid block."""


@dataclass
class ControlBuffers:
    """One ControlNet's part of a step: its engine bound to the batch's rows, its scale table, the UNet rows
    its residuals feed."""

    bound: Bound  # outputs: residual name -> [rows, C, h/f, w/f]
    scales: torch.Tensor  # [max_steps, rows, R] float32
    offset: int  # the first UNet row its residuals add to (m: guess mode's prompt half; else 0)

    @property
    def engine(self) -> Engine:
        return self.bound.engine


def control_keep(steps: int, start: float, end: float) -> list[float]:
    """diffusers' ``controlnet_keep``: 1 for the steps a ControlNet acts on, 0 outside [start, end]."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def scale_rows(unit: ControlNetUnit, steps: int, residuals: int) -> torch.Tensor:
    """``[steps, R]`` float32: each step's scale of each residual for one image (see the module doc)."""
    keep = torch.tensor([unit.scale * k for k in control_keep(steps, unit.start, unit.end)], dtype=torch.float32)
    if unit.guess_mode:
        factors = torch.logspace(GUESS_MODE_LOW, 0, residuals, dtype=torch.float32)
        return factors[None, :] * keep[:, None]  # diffusers: logspace * (scale * keep), in float32
    return keep[:, None].expand(steps, residuals).contiguous()


class ControlNets:
    """The ControlNet engines of a pipeline: request checks, per-batch buffers, and their part of a step."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.names = controlnet_names(ctx.engines)
        # The residuals a ControlNet-built UNet takes (none for a plain build), in the contract's order.
        self.residuals = [t.name for t in residual_specs(ctx.dims)] if ctx.dims.controlnet_residuals else []
        rows = 2 * ctx.max_batch
        for name in self.names:
            ctx.arena.reserve(f"{controlnet_component(name)}.scale_table",
                              (ctx.max_steps, rows, len(self.residuals)), torch.float32)

    @property
    def unet_takes_residuals(self) -> bool:
        return bool(self.residuals)

    def check_names(self, req: GenerationRequest, rebuild_hint: str) -> None:
        """Refuse ControlNets these engines do not have, naming what they have (or how to rebuild)."""
        if not req.controlnets:
            return
        if not self.names:
            raise InvalidRequestError(
                "these engines were built without ControlNet; rebuild them with one or more "
                f"--controlnet PATH:NAME: {rebuild_hint} --controlnet PATH:NAME", param="controlnets")
        for i, unit in enumerate(req.controlnets):
            if unit.name not in self.names:
                raise InvalidRequestError(f"unknown ControlNet {unit.name!r}; these engines have: "
                                          f"{', '.join(self.names)}", param=f"controlnets[{i}].name")

    # ------------------------------------------------------------------ per batch
    def prepare(self, batch: Batch, unet_in: dict[str, torch.Tensor], steps: int) -> list[ControlBuffers]:
        """Fill each ControlNet's inputs of the batch's signature (conditioning copied from the UNet's inputs,
        each image's control image, scale tables for ``steps``); returns what the step runs."""
        ctx, shape = self.ctx, batch.shape
        m, cfg, bucket = len(batch), shape.guided, shape.bucket
        h, w = bucket.latent_hw
        s_len = unet_in["encoder_hidden_states"].shape[1]
        out: list[ControlBuffers] = []
        images: dict[tuple[int, str], torch.Tensor] = {}
        for name, guess in shape.controlnets:
            component = controlnet_component(name)
            half = guess and cfg  # the ControlNet sees the prompt half only
            rows = m if (half or not cfg) else 2 * m
            offset = m if half else 0
            bound = ctx.bind(component, {"B": rows, "h": h, "w": w, "S": s_len})
            inputs = bound.inputs
            for key in ("encoder_hidden_states", "text_embeds", "time_ids"):
                inputs[key].copy_(unet_in[key][offset:offset + rows])
            units = [_unit(s.request, name) for s in batch.slots]
            per_image = []
            for s, unit in zip(batch.slots, units, strict=True):
                if (s.request_index, name) not in images:
                    assert unit.image is not None  # ControlNetUnit.validate refused a unit without one
                    images[(s.request_index, name)] = control_image_to_tensor(unit.image, bucket.width,
                                                                              bucket.height)
                per_image.append(images[(s.request_index, name)])
            cond = torch.cat(per_image)
            inputs["controlnet_cond"].copy_(torch.cat([cond, cond]) if rows == 2 * m else cond)
            table = torch.stack([scale_rows(u, steps, len(self.residuals)) for u in units], dim=1)  # [steps, m, R]
            if rows == 2 * m:
                table = torch.cat([table, table], dim=1)
            scales = ctx.arena.view(f"{component}.scale_table", (ctx.max_steps, rows, len(self.residuals)))
            scales[:steps].copy_(table)
            out.append(ControlBuffers(bound, scales, offset))
        if not out:
            for name in self.residuals:  # a ControlNet-built UNet asked for none: zero residuals
                unet_in[name].zero_()
        return out


def run_controls(controls: Sequence[ControlBuffers], unet_in: dict[str, torch.Tensor], step_index: torch.Tensor,
                 stream: torch.cuda.Stream | None) -> None:
    """Inside the step, after the UNet's ``sample`` and ``timestep`` are set: run each ControlNet on its rows
    and leave the sum of their residuals in the UNet's residual inputs (diffusers' MultiControlNet order)."""
    sample, timestep = unet_in["sample"], unet_in["timestep"]
    for k, c in enumerate(controls):
        inputs = c.bound.inputs
        rows = inputs["sample"].shape[0]
        inputs["sample"].copy_(sample[c.offset:c.offset + rows])
        inputs["timestep"].copy_(timestep[c.offset:c.offset + rows])
        inputs["conditioning_scale"].copy_(c.scales.index_select(0, step_index.reshape(1)).squeeze(0))
        c.bound.run(stream)
        for name, residual in c.bound.outputs.items():
            target = unet_in[name]
            if k == 0:
                if c.offset:
                    target[:c.offset].zero_()
                target[c.offset:c.offset + rows].copy_(residual)
            else:
                target[c.offset:c.offset + rows].add_(residual)


def _unit(req: GenerationRequest, name: str) -> ControlNetUnit:
    for unit in req.controlnets:
        if unit.name == name:
            return unit
    raise AssertionError(f"batched a request without ControlNet {name!r}")  # batches share the signature
