"""AUTOMATIC1111 sampler and scheduler names -> this engine's scheduler names.

A1111 (1.9+) names a sampler (``Euler a``) and, separately, a noise schedule (``Karras``); older clients
send one combined name (``DPM++ 2M Karras``). Names match case-insensitively, with A1111's aliases
(``k_euler_a``). A name we do not implement is refused with the list, never swapped for another sampler.
The names are the sampler records' (`sdxl_trt.samplers`); A1111's schedules and how names match are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdxl_trt import samplers as registry
from sdxl_trt.errors import InvalidRequestError


@dataclass(frozen=True)
class A1111Sampler:
    """One A1111 sampler: ours with the default schedule, ours with Karras sigmas, and the eta it implies
    (derived from the records in `sdxl_trt.samplers`, whose ``A1111Names`` says what each field means)."""

    name: str
    aliases: tuple[str, ...]
    default: str
    karras: str | None
    eta: float | None
    automatic: str


def _a1111(record: registry.Sampler, names: registry.A1111Names) -> A1111Sampler:
    variant = registry.karras_variant(record)
    return A1111Sampler(names.name, names.aliases, record.name, variant.name if variant else None, names.eta,
                        names.automatic)


SAMPLERS: tuple[A1111Sampler, ...] = tuple(
    _a1111(r, a) for r, a in sorted(((r, r.a1111) for r in registry.SAMPLERS if r.a1111 is not None),
                                    key=lambda pair: pair[1].listed))
"""The A1111 samplers, in A1111's order."""

SCHEDULES: tuple[tuple[str, str], ...] = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
                                          ("sgm_uniform", "SGM Uniform"))
"""A1111 schedule (name, label) pairs we implement. Uniform and Automatic keep the model's own timestep spacing;
SGM Uniform is trailing spacing (the Lightning / Turbo recipe), except for samplers that select their own
timesteps (LCM, TCD)."""


def timestep_spacing(scheduler: str | None, ours: str) -> str | None:
    """The timestep spacing an A1111 schedule name asks of our sampler ``ours`` (None: the model's config)."""
    text = (scheduler or "").strip().lower()
    if text in ("sgm_uniform", "sgm uniform") and registry.sampler(ours).spacing:
        return "trailing"
    return None


def request_eta(ours: str, eta: float | None) -> float | None:
    """The eta an A1111 body passes on to our sampler ``ours``: the body's, where a request chooses it (TCD's
    gamma); None elsewhere (the eta A1111 implies there is `A1111Sampler.eta`, checked by the caller)."""
    record = registry.sampler(ours).eta
    return eta if record is not None and record.per_request else None


_COMBINED: dict[str, tuple[str, str]] = {
    text: (r.a1111.name, "karras") for r in registry.SAMPLERS if r.a1111 is not None for text in r.a1111.karras_names}
"""Pre-1.9 combined names (``DPM++ 2M Karras``) -> (A1111 sampler, schedule)."""


def available_samplers(ours: Sequence[str] = registry.SCHEDULERS) -> list[A1111Sampler]:
    """The A1111 samplers among our samplers ``ours`` (default: all of them)."""
    return [s for s in SAMPLERS if s.default in ours]


def resolve(sampler_name: str | None, scheduler: str | None, *, ours: Sequence[str] = registry.SCHEDULERS,
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
