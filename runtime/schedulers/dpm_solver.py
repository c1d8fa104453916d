"""DPM-Solver++(2M) and its SDE variant: diffusers' DPMSolverMultistepScheduler with solver_order=2,
algorithm_type "dpmsolver++" or "sde-dpmsolver++", midpoint solver type, with or without Karras sigmas.

Each step: x0 = linear(x, model_output); x_next = A*x + B*x0 + C*x0_prev (+ N*noise for SDE). The first
step run and the schedule's final step are first order (C = 0), as diffusers' warm-up and
lower_order_final; that is in the table, not in control flow. State: the previous step's x0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._base import (
    NoiseConfig,
    Schedule,
    Window,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
    vp_from_sigma,
    x0_coefs,
)


def multistep_sigmas(cfg: NoiseConfig, n: int, *, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [n], sigmas float32 [n + 1] ending in 0), as the multistep solvers' set_timesteps."""
    timesteps = spaced_timesteps(cfg, n, style="multistep")
    train = train_sigmas(cfg.alphas_cumprod())
    if karras:
        sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
        timesteps = sigma_to_t(sigmas, np.log(train)).round().astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    return timesteps, np.concatenate([sigmas, [0]]).astype(np.float32)


def vp_noise_levels(sigmas: torch.Tensor) -> torch.Tensor:
    """[len, 2] (alpha_t, sigma_t) for add_noise, float32 as diffusers' _sigma_to_alpha_sigma_t."""
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    return torch.stack([alpha, sigmas * alpha], dim=1)


def log_snr(sigma: float) -> float:
    """lambda = log(alpha_t / sigma_t) = -log(sigma); +inf at sigma 0 (the last step's target)."""
    return math.inf if sigma == 0.0 else -math.log(sigma)


class DPMSolverSchedule(Schedule):
    """Coefficients per step: (x0_x, x0_model, A, B, C, N)."""

    def __init__(self, *, sde: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.needs_noise = sde
        self.noise_dtype = torch.float32 if sde else None  # diffusers draws SDE noise in float32

    def make_state(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x0_prev": torch.zeros_like(sample)}

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        x0_x, x0_m, c_x, c_x0, c_prev, c_noise = self._row(self._coefs, step_index).unbind()
        x0 = sample * x0_x + model_output.to(sample.dtype) * x0_m
        out = sample * c_x + x0 * c_x0 + state["x0_prev"] * c_prev
        if self.needs_noise:
            out = out + self._step_noise(noise, sample, step_index).to(sample.dtype) * c_noise
        state["x0_prev"].copy_(x0)
        return out


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *, karras: bool, sde: bool,
         device: torch.device | str, dtype: torch.dtype) -> DPMSolverSchedule:
    cfg = NoiseConfig.parse(config)
    timesteps, sigmas = multistep_sigmas(cfg, num_inference_steps, karras=karras)
    begin, count = window.select(timesteps, cfg.num_train_timesteps)
    n = len(timesteps)
    coefs = []
    for k, g in enumerate(range(begin, begin + count)):
        s0, t = float(sigmas[g]), float(sigmas[g + 1])
        alpha_s0, sigma_s0 = vp_from_sigma(s0)
        alpha_t, sigma_t = vp_from_sigma(t)
        h = log_snr(t) - log_snr(s0)
        x0_x, x0_m = x0_coefs(cfg.prediction_type, alpha_s0, sigma_s0)
        # first order on the first step run (no history) and on the schedule's last step (final sigma 0)
        second_order = k > 0 and g < n - 1
        half_over_r0 = 0.5 * h / (log_snr(s0) - log_snr(float(sigmas[g - 1]))) if second_order else 0.0
        if sde:
            b = alpha_t * -math.expm1(-2.0 * h)
            coefs.append((x0_x, x0_m, sigma_t / sigma_s0 * math.exp(-h), b * (1 + half_over_r0), -b * half_over_r0,
                          sigma_t * math.sqrt(-math.expm1(-2.0 * h))))
        else:
            b = alpha_t * -math.expm1(-h)
            coefs.append((x0_x, x0_m, sigma_t / sigma_s0, b * (1 + half_over_r0), -b * half_over_r0, 0.0))
    return DPMSolverSchedule(
        sde=sde, timesteps=timesteps[begin:begin + count], coefs=np.array(coefs), input_scale=None,
        noise_levels=vp_noise_levels(torch.from_numpy(sigmas[begin:begin + count])),
        init_noise_sigma=1.0, device=device, dtype=dtype,
    )
