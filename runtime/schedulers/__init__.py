"""SDXL schedulers as tensor math over precomputed device tables, numerically equal to diffusers'.

The runtime captures one guided denoising step (UNet + classifier-free guidance + scheduler update) in a
CUDA graph and replays it for every step. So, in this package:

- The step index lives on the device: a 0-d or 1-element int64 tensor, incremented in place by the caller
  (``idx += 1``). Per-step methods read their coefficients with ``index_select`` on it.
- No host sync in a per-step method: no ``.item()``, no ``bool()``/``int()`` of a tensor, no Python
  branching on the index or on tensor values. Branches on static facts (the sampler, the config) are fine.
- Everything that varies per step is tabled at ``make_schedule`` time, including a multistep method's
  first-order warm-up and final steps (a zero coefficient, not an ``if``).
- No persistent state is allocated per step: history lives in ``make_state``'s buffers, updated with
  ``copy_``. Step noise is pre-drawn for all steps (``draw_step_noise``) and indexed like the tables.
- One scheduler per file, small; shared table math in ``_base``. Nothing here imports diffusers.

A loop (``s = make_schedule(...)``; tables, state and noise on the device)::

    latents = noise * s.init_noise_sigma            # txt2img; img2img: s.add_noise(image_latents, noise, 0)
    step_noise = s.draw_step_noise(latents.shape, generators, unet_dtype).to(device)  # after initial draws
    state, idx = s.make_state(latents), torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(s.num_steps):                    # the body is what gets captured
        eps = guided_unet(s.scale_model_input(latents, idx), s.timestep(idx))
        latents = s.step(eps, latents, idx, state, step_noise)
        idx += 1

The sampler name fixes the algorithm (diffusers class and the kwargs below); the config gives the noise
schedule: betas (linear, scaled_linear), timestep spacing (leading, linspace, trailing), steps_offset,
prediction type (epsilon, v_prediction), rescale_betas_zero_snr. Config keys that choose an algorithm
(``use_karras_sigmas``, ``algorithm_type``, ``solver_order``, ``solver_type``, ...) are therefore ignored,
and config values whose math is not implemented (thresholding, DDIM clip_sample, trained_betas,
squaredcos_cap_v2, exponential/beta/flow sigmas, ...) are refused with `ModelLoadError`.

Numerics: timesteps and sigmas are built with diffusers' own numpy/float32 arithmetic (bit-identical);
each step's coefficients are computed in float64 from them and rounded once, so a float32 step is at
least as accurate as diffusers' operation-by-operation float32 (tests/test_schedulers.py: within 2e-5 of
the sample's scale of diffusers over whole loops, typically 5e-7).

| name | diffusers |
|---|---|
| euler | EulerDiscreteScheduler |
| euler_karras | EulerDiscreteScheduler(use_karras_sigmas=True) |
| euler_a | EulerAncestralDiscreteScheduler |
| dpmpp_2m | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) |
| dpmpp_2m_karras | the same with use_karras_sigmas=True |
| dpmpp_2m_sde | DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2) |
| dpmpp_2m_sde_karras | the same with use_karras_sigmas=True |
| dpmpp_3m_sde | DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3) |
| dpmpp_3m_sde_karras | the same with use_karras_sigmas=True |
| ddim | DDIMScheduler (eta 0) |
| unipc | UniPCMultistepScheduler (solver_order 2, bh2) |
| lcm | LCMScheduler (original_inference_steps from the config, default 50) |
| tcd | TCDScheduler, with ``eta`` (gamma, default 0.3) |

Per-request options (what few-step recipes set), each where diffusers' class takes it, refused elsewhere:

- ``timestep_spacing`` (leading, linspace, trailing) overrides the config's, for every sampler but lcm and
  tcd (which choose their own timesteps);
- ``timesteps``, an explicit descending list, for the classes whose ``set_timesteps`` takes ``timesteps``:
  euler, the non-Karras dpmpp_* samplers, lcm, tcd (`CUSTOM_TIMESTEPS`);
- ``eta`` for tcd (``ddim`` takes it too, at 0 only: DDIM with eta > 0 is not provided).

Not provided: Heun, DPM2, DPM2 ancestral, DPM++ 2S ancestral and DPM++ SDE (DPMSolverSDEScheduler): two
UNet calls per step, so not one captured step. DDIM with eta > 0 is not provided either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sdxl_trt.errors import InvalidRequestError

from . import ddim, dpm_solver, euler, euler_ancestral, lcm, tcd, unipc
from ._base import Schedule, Window

__all__ = ["CUSTOM_TIMESTEPS", "ETA", "OWN_TIMESTEPS", "SCHEDULERS", "SPACINGS", "Schedule", "make_schedule",
           "scheduler_for_config"]

_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "euler": functools.partial(euler.make, karras=False),
    "euler_karras": functools.partial(euler.make, karras=True),
    "euler_a": euler_ancestral.make,
    "dpmpp_2m": functools.partial(dpm_solver.make, karras=False, sde=False),
    "dpmpp_2m_karras": functools.partial(dpm_solver.make, karras=True, sde=False),
    "dpmpp_2m_sde": functools.partial(dpm_solver.make, karras=False, sde=True),
    "dpmpp_2m_sde_karras": functools.partial(dpm_solver.make, karras=True, sde=True),
    "dpmpp_3m_sde": functools.partial(dpm_solver.make, karras=False, sde=True, order=3),
    "dpmpp_3m_sde_karras": functools.partial(dpm_solver.make, karras=True, sde=True, order=3),
    "ddim": ddim.make,
    "unipc": unipc.make,
    "lcm": lcm.make,
    "tcd": tcd.make,
}

SCHEDULERS: tuple[str, ...] = tuple(_FACTORIES)
"""The scheduler names `make_schedule` accepts."""

SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
"""The timestep spacings a request may choose (diffusers' ``timestep_spacing``)."""

CUSTOM_TIMESTEPS: tuple[str, ...] = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "tcd")
"""Samplers that take an explicit ``timesteps`` list (diffusers' class takes ``timesteps``, without Karras sigmas)."""

