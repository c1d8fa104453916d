"""Euler ancestral: diffusers' EulerAncestralDiscreteScheduler.

An Euler step down to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 =
sigma_next^2: x_next = x + (sigma_down - sigma) * (x - x0) / sigma + sigma_up * noise. Noise every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._base import NoiseConfig, NoisyLinearSchedule, Window
from .euler import derivative_coefs, sigma_schedule, sigma_space_tables


class EulerAncestralSchedule(NoisyLinearSchedule):
    """Coefficients per step: (c_x, c_model, c_noise)."""


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *,
         device: torch.device | str, dtype: torch.dtype) -> EulerAncestralSchedule:
    cfg = NoiseConfig.parse(config)
    timesteps, sigmas = sigma_schedule(cfg, num_inference_steps, karras=False)
    begin, count = window.select(timesteps, cfg.num_train_timesteps)
    coefs = []
    for g in range(begin, begin + count):
        sigma, sigma_next = float(sigmas[g]), float(sigmas[g + 1])
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        p, q = derivative_coefs(cfg.prediction_type, sigma)
        dt = sigma_down - sigma
        coefs.append((1.0 + p * dt, q * dt, sigma_up))
    return EulerAncestralSchedule(coefs=np.array(coefs), device=device, dtype=dtype,
                                  **sigma_space_tables(cfg, timesteps, sigmas, begin, count))
