"""What every scheduler shares: the noise schedule of a diffusers config, the window of steps an SDXL
pipeline runs, and the `Schedule` base class whose per-step methods are tensor ops on device tables.

The table builders below repeat diffusers' own numpy/float32 arithmetic on purpose (same dtypes, same
operation order), so that timesteps and sigmas come out bit-identical to diffusers'. Only the per-step
update coefficients are computed differently: in float64 from those float32 sigmas, then rounded once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdxl_trt.errors import InvalidRequestError, ModelLoadError

# diffusers' constructor defaults for the keys read here (DDIMScheduler overrides timestep_spacing).
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# Config keys whose other values change the math in ways these tables do not implement. Refused, not ignored.
_ONLY: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None,),
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
}


@dataclass(frozen=True)
class NoiseConfig:
    """The part of a diffusers scheduler config that defines the training noise schedule and its spacing."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    rescale_betas_zero_snr: bool

    @classmethod
    def parse(cls, config: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None) -> NoiseConfig:
        """Read `config` with diffusers' defaults; refuse values whose math is not implemented here."""
        merged = {**_DEFAULTS, **(defaults or {}), **config}
        for key, allowed in _ONLY.items():
            if key in merged and merged[key] not in allowed:
                raise ModelLoadError(
                    f"scheduler config {key}={merged[key]!r} is not supported by sdxl_trt's schedulers "
                    f"(supported: {', '.join(repr(a) for a in allowed)}); use a config with one of those values"
                )
        return cls(**{k: merged[k] for k in _DEFAULTS})

    def alphas_cumprod(self, *, clamp_terminal: bool = True) -> torch.Tensor:
        """float32, exactly as diffusers computes it (torch.linspace in float32, cumprod in float32).

        With rescale_betas_zero_snr the last value is 0; the sigma-based schedulers then set it to 2**-24
        (`clamp_terminal`), DDIM keeps 0.
        """
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        else:  # scaled_linear
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if self.rescale_betas_zero_snr and clamp_terminal:
            alphas_cumprod[-1] = 2**-24
        return alphas_cumprod


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1, in diffusers' float32 operation order."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    return 1 - torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Sigma of every training timestep (float32 numpy, ascending in t), as diffusers' set_timesteps has it."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def spaced_timesteps(cfg: NoiseConfig, n: int, *, style: str) -> np.ndarray:
    """The full inference timesteps before any window, per diffusers' family of scheduler classes.

    style "euler" (Euler, Euler ancestral: float32, linspace unrounded), "ddim" (int64) or "multistep"
    (DPM-Solver, UniPC: spaced over n + 1 points with the last dropped, int64).
    """
    t_max, offset, spacing = cfg.num_train_timesteps, cfg.steps_offset, cfg.timestep_spacing
    out_dtype = np.float32 if style == "euler" else np.int64
    if spacing == "trailing":
        return np.arange(t_max, 0, -t_max / n).round().astype(out_dtype) - 1
    if style == "multistep":
        if spacing == "linspace":
            return np.linspace(0, t_max - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        ratio = t_max // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    if spacing == "linspace":
        if style == "euler":
            return np.linspace(0, t_max - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, t_max - 1, n).round()[::-1].astype(np.int64)
    ratio = t_max // n
    return (np.arange(0, n) * ratio).round()[::-1].astype(out_dtype) + out_dtype(offset)


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    """An explicit schedule as int64, refused unless strictly descending integers in [0, num_train_timesteps)."""
    values = list(timesteps)
    if not values or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in values):
        raise InvalidRequestError(f"timesteps must be a non-empty list of integers, got {values!r}", param="timesteps")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise InvalidRequestError(f"timesteps must be strictly descending (e.g. 999,749,499,249), got {values}",
                                  param="timesteps")
    if values[0] >= num_train_timesteps or values[-1] < 0:
        raise InvalidRequestError(f"timesteps must lie in 0..{num_train_timesteps - 1}, got {values}",
                                  param="timesteps")
    return np.array(values, dtype=np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) rho-7 sigmas, float64, as diffusers' _convert_to_karras."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma (log-linear interpolation), as diffusers' _sigma_to_t."""
    out = []
    for sigma in sigmas:
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        out.append(((1 - w) * low_idx + w * high_idx).reshape(sigma.shape))
    return np.array(out)


def x0_coefs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(a, b) with x0 = a * x + b * model_output, for x = alpha * x0 + sigma * noise (variance preserving)."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    return alpha, -sigma  # v_prediction: v = alpha * noise - sigma * x0


def vp_from_sigma(sigma: float) -> tuple[float, float]:
    """(alpha, sigma) of the variance-preserving process at Karras sigma `sigma` (float64)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


