"""TCD: diffusers' TCDScheduler (trajectory consistency distillation), with ``eta`` (the paper's gamma).

Timesteps as LCM's (its own selection from an ``original_inference_steps`` schedule, or an explicit list).
Each step predicts x0 and eps, moves them to the intermediate timestep s = floor((1 - eta) * t_next)
(pred_noised = sqrt(a_s) * x0 + sqrt(1 - a_s) * eps, linear in (x, model_output)), then, for eta > 0 and
every step but the schedule's last, re-noises it to t_next with fresh noise:
x_next = sqrt(a_next / a_s) * pred_noised + sqrt(1 - a_next / a_s) * noise. eta is per request: it only
changes the tables (and which steps draw noise), never the step's code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._base import NoiseConfig, NoisyLinearSchedule, Window, x0_coefs
from .lcm import CONSISTENCY_DEFAULTS, consistency_timesteps, ddpm_noise_levels, eps_coefs


class TCDSchedule(NoisyLinearSchedule):
    """Coefficients per step: (c_x, c_model, c_noise); x_next = c_x * x + c_model * model_output + c_noise * z."""

    needs_noise = True  # always reads its noise rows (zeros at eta 0), so one step's code serves every eta


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *, timesteps: Sequence[int] | None = None,
         eta: float, device: torch.device | str, dtype: torch.dtype) -> TCDSchedule:
    """``eta``: the gamma, checked against (and defaulted from) TCD's record in `sdxl_trt.samplers`."""
    cfg = NoiseConfig.parse(config, defaults=CONSISTENCY_DEFAULTS)
    full = consistency_timesteps(config, cfg, num_inference_steps, timesteps, sampler="tcd")
    n = len(full)
    begin, count = window.select(full, cfg.num_train_timesteps)
    alphas_cumprod = cfg.alphas_cumprod(clamp_terminal=False)
    coefs, draws = [], []
    for g in range(begin, begin + count):
        t = int(full[g])
        t_next = int(full[g + 1]) if g + 1 < n else 0
        # diffusers: torch.floor((1 - eta) * prev_timestep) in float32
        s = int(torch.floor((1 - eta) * torch.tensor(t_next)).to(torch.long))
        a_t, a_next, a_s = (float(alphas_cumprod[i]) for i in (t, t_next, s))
        alpha, sigma = math.sqrt(a_t), math.sqrt(1 - a_t)
        x0_x, x0_m = x0_coefs(cfg.prediction_type, alpha, sigma)
        e_x, e_m = eps_coefs(cfg.prediction_type, alpha, sigma)
        pn_x = math.sqrt(a_s) * x0_x + math.sqrt(1 - a_s) * e_x
        pn_m = math.sqrt(a_s) * x0_m + math.sqrt(1 - a_s) * e_m
        noisy = eta > 0 and g != n - 1
        r_x, r_noise = (math.sqrt(a_next / a_s), math.sqrt(1 - a_next / a_s)) if noisy else (1.0, 0.0)
        coefs.append((pn_x * r_x, pn_m * r_x, r_noise))
        draws.append(noisy)
    run = full[begin:begin + count]
    schedule = TCDSchedule(timesteps=run, coefs=np.array(coefs), input_scale=None, init_noise_sigma=1.0,
                           noise_levels=ddpm_noise_levels(alphas_cumprod, run), device=device, dtype=dtype)
    schedule._draws = tuple(draws)
    return schedule
