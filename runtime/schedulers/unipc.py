"""UniPC: diffusers' UniPCMultistepScheduler with its defaults (solver_order 2, bh2, predict_x0,
lower_order_final), one UNet call per step.

Each step first corrects the incoming sample with the new model output (UniC, from the second step on),
then predicts the next one (UniP). Both are linear in (x, x_last, x0, x0_prev, x0_prev2), so a step is
three fused linear combinations over tabled coefficients; orders (warm-up, final step) are in the table.
State: the last corrected sample and the two previous x0 predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._base import NoiseConfig, Schedule, Window, vp_from_sigma, x0_coefs
from .dpm_solver import log_snr, multistep_sigmas, vp_noise_levels


def _rhos_c(h: float, rk: float) -> tuple[float, float]:
    """Second-order UniC weights: solve [[1, 1], [rk, 1]] rho = b for B(h) = expm1(-h) (bh2)."""
    hh = -h
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    b1 = phi / b_h
    phi = phi / hh - 0.5
    b2 = phi * 2 / b_h
    r0, r1 = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
    return float(r0), float(r1)


class UniPCSchedule(Schedule):
    """Coefficients per step: x0 (x, model), corrector (x, last, x0_prev, x0_prev2, x0), predictor
    (corrected, x0, x0_prev)."""

    state_names = ("last", "x0_prev", "x0_prev2")

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        x0_x, x0_m, c_x, c_last, c_m1, c_m2, c_x0, p_xc, p_x0, p_m1 = self._row(self._coefs, step_index).unbind()
        last, m1, m2 = state["last"], state["x0_prev"], state["x0_prev2"]
        x0 = sample * x0_x + model_output.to(sample.dtype) * x0_m
        corrected = sample * c_x + last * c_last + m1 * c_m1 + m2 * c_m2 + x0 * c_x0
        out = corrected * p_xc + x0 * p_x0 + m1 * p_m1
        m2.copy_(m1)
        m1.copy_(x0)
        last.copy_(corrected)
        return out


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *,
         device: torch.device | str, dtype: torch.dtype) -> UniPCSchedule:
    cfg = NoiseConfig.parse(config)
    timesteps, sigmas = multistep_sigmas(cfg, num_inference_steps, karras=False)
    begin, count = window.select(timesteps, cfg.num_train_timesteps)
    n = len(timesteps)
    lam = [log_snr(float(s)) for s in sigmas]
    vp = [vp_from_sigma(float(s)) for s in sigmas]
    coefs = []
    prev_order = 0
    for k, g in enumerate(range(begin, begin + count)):
        x0_x, x0_m = x0_coefs(cfg.prediction_type, *vp[g])
        # UniC: correct x_g (predicted from x_last at g - 1) with this step's x0, at the previous step's order.
        corrector = (1.0, 0.0, 0.0, 0.0, 0.0)
        if k > 0:
            (alpha_t, sigma_t), sigma_s0, h = vp[g], vp[g - 1][1], lam[g] - lam[g - 1]
            b_h = math.expm1(-h)
            if prev_order == 1:
                rho_m2, rho_x0 = 0.0, 0.5
            else:
                rk = (lam[g - 2] - lam[g - 1]) / h
                rho0, rho_x0 = _rhos_c(h, rk)
                rho_m2 = rho0 / rk
            corrector = (0.0, sigma_t / sigma_s0, -alpha_t * b_h + alpha_t * b_h * (rho_m2 + rho_x0),
                         -alpha_t * b_h * rho_m2, -alpha_t * b_h * rho_x0)
        # UniP: order min(2, steps left in the full schedule, steps run so far + 1).
        order = min(2, n - g, k + 1)
        (alpha_t, sigma_t), sigma_s0, h = vp[g + 1], vp[g][1], lam[g + 1] - lam[g]
        h_phi_1 = b_h = math.expm1(-h)
        rho_m1 = 0.5 / ((lam[g - 1] - lam[g]) / h) if order == 2 else 0.0
        predictor = (sigma_t / sigma_s0, -alpha_t * h_phi_1 + alpha_t * b_h * rho_m1, -alpha_t * b_h * rho_m1)
        coefs.append((x0_x, x0_m, *corrector, *predictor))
        prev_order = order
    return UniPCSchedule(
        timesteps=timesteps[begin:begin + count], coefs=np.array(coefs), input_scale=None,
        noise_levels=vp_noise_levels(torch.from_numpy(sigmas[begin:begin + count])),
        init_noise_sigma=1.0, device=device, dtype=dtype,
    )