@dataclass(frozen=True)
class Window:
    """Which steps of the full schedule a pipeline runs: img2img `strength`, the refiner's `denoising_start`,
    the base's `denoising_end` (diffusers' SDXL pipelines' get_timesteps and 'Apply denoising_end')."""

    strength: float = 1.0
    denoising_start: float | None = None
    denoising_end: float | None = None

    def select(self, timesteps: np.ndarray, num_train_timesteps: int) -> tuple[int, int]:
        """(first index into the full schedule, number of steps run)."""
        n = len(timesteps)
        if self.denoising_start is None:
            init_timestep = min(int(n * self.strength), n)
            begin = max(n - init_timestep, 0)
        else:
            # diffusers adds one step here for order-2 schedulers (Heun, DPM2); every scheduler here has order 1.
            cutoff = int(round(num_train_timesteps - self.denoising_start * num_train_timesteps))
            begin = n - int((timesteps < cutoff).sum())
        count = n - begin
        emptied_by = "strength" if self.denoising_start is None else "denoising_start"
        if count > 0 and self.denoising_end is not None:
            cutoff = int(round(num_train_timesteps - self.denoising_end * num_train_timesteps))
            count = int((timesteps[begin:] >= cutoff).sum())
            emptied_by = "denoising_end"
        if count < 1:
            raise InvalidRequestError(
                f"{n} steps with strength={self.strength}, denoising_start={self.denoising_start}, "
                f"denoising_end={self.denoising_end} leave no step to run; change {emptied_by} or raise the steps",
                param=emptied_by,
            )
        return begin, count


@dataclass(frozen=True)
class FixedTables:
    """Device buffers sized for ``max_steps`` that a captured step reads (see :meth:`Schedule.bind`).

    A CUDA graph records the addresses of the tables its step reads. Copying each request's tables into
    the same fixed buffers before the loop lets one captured step serve every step count, strength and
    refiner split of a scheduler; rows past a request's steps are never read by its loop.
    """

    timesteps: torch.Tensor  # [max_steps] float32
    coefs: torch.Tensor  # [max_steps, K] float32
    noise_levels: torch.Tensor  # [max_steps + 1, 2] float32
    input_scale: torch.Tensor  # [max_steps] float32

    @classmethod
    def allocate(cls, max_steps: int, width: int, device: torch.device | str) -> FixedTables:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        return cls(z(max_steps), z(max_steps, width), z(max_steps + 1, 2), z(max_steps))

    @property
    def max_steps(self) -> int:
        return self.timesteps.shape[0]