OWN_TIMESTEPS: tuple[str, ...] = ("lcm", "tcd")
"""Samplers that choose their own timesteps: ``timestep_spacing`` does not apply to them."""

ETA: tuple[str, ...] = ("tcd", "ddim")
"""Samplers whose diffusers step takes ``eta`` (ddim at 0 only here)."""


def scheduler_for_config(config: Mapping[str, Any]) -> str | None:
    """The sampler name equal to a diffusers scheduler config's own class and settings (an LCM-distilled model
    ships an LCMScheduler config, SDXL an EulerDiscreteScheduler one); None when no sampler here is that one.

    What a pipeline runs when a request does not name a sampler, as diffusers' pipeline would."""
    cls = config.get("_class_name")
    karras = "_karras" if config.get("use_karras_sigmas") else ""
    if cls == "EulerDiscreteScheduler":
        return "euler" + karras
    if cls == "DPMSolverMultistepScheduler":
        algorithm, order = config.get("algorithm_type", "dpmsolver++"), int(config.get("solver_order", 2))
        name = {("dpmsolver++", 2): "dpmpp_2m", ("sde-dpmsolver++", 2): "dpmpp_2m_sde",
                ("sde-dpmsolver++", 3): "dpmpp_3m_sde"}.get((algorithm, order))
        return None if name is None else name + karras
    simple = {"EulerAncestralDiscreteScheduler": "euler_a", "DDIMScheduler": "ddim", "LCMScheduler": "lcm",
              "TCDScheduler": "tcd"}
    if cls in simple and not karras:
        return simple[cls]
    if cls == "UniPCMultistepScheduler" and not karras and int(config.get("solver_order", 2)) == 2 and \
            config.get("solver_type", "bh2") == "bh2":
        return "unipc"
    return None


def _check_fraction(value: float | None, param: str) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise InvalidRequestError(f"{param} must be between 0 and 1 (exclusive) but is {value}; "
                                  "leave it unset to run the whole schedule", param=param)


