"""DPM-Solver++ multistep (2M, 2M SDE, 3M SDE): diffusers' DPMSolverMultistepScheduler with algorithm_type
"dpmsolver++" (solver_order 2) or "sde-dpmsolver++" (solver_order 2 or 3), midpoint solver type, with or
without Karras sigmas.

Each step: x0 = linear(x, model_output); x_next = A*x + B*x0 + C*x0_prev (+ D*x0_prev2 for 3M) (+ N*noise
for SDE). Diffusers' warm-up (first order on the first step run, second order on the next for 3M) and
lower-order final steps are zero coefficients in the table, not control flow. State: previous x0s.
"""

from __future__ import annotations

import math
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


def multistep_sigmas(cfg: NoiseConfig, n: int, *, karras: bool, custom: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [n], sigmas float32 [n + 1] ending in 0), as the multistep solvers' set_timesteps
    (`custom`: DPMSolverMultistepScheduler's explicit `timesteps`; refused with Karras sigmas by the caller)."""
    if custom is not None:
        timesteps = check_custom_timesteps(custom, cfg.num_train_timesteps)
    else:
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
    """Coefficients per step: (x0_x, x0_model, A, B, C, D, N)."""

    def __init__(self, *, order: int, sde: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.order = order
        self.needs_noise = sde
        self.noise_dtype = torch.float32 if sde else None  # diffusers draws SDE noise in float32
        self.state_names = ("x0_prev", "x0_prev2")[: self.order - 1]

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        x0_x, x0_m, c_x, c_x0, c_prev, c_prev2, c_noise = self._row(self._coefs, step_index).unbind()
        x0 = sample * x0_x + model_output.to(sample.dtype) * x0_m
        out = sample * c_x + x0 * c_x0 + state["x0_prev"] * c_prev
        if self.order == 3:
            out = out + state["x0_prev2"] * c_prev2
            state["x0_prev2"].copy_(state["x0_prev"])
        if self.needs_noise:
            out = out + self._step_noise(noise, sample, step_index).to(sample.dtype) * c_noise
        state["x0_prev"].copy_(x0)
        return out


def _update_weights(order: int, sde: bool, h: float, r0: float, r1: float, alpha_t: float) -> np.ndarray:
    """Weights of (x0, x0_prev, x0_prev2) in diffusers' dpmsolver++ updates: orders 1 and 2 (midpoint),
    and order 3 for the SDE variant (the only third-order sampler offered)."""
    d0 = np.array([1.0, 0.0, 0.0])
    c0 = alpha_t * -math.expm1(-2.0 * h if sde else -h)  # SDE: a_t (1 - e^-2h); ODE: -a_t (e^-h - 1)
    if order == 1:
        return c0 * d0
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0
    if order == 2:
        return c0 * d0 + 0.5 * c0 * d1_0
    assert sde, "third order is implemented for sde-dpmsolver++ only"
    e2 = -math.expm1(-2.0 * h)  # 1 - e^-2h
    c1, c2 = alpha_t * (e2 / (-2.0 * h) + 1.0), alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return c0 * d0 + c1 * d1 + c2 * d2


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *, karras: bool, sde: bool,
         order: int = 2, timesteps: Sequence[int] | None = None, device: torch.device | str,
         dtype: torch.dtype) -> DPMSolverSchedule:
    cfg = NoiseConfig.parse(config)
    steps, sigmas = multistep_sigmas(cfg, num_inference_steps, karras=karras, custom=timesteps)
    begin, count = window.select(steps, cfg.num_train_timesteps)
    n = len(steps)
    lam = [log_snr(float(s)) for s in sigmas]
    coefs = []
    for k, g in enumerate(range(begin, begin + count)):
        # diffusers: first order without history and on the last step (final sigma 0); 3M: second order on
        # the second step run and, below 15 steps, on the second-to-last (lower_order_final).
        if k == 0 or g == n - 1:
            step_order = 1
        elif order == 2 or k == 1 or (g == n - 2 and n < 15):
            step_order = 2
        else:
            step_order = 3
        (alpha_s0, sigma_s0), (alpha_t, sigma_t) = vp_from_sigma(float(sigmas[g])), vp_from_sigma(float(sigmas[g + 1]))
        h = lam[g + 1] - lam[g]
        r0 = (lam[g] - lam[g - 1]) / h if step_order > 1 else 0.0
        r1 = (lam[g - 1] - lam[g - 2]) / h if step_order > 2 else 0.0
        x0_x, x0_m = x0_coefs(cfg.prediction_type, alpha_s0, sigma_s0)
        c_x0, c_prev, c_prev2 = _update_weights(step_order, sde, h, r0, r1, alpha_t)
        c_x = sigma_t / sigma_s0 * (math.exp(-h) if sde else 1.0)
        c_noise = sigma_t * math.sqrt(-math.expm1(-2.0 * h)) if sde else 0.0
        coefs.append((x0_x, x0_m, c_x, c_x0, c_prev, c_prev2, c_noise))
    return DPMSolverSchedule(
        order=order, sde=sde, timesteps=steps[begin:begin + count], coefs=np.array(coefs), input_scale=None,
        noise_levels=vp_noise_levels(torch.from_numpy(sigmas[begin:begin + count])),
        init_noise_sigma=1.0, device=device, dtype=dtype,
    )