class Schedule:
    """A denoising schedule as device tables, read by a step index that lives on the device.

    Every per-step method is a fixed sequence of tensor ops, whatever the index, so one captured step
    replays for all steps. Subclasses set the coefficient table and implement `step` (and name their
    `state_names` when they carry history between steps).
    """

    #: the latent-shaped buffers `step` carries between steps (multistep history), in the order they are kept.
    state_names: tuple[str, ...] = ()
    #: whether `step` consumes random noise (ancestral and SDE samplers).
    needs_noise: bool = False
    #: dtype diffusers' step draws its noise in when fixed (DPM-Solver SDE: float32); None: the model output's.
    noise_dtype: torch.dtype | None = None

    def __init__(
        self,
        *,
        timesteps: np.ndarray,
        coefs: np.ndarray,
        noise_levels: torch.Tensor,
        input_scale: torch.Tensor | None,
        init_noise_sigma: float,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.num_steps: int = len(timesteps)
        self.timesteps: torch.Tensor = torch.tensor(np.asarray(timesteps, dtype=np.float32), device=device)
        self.init_noise_sigma: float = float(init_noise_sigma)
        coefs = np.asarray(coefs, dtype=np.float64)
        if not np.isfinite(coefs).all():
            raise ModelLoadError("the scheduler config gives a non-finite step coefficient (epsilon prediction "
                                 "with zero terminal SNR?); use v_prediction with rescale_betas_zero_snr")
        # [num_steps, K] step coefficients, computed in float64 and rounded once to `dtype`.
        self._coefs = torch.tensor(coefs, dtype=dtype, device=device)
        # [num_steps + 1, 2]: add_noise(x, n, i) = a_i * x + b_i * n; row num_steps is (1, 0), "no noise left".
        end = torch.tensor([[1.0, 0.0]], dtype=noise_levels.dtype)
        self._noise_levels = torch.cat([noise_levels, end]).to(device=device, dtype=dtype)
        self._input_scale = None if input_scale is None else input_scale.to(device=device, dtype=dtype)
        # Which steps diffusers' step() draws noise on (LCM and TCD skip the schedule's last step, TCD all
        # steps at eta 0): rows of the others are zeros, read with a zero coefficient.
        self._draws: tuple[bool, ...] = (True,) * self.num_steps
        assert self._coefs.shape[0] == self.num_steps and len(noise_levels) == self.num_steps

    @staticmethod
    def _row(table: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:
        """Row `step_index` of a device table: a gather on the device, no host sync."""
        if isinstance(step_index, int):
            return table[step_index]
        return table.index_select(0, step_index.reshape(1)).squeeze(0)

    @property
    def table_width(self) -> int:
        """K, the number of step coefficients per row (the width of :class:`FixedTables` it binds to)."""
        return int(self._coefs.shape[1])

    def bind(self, fixed: FixedTables) -> Schedule:
        """Copy this schedule's tables into ``fixed`` and return a view of it that reads them from there.

        Every per-step method of the returned schedule reads only ``fixed`` (same addresses for every
        request), so a step captured with one bound schedule replays correctly for another of the same
        sampler. The copies are device-side and asynchronous; nothing here synchronises.
        """
        n = self.num_steps
        if n > fixed.max_steps:
            raise InvalidRequestError(f"{n} steps exceed this pipeline's max_steps {fixed.max_steps}", param="steps")
        if fixed.coefs.shape[1] != self.table_width:
            raise ValueError(f"{type(self).__name__} has {self.table_width} coefficients per step, the fixed "
                             f"tables {fixed.coefs.shape[1]}: bind each sampler to its own tables")
        fixed.timesteps[:n].copy_(self.timesteps, non_blocking=True)
        fixed.coefs[:n].copy_(self._coefs, non_blocking=True)
        fixed.noise_levels[: n + 1].copy_(self._noise_levels, non_blocking=True)
        bound = copy.copy(self)
        bound.timesteps, bound._coefs, bound._noise_levels = fixed.timesteps, fixed.coefs, fixed.noise_levels
        if self._input_scale is not None:
            fixed.input_scale[:n].copy_(self._input_scale, non_blocking=True)
            bound._input_scale = fixed.input_scale
        return bound

    def make_state(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zeroed buffers of `state_names`, shaped like `sample` (none for single-step methods). Allocate once
        per (shape, request); each step overwrites them before they are read with a non-zero weight."""
        return {name: torch.zeros_like(sample) for name in self.state_names}

    def timestep(self, step_index: torch.Tensor | int) -> torch.Tensor:
        """The UNet's timestep at `step_index`: float32, shape [1]."""
        return self._row(self.timesteps, step_index).reshape(1)

    def scale_model_input(self, sample: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:
        """The UNet input at `step_index` (Euler-type samplers divide by sqrt(sigma^2 + 1))."""
        if self._input_scale is None:
            return sample
        return sample / self._row(self._input_scale, step_index)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:
        """`original` noised to the level of `timesteps[step_index]`, as the scheduler's add_noise.

        img2img/inpaint start: `add_noise(image_latents, noise, 0)` (inpainting at strength 1 instead starts
        from `noise * init_noise_sigma`, like txt2img). The inpaint loop re-noises the known region to the
        NEXT step's level after each step: `add_noise(image_latents, noise, step_index + 1)`; index num_steps
        (after the last step) returns `original` unchanged, as diffusers skips the re-noise there.
        """
        a, b = self._row(self._noise_levels, step_index).unbind()
        return original * a + noise * b

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        step_index: torch.Tensor | int,
        state: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sample after step `step_index` (x_t -> x_{t-1}); updates `state` in place.

        `noise`: for samplers with `needs_noise`, the table from `draw_step_noise` on the device
        ([num_steps, *sample.shape], row `step_index` is used) or this step's noise (sample.shape).
        """
        raise NotImplementedError

    def _step_noise(self, noise: torch.Tensor | None, sample: torch.Tensor, step_index: torch.Tensor | int) -> torch.Tensor:
        if noise is None:
            raise ValueError(f"{type(self).__name__}.step needs noise: pass draw_step_noise(...) moved to the device")
        return self._row(noise, step_index) if noise.dim() == sample.dim() + 1 else noise

    def draw_step_noise(
        self, shape: Sequence[int], generators: Sequence[torch.Generator], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Every step's noise, [num_steps, *shape], drawn as diffusers' step() draws it with
        `randn_tensor(shape, generator=generators)`: one generator per image (batch dim 0), or one generator
        for the whole batch, in `dtype` (the UNet output's; ignored where `noise_dtype` fixes it), on the
        generators' device.

        Call it after every draw diffusers makes before its loop (VAE-encode sampling, initial latents,
        inpaint noise), so the streams continue where diffusers' would. Samplers without noise draw nothing
        and return an empty [0, *shape] tensor.
        """
        shape = tuple(shape)
        if not self.needs_noise:
            return torch.empty((0, *shape), dtype=dtype)
        if len(generators) not in (1, shape[0]):
            raise InvalidRequestError(
                f"{len(generators)} generators for a batch of {shape[0]} images; pass one per image or one in all",
                param="generator",
            )
        dtype = self.noise_dtype or dtype
        rows = []
        for draws in self._draws:
            if not draws:
                rows.append(torch.zeros(shape, dtype=dtype, device=generators[0].device))
            elif len(generators) == 1:
                g = generators[0]
                rows.append(torch.randn(shape, generator=g, device=g.device, dtype=dtype))
            else:
                rows.append(torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                                       for g in generators]))
        return torch.stack(rows)


class NoisyLinearSchedule(Schedule):
    """A step linear in (sample, model output, fresh noise): ``x_next = c_x * x + c_model * eps + c_noise * z``,
    three tabled coefficients per step. Euler ancestral, LCM and TCD differ only in their tables."""

    needs_noise = True

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: torch.Tensor | int,
             state: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        c_x, c_model, c_noise = self._row(self._coefs, step_index).unbind()
        noise = self._step_noise(noise, sample, step_index)
        return sample * c_x + model_output.to(sample.dtype) * c_model + noise.to(sample.dtype) * c_noise
