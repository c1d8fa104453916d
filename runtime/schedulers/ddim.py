"""DDIM: diffusers' DDIMScheduler with eta = 0 (the SDXL pipelines' default; deterministic).

x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, both linear in (x, model_output). a_prev is taken at
t - num_train_timesteps // num_inference_steps, as diffusers does, whatever the spacing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sdxl_trt.errors import ModelLoadError

from ._base import NoiseConfig, Schedule, Window, spaced_timesteps, x0_coefs


class DDIMSchedule(Schedule):
    """Coefficients per step: (c_x, c_model); x_prev = c_x * x + c_model * model_output."""

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        c_x, c_model = self._row(self._coefs, step_index).unbind()
        return sample * c_x + model_output.to(sample.dtype) * c_model


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *,
         device: torch.device | str, dtype: torch.dtype) -> DDIMSchedule:
    cfg = NoiseConfig.parse(config, defaults={"timestep_spacing": "leading"})
    if config.get("clip_sample", True):
        raise ModelLoadError("DDIM with clip_sample=True (diffusers' default) is not supported: SDXL latents are "
                             "not in [-1, 1]; use a config with clip_sample=False, as SDXL's has")
    n, t_max = num_inference_steps, cfg.num_train_timesteps
    alphas_cumprod = cfg.alphas_cumprod(clamp_terminal=False)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    timesteps = spaced_timesteps(cfg, n, style="ddim")
    begin, count = window.select(timesteps, t_max)
    run = timesteps[begin:begin + count]
    coefs = []
    for t in run:
        a_t = float(alphas_cumprod[t])
        prev_t = int(t) - t_max // n
        a_prev = float(alphas_cumprod[prev_t]) if prev_t >= 0 else final
        x0_x, x0_m = x0_coefs(cfg.prediction_type, math.sqrt(a_t), math.sqrt(1 - a_t))
        # eps = eps_x * x + eps_m * model_output
        eps_x, eps_m = (0.0, 1.0) if cfg.prediction_type == "epsilon" else (math.sqrt(1 - a_t), math.sqrt(a_t))
        s_prev, n_prev = math.sqrt(a_prev), math.sqrt(1 - a_prev)
        coefs.append((s_prev * x0_x + n_prev * eps_x, s_prev * x0_m + n_prev * eps_m))
    a_run = alphas_cumprod[torch.from_numpy(run)]
    return DDIMSchedule(
        timesteps=run, coefs=np.array(coefs), input_scale=None, init_noise_sigma=1.0, device=device, dtype=dtype,
        noise_levels=torch.stack([a_run**0.5, (1 - a_run) ** 0.5], dim=1),  # float32, as diffusers' add_noise
    )
