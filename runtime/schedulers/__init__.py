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

The sampler name fixes the algorithm: its record in `sdxl_trt.samplers` (the diffusers class and kwargs,
the timestep controls it takes, its eta) is the one statement of what each name is; this package holds the
math and the name -> factory map, checked against the records at import (`check_factories`). The config gives
the noise schedule: betas (linear, scaled_linear), timestep spacing (leading, linspace, trailing),
steps_offset, prediction type (epsilon, v_prediction), rescale_betas_zero_snr. Config keys that choose an
algorithm (``use_karras_sigmas``, ``algorithm_type``, ``solver_order``, ``solver_type``, ...) are therefore
ignored, and config values whose math is not implemented (thresholding, DDIM clip_sample, trained_betas,
squaredcos_cap_v2, exponential/beta/flow sigmas, ...) are refused with `ModelLoadError`.

Numerics: timesteps and sigmas are built with diffusers' own numpy/float32 arithmetic (bit-identical);
each step's coefficients are computed in float64 from them and rounded once, so a float32 step is at
least as accurate as diffusers' operation-by-operation float32 (tests/test_schedulers.py: within 2e-5 of
the sample's scale of diffusers over whole loops, typically 5e-7).

Per-request options (what few-step recipes set), each where the record says diffusers' class takes it,
refused elsewhere with what would work (`_options`): ``timestep_spacing`` (records with ``spacing``),
``timesteps``, an explicit descending list (records with ``timesteps``), ``eta`` within the record's values
(TCD's gamma; DDIM's 0 only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sdxl_trt import samplers
from sdxl_trt.errors import InvalidRequestError

from . import ddim, dpm_solver, euler, euler_ancestral, lcm, tcd, unipc
from ._base import Schedule, Window

__all__ = ["Schedule", "check_factories", "make_schedule"]

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
"""Each sampler's table maker (its record in `sdxl_trt.samplers` says what it must equal)."""


def check_factories(names: Sequence[str], factories: Mapping[str, object]) -> None:
    """Refuse a sampler record without a factory here, or a factory without a record (run at import)."""
    missing = [n for n in names if n not in factories]
    unknown = [n for n in factories if n not in names]
    if missing or unknown:
        raise RuntimeError(
            "the sampler registry (sdxl_trt/samplers.py) and the factories (runtime/schedulers/__init__.py) "
            "disagree:" + (f" no factory for {', '.join(missing)} (add one to _FACTORIES);" if missing else "")
            + (f" no record for {', '.join(unknown)} (add one to SAMPLERS);" if unknown else ""))


check_factories(samplers.SCHEDULERS, _FACTORIES)


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
    eta: where the sampler's record takes it (TCD's gamma, DDIM's 0); None: the record's default.
    dtype: of the coefficient tables (keep float32: diffusers steps in float32 even for fp16 UNets);
        timesteps are always float32.
    """
    record = samplers.sampler(name)  # an unknown name is refused with the list
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
    options = _options(record, num_inference_steps, timestep_spacing=timestep_spacing, timesteps=timesteps, eta=eta)
    if timestep_spacing is not None:
        config = {**config, "timestep_spacing": timestep_spacing}
    return _FACTORIES[name](config, num_inference_steps, window, device=device, dtype=dtype, **options)


def _options(record: samplers.Sampler, steps: int, *, timestep_spacing: str | None,
             timesteps: Sequence[int] | None, eta: float | None) -> dict[str, Any]:
    """The per-request options ``record``'s factory takes; refuses those its diffusers class does not take."""
    name = record.name
    options: dict[str, Any] = {}
    if timestep_spacing is not None:
        if timestep_spacing not in samplers.SPACINGS:
            raise InvalidRequestError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of: "
                                      f"{', '.join(samplers.SPACINGS)}", param="timestep_spacing")
        if not record.spacing:
            raise InvalidRequestError(f"scheduler {name!r} chooses its own timesteps, so timestep_spacing does not "
                                      "apply; leave it unset (or give explicit timesteps)", param="timestep_spacing")
    if timesteps is not None:
        if not record.timesteps:
            raise InvalidRequestError(f"scheduler {name!r} does not take explicit timesteps (diffusers' class does "
                                      f"not); use one of: {', '.join(samplers.CUSTOM_TIMESTEPS)}", param="timesteps")
        if timestep_spacing is not None:
            raise InvalidRequestError("give timesteps or timestep_spacing, not both (explicit timesteps replace the "
                                      "spacing)", param="timestep_spacing")
        if len(timesteps) != steps:
            raise InvalidRequestError(f"{len(timesteps)} timesteps for {steps} steps; steps must equal the number "
                                      "of timesteps", param="timesteps")
        options["timesteps"] = tuple(timesteps)
    if eta is not None:
        low, high = samplers.eta_range()
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not low <= eta <= high:
            raise InvalidRequestError(f"eta must be a number in [{low:g}, {high:g}], got {eta!r}", param="eta")
        if record.eta is None:
            raise InvalidRequestError(f"scheduler {name!r} does not take eta (diffusers' step ignores it); "
                                      f"eta applies to: {', '.join(samplers.ETA)}", param="eta")
        if not record.eta.low <= eta <= record.eta.high:
            others = [s.name for s in samplers.SAMPLERS if s.eta is not None and s.eta.low <= eta <= s.eta.high]
            allowed = (f"eta {record.eta.low:g} only" if not record.eta.per_request
                       else f"eta in [{record.eta.low:g}, {record.eta.high:g}]")
            raise InvalidRequestError(f"{name} runs with {allowed} here, got {eta:g}; eta {eta:g} is taken by: "
                                      f"{', '.join(others)}", param="eta")
    if record.eta is not None and record.eta.per_request:
        options["eta"] = float(record.eta.default if eta is None else eta)
    return options