def make_schedule(
    name: str,
    num_inference_steps: int,
    *,
    config: Mapping[str, Any],
    strength: float = 1.0,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    timestep_spacing: str | None = None,
    timesteps: Sequence[int] | None = None,
    eta: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Schedule:
    """The tables for `num_inference_steps` steps of sampler `name`, with the timesteps diffusers' SDXL
    pipelines run.

    config: a diffusers scheduler config (e.g. `sdxl_trt.presets.SCHEDULER_CONFIG`).
    strength: img2img/inpaint strength; runs the last int(steps * strength) steps (1.0: all).
    denoising_start: the refiner half of an ensemble of experts: start where the base stopped (strength is
        then ignored, as in diffusers; the caller passes the base's latents without adding noise).
    denoising_end: the base half: stop before the timesteps below (1 - denoising_end) * num_train_timesteps.
    timestep_spacing: overrides the config's (None: the config's), where the sampler's class reads it.
    timesteps: an explicit descending schedule (then `num_inference_steps` must equal its length).
    eta: TCD's gamma (None: 0.3); DDIM's eta (0 only).
    dtype: of the coefficient tables (keep float32: diffusers steps in float32 even for fp16 UNets);
        timesteps are always float32.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise InvalidRequestError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}",
                                  param="scheduler")
    num_train = int(config.get("num_train_timesteps", 1000))
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_train:
        raise InvalidRequestError(f"num_inference_steps must be an integer from 1 to {num_train} but is "
                                  f"{num_inference_steps!r}", param="num_inference_steps")
    if not 0.0 <= strength <= 1.0:
        raise InvalidRequestError(f"strength must be in [0, 1] but is {strength}", param="strength")
    _check_fraction(denoising_start, "denoising_start")
    _check_fraction(denoising_end, "denoising_end")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidRequestError(f"denoising_start ({denoising_start}) must be below denoising_end "
                                  f"({denoising_end})", param="denoising_start")
    window = Window(strength=strength, denoising_start=denoising_start, denoising_end=denoising_end)
    options = _options(name, num_inference_steps, timestep_spacing=timestep_spacing, timesteps=timesteps, eta=eta)
    if timestep_spacing is not None:
        config = {**config, "timestep_spacing": timestep_spacing}
    return factory(config, num_inference_steps, window, device=device, dtype=dtype, **options)


def _options(name: str, steps: int, *, timestep_spacing: str | None, timesteps: Sequence[int] | None,
             eta: float | None) -> dict[str, Any]:
    """The per-request options `name`'s factory takes; refuses those its diffusers class does not take."""
    options: dict[str, Any] = {}
    if timestep_spacing is not None:
        if timestep_spacing not in SPACINGS:
            raise InvalidRequestError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of: "
                                      f"{', '.join(SPACINGS)}", param="timestep_spacing")
        if name in OWN_TIMESTEPS:
            raise InvalidRequestError(f"scheduler {name!r} chooses its own timesteps, so timestep_spacing does not "
                                      "apply; leave it unset (or give explicit timesteps)", param="timestep_spacing")
    if timesteps is not None:
        if name not in CUSTOM_TIMESTEPS:
            raise InvalidRequestError(f"scheduler {name!r} does not take explicit timesteps (diffusers' class does "
                                      f"not); use one of: {', '.join(CUSTOM_TIMESTEPS)}", param="timesteps")
        if timestep_spacing is not None:
            raise InvalidRequestError("give timesteps or timestep_spacing, not both (explicit timesteps replace the "
                                      "spacing)", param="timestep_spacing")
        if len(timesteps) != steps:
            raise InvalidRequestError(f"{len(timesteps)} timesteps for {steps} steps; steps must equal the number "
                                      "of timesteps", param="timesteps")
        options["timesteps"] = tuple(timesteps)
    if eta is not None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise InvalidRequestError(f"eta must be a number in [0, 1], got {eta!r}", param="eta")
        if name not in ETA:
            raise InvalidRequestError(f"scheduler {name!r} does not take eta (diffusers' step ignores it); "
                                      f"eta applies to: {', '.join(ETA)}", param="eta")
        if name == "ddim" and eta != 0.0:
            raise InvalidRequestError(f"ddim runs with eta 0 only (DDIM with eta > 0 is not provided), got {eta}; "
                                      "use tcd for a stochastic consistency sampler", param="eta")
        if name == "tcd":
            options["eta"] = float(eta)
    return options
