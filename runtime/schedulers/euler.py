"""Euler: diffusers' EulerDiscreteScheduler (SDXL's default), with or without Karras sigmas.

Works on x = x_vp / alpha (noise level sigma): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - x0_i) / sigma_i,
which is linear in (x_i, model_output): one multiply-add per step with two tabled coefficients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._base import (
    NoiseConfig,
    Schedule,
    Window,
    check_custom_timesteps,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
    vp_from_sigma,
    x0_coefs,
)


def sigma_schedule(cfg: NoiseConfig, n: int, *, karras: bool, custom: Sequence[int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [n], sigmas float32 [n + 1] ending in 0), as EulerDiscreteScheduler.set_timesteps
    (`custom`: its explicit `timesteps`, which diffusers refuses with Karras sigmas, as the caller does)."""
    if custom is not None:
        timesteps = check_custom_timesteps(custom, cfg.num_train_timesteps).astype(np.float32)
    else:
        timesteps = spaced_timesteps(cfg, n, style="euler")
    train = train_sigmas(cfg.alphas_cumprod())
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    return timesteps, np.concatenate([sigmas, [0]]).astype(np.float32)


def sigma_space_tables(cfg: NoiseConfig, timesteps: np.ndarray, sigmas: np.ndarray, begin: int, count: int
                       ) -> dict[str, Any]:
    """Schedule arguments shared by the samplers that work at noise level sigma (Euler, Euler ancestral):
    input scale 1 / sqrt(sigma^2 + 1), add_noise x + sigma * n, init_noise_sigma; float32 like diffusers."""
    full = torch.from_numpy(sigmas)
    sigma_max = full.max()
    run = full[begin:begin + count]
    return {
        "timesteps": timesteps[begin:begin + count],
        "input_scale": (run**2 + 1) ** 0.5,
        "noise_levels": torch.stack([torch.ones_like(run), run], dim=1),
        "init_noise_sigma": float(sigma_max if cfg.timestep_spacing != "leading" else (sigma_max**2 + 1) ** 0.5),
    }


def derivative_coefs(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(p, q) with (x - x0) / sigma = p * x + q * model_output at noise level sigma."""
    alpha, sigma_vp = vp_from_sigma(sigma)
    a, b = x0_coefs(prediction_type, alpha, sigma_vp)  # x0 = a * (alpha * x) + b * model_output
    return (1.0 - a * alpha) / sigma, -b / sigma


class EulerSchedule(Schedule):
    """Coefficients per step: (c_x, c_model); x_next = c_x * x + c_model * model_output."""

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        c_x, c_model = self._row(self._coefs, step_index).unbind()
        return sample * c_x + model_output.to(sample.dtype) * c_model


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *, karras: bool,
         timesteps: Sequence[int] | None = None, device: torch.device | str, dtype: torch.dtype) -> EulerSchedule:
    cfg = NoiseConfig.parse(config)
    steps, sigmas = sigma_schedule(cfg, num_inference_steps, karras=karras, custom=timesteps)
    begin, count = window.select(steps, cfg.num_train_timesteps)
    coefs = []
    for g in range(begin, begin + count):
        sigma, dt = float(sigmas[g]), float(sigmas[g + 1]) - float(sigmas[g])
        p, q = derivative_coefs(cfg.prediction_type, sigma)
        coefs.append((1.0 + p * dt, q * dt))
    return EulerSchedule(coefs=np.array(coefs), device=device, dtype=dtype,
                         **sigma_space_tables(cfg, steps, sigmas, begin, count))
