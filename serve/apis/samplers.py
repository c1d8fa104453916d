"""AUTOMATIC1111 sampler and scheduler names -> this engine's scheduler names.

A1111 (1.9+) names a sampler (``Euler a``) and, separately, a noise schedule (``Karras``); older clients
send one combined name (``DPM++ 2M Karras``). Names match case-insensitively, with A1111's aliases
(``k_euler_a``). A name we do not implement is refused with the list, never swapped for another sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdxl_trt.errors import InvalidRequestError


@dataclass(frozen=True)
class A1111Sampler:
    """One A1111 sampler: ours with the default schedule, ours with Karras sigmas, and the eta it implies.

    ``eta`` is the value our implementation uses for samplers whose A1111 version reads ``eta`` (ancestral
    and SDE samplers: 1, DDIM: 0); None where A1111 ignores ``eta``. ``automatic`` is the schedule A1111's
    "Automatic" picks for it (Karras for DPM++ 2M since A1111 1.9).
    """

    name: str
    aliases: tuple[str, ...]
    default: str
    karras: str | None
    eta: float | None
    automatic: str


SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras", None, "karras"),
    A1111Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka"), "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
                 1.0, "uniform"),
    A1111Sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "dpmpp_3m_sde", "dpmpp_3m_sde_karras", 1.0, "uniform"),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a", None, 1.0, "uniform"),
    A1111Sampler("Euler", ("k_euler",), "euler", "euler_karras", None, "uniform"),
    A1111Sampler("DDIM", ("ddim",), "ddim", None, 0.0, "uniform"),
    A1111Sampler("UniPC", ("unipc",), "unipc", None, None, "uniform"),
    A1111Sampler("LCM", ("lcm", "k_lcm"), "lcm", None, None, "uniform"),
    A1111Sampler("TCD", ("tcd",), "tcd", None, None, "uniform"),  # its eta (gamma) is the request's, default 0.3
)

SCHEDULES: tuple[tuple[str, str], ...] = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
                                          ("sgm_uniform", "SGM Uniform"))
"""A1111 schedule (name, label) pairs we implement. Uniform and Automatic keep the model's own timestep spacing;
SGM Uniform is trailing spacing (the Lightning / Turbo recipe), except for LCM and TCD, which select their own
timesteps."""

OWN_TIMESTEPS = ("lcm", "tcd")
"""Our samplers that pick their own timesteps and so take no spacing."""


def timestep_spacing(scheduler: str | None, ours: str) -> str | None:
    """The timestep spacing an A1111 schedule name asks of our sampler ``ours`` (None: the model's config)."""
    text = (scheduler or "").strip().lower()
    if text in ("sgm_uniform", "sgm uniform") and ours not in OWN_TIMESTEPS:
        return "trailing"
    return None

_COMBINED = {"dpm++ 2m karras": ("DPM++ 2M", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
             "dpm++ 2m sde karras": ("DPM++ 2M SDE", "karras"), "dpm++ 3m sde karras": ("DPM++ 3M SDE", "karras")}


def available_samplers(ours: Sequence[str]) -> list[A1111Sampler]:
    """The A1111 samplers whose implementation exists in this build (``ours``: SCHEDULERS)."""
    return [s for s in SAMPLERS if s.default in ours]


def resolve(sampler_name: str | None, scheduler: str | None, *, ours: Sequence[str],
            sampler_param: str = "sampler_name", scheduler_param: str = "scheduler") -> tuple[str, A1111Sampler]:
    """(our scheduler name, the A1111 sampler) for an A1111 sampler and schedule name; a clear 400 otherwise."""
    samplers = available_samplers(ours)
    wanted = (sampler_name or "Euler a").strip()
    schedule = (scheduler or "automatic").strip().lower()
    combined = _COMBINED.get(wanted.lower())
    if combined is not None:
        wanted = combined[0]
        if schedule == "automatic":
            schedule = combined[1]
    sampler = next((s for s in samplers if wanted.lower() in (s.name.lower(), *s.aliases)), None)
    if sampler is None:
        raise InvalidRequestError(
            f"unknown sampler {sampler_name!r}; choose one of {', '.join(s.name for s in samplers)}",
            param=sampler_param)
    by_name = {n: n for n, _ in SCHEDULES} | {label.lower(): n for n, label in SCHEDULES}
    if schedule not in by_name:
        raise InvalidRequestError(
            f"unknown scheduler {scheduler!r}; choose one of {', '.join(label for _, label in SCHEDULES)}",
            param=scheduler_param)
    schedule = by_name[schedule]
    if schedule == "sgm_uniform":  # a spacing of the sampler's own schedule (see timestep_spacing)
        schedule = "uniform"
    if schedule == "automatic":
        schedule = sampler.automatic
    if schedule == "karras":
        if sampler.karras is None or sampler.karras not in ours:
            raise InvalidRequestError(
                f"sampler {sampler.name!r} has no Karras schedule here; use scheduler 'Uniform', or one of "
                f"{', '.join(s.name for s in samplers if s.karras in ours)} with Karras", param=scheduler_param)
        return sampler.karras, sampler
    return sampler.default, sampler
