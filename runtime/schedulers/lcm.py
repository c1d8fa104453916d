"""LCM: diffusers' LCMScheduler (latent consistency models, LCM-LoRA, DMD2).

Its own timesteps: every k-th training step of an ``original_inference_steps``-step schedule (k =
num_train_timesteps // original_inference_steps: 999, 979, ..., 19 for 50), of which ``n`` are taken evenly
by index; or an explicit descending list (DMD2: 999, 749, 499, 249). Timestep spacing does not apply.

Each step: the consistency function's boundary-condition output denoised = c_out * x0 + c_skip * x (linear
in (x, model_output)), then re-noised to the next timestep with fresh noise:
x_next = sqrt(a_next) * denoised + sqrt(1 - a_next) * noise. The schedule's last step returns denoised and
draws nothing, as diffusers' does (a zero noise coefficient and a zero noise row here, not an ``if``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sdxl_trt.errors import InvalidRequestError, ModelLoadError

from ._base import NoiseConfig, NoisyLinearSchedule, Window, check_custom_timesteps, x0_coefs

# LCMScheduler's and TCDScheduler's constructor defaults where they differ from the shared ones.
CONSISTENCY_DEFAULTS: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                        "timestep_spacing": "leading"}


def origin_timesteps(config: Mapping[str, Any], cfg: NoiseConfig) -> tuple[int, np.ndarray]:
    """(original_inference_steps, the distillation schedule ascending), as LCM/TCD's set_timesteps."""
    original = int(config.get("original_inference_steps", 50))
    if not 1 <= original <= cfg.num_train_timesteps:
        raise ModelLoadError(f"scheduler config original_inference_steps={original} must be in "
                             f"1..{cfg.num_train_timesteps} (num_train_timesteps)")
    k = cfg.num_train_timesteps // original
    return original, np.asarray(list(range(1, original + 1))) * k - 1


def consistency_timesteps(config: Mapping[str, Any], cfg: NoiseConfig, n: int, custom: Sequence[int] | None,
                          *, sampler: str) -> np.ndarray:
    """The timesteps (int64) LCMScheduler/TCDScheduler.set_timesteps choose (strength 1, as SDXL pipelines
    call it), or the explicit ones; refuses what diffusers refuses."""
    if config.get("clip_sample", False):
        raise ModelLoadError(f"{sampler} with clip_sample=True is not supported (SDXL latents are not in [-1, 1]); "
                             "use a config with clip_sample=False, as SDXL's has")
    original, origin = origin_timesteps(config, cfg)
    if custom is not None:
        return check_custom_timesteps(custom, cfg.num_train_timesteps)
    if n > original:
        raise InvalidRequestError(f"{sampler} runs at most original_inference_steps={original} steps (a subset of "
                                  f"its distillation schedule), got {n}; lower the steps", param="steps")
    origin = origin[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[indices]


def ddpm_noise_levels(alphas_cumprod: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """[len, 2] (sqrt(a_t), sqrt(1 - a_t)) for add_noise, float32 as DDPM-style add_noise computes them."""
    a = alphas_cumprod[torch.from_numpy(np.asarray(timesteps, dtype=np.int64))]
    return torch.stack([a**0.5, (1 - a) ** 0.5], dim=1)


def eps_coefs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(a, b) with eps = a * x + b * model_output, for x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    return sigma, alpha  # v_prediction


class LCMSchedule(NoisyLinearSchedule):
    """Coefficients per step: (c_x, c_model, c_noise); x_next = c_x * x + c_model * model_output + c_noise * z."""


def make(config: Mapping[str, Any], num_inference_steps: int, window: Window, *, timesteps: Sequence[int] | None = None,
         device: torch.device | str, dtype: torch.dtype) -> LCMSchedule:
    cfg = NoiseConfig.parse(config, defaults=CONSISTENCY_DEFAULTS)
    full = consistency_timesteps(config, cfg, num_inference_steps, timesteps, sampler="lcm")
    n = len(full)
    begin, count = window.select(full, cfg.num_train_timesteps)
    alphas_cumprod = cfg.alphas_cumprod(clamp_terminal=False)
    scaling = float(config.get("timestep_scaling", 10.0))
    coefs, draws = [], []
    for g in range(begin, begin + count):
        t = int(full[g])
        a_t = float(alphas_cumprod[t])
        x0_x, x0_m = x0_coefs(cfg.prediction_type, math.sqrt(a_t), math.sqrt(1 - a_t))
        scaled = t * scaling
        c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data 0.5
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        d_x, d_m = c_out * x0_x + c_skip, c_out * x0_m  # denoised = d_x * x + d_m * model_output
        last = g == n - 1
        a_prev = float(alphas_cumprod[int(full[g + 1])]) if not last else a_t
        s_prev, n_prev = (1.0, 0.0) if last else (math.sqrt(a_prev), math.sqrt(1 - a_prev))
        coefs.append((d_x * s_prev, d_m * s_prev, n_prev))
        draws.append(not last)
    run = full[begin:begin + count]
    schedule = LCMSchedule(timesteps=run, coefs=np.array(coefs), input_scale=None, init_noise_sigma=1.0,
                           noise_levels=ddpm_noise_levels(alphas_cumprod, run), device=device, dtype=dtype)
    schedule._draws = tuple(draws)
    return schedule
