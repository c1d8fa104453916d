"""One record per sampler: every sampler fact the project states, in one place.

A record says which diffusers scheduler the sampler is (class and the ``from_config`` kwargs that select it),
which per-request timestep controls its diffusers class takes (spacing, an explicit list, ``eta`` and its
values), whether its step draws fresh noise, and its AUTOMATIC1111 names and schedules. Everything else is
derived from the records: the runtime's name list and option checks, the factory map's import-time check
(runtime/schedulers), A1111's tables (serve/apis/samplers.py), the benchmark's diffusers baseline, the CLI's
choices and help, the tests' lists and the README's table (``markdown_table``, checked by a test).

Pure data on the ground floor: no torch, no diffusers, so the CLI parser, serve and bench read it without
importing the runtime. A new sampler is one record here plus its factory (and math) in runtime/schedulers;
an inconsistent record (a Karras default without a Karras variant, an alias A1111 would not match, ...)
fails at import with what to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
"""The timestep spacings a request may choose (diffusers' ``timestep_spacing``), for samplers with ``spacing``."""

DIFFUSERS_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "EulerDiscreteScheduler": {"use_karras_sigmas": False},
    "DPMSolverMultistepScheduler": {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++", "solver_order": 2},
    "UniPCMultistepScheduler": {"use_karras_sigmas": False, "solver_order": 2, "solver_type": "bh2"},
}
"""diffusers' constructor defaults for the settings the records' kwargs set: what a model's scheduler config
that leaves one out runs (`scheduler_for_config`). A class without ``use_karras_sigmas`` has no Karras sigmas."""


@dataclass(frozen=True)
class Eta:
    """The ``eta`` a sampler's diffusers step takes: the values provided here and the one a request without it
    runs (diffusers' SDXL pipelines pass ``eta=0.0``; TCD's gamma is recommended at 0.3)."""

    low: float
    high: float
    default: float

    @property
    def per_request(self) -> bool:
        """Whether a request chooses it (False: one value only, which the sampler always runs)."""
        return self.low < self.high

    def describe(self) -> str:
        return f"{self.low:g}" if not self.per_request else f"[{self.low:g}, {self.high:g}], default {self.default:g}"


@dataclass(frozen=True)
class A1111Names:
    """How AUTOMATIC1111 (1.9+) names a sampler, for its API (serve/apis/samplers.py).

    ``aliases``: A1111's own (lower case, as it matches them). ``karras_names``: older clients' combined names
    (``DPM++ 2M Karras``, lower case) that mean this sampler with the Karras schedule. ``automatic``: the
    schedule A1111's "Automatic" picks (``karras`` for DPM++ 2M since 1.9, else ``uniform``). ``eta``: the
    eta A1111's version reads, as ours runs it (ancestral and SDE: 1, DDIM: 0; None where it reads none or,
    for TCD, where the request's is used). ``listed``: its place in A1111's sampler list, which
    ``/sdapi/v1/samplers`` keeps (a client's menu reads as A1111's).
    """

    name: str
    listed: int
    aliases: tuple[str, ...] = ()
    karras_names: tuple[str, ...] = ()
    automatic: str = "uniform"
    eta: float | None = None


@dataclass(frozen=True)
class Sampler:
    """One sampler: what diffusers calls it, which timestep controls it takes, and its A1111 names.

    ``diffusers_kwargs`` override a model's scheduler config to select this algorithm (the config keeps the
    noise schedule). ``spacing``: takes ``timestep_spacing`` (False: it chooses its own timesteps, LCM-style).
    ``timesteps``: its diffusers class takes an explicit ``timesteps`` list. ``eta``: its step takes ``eta``.
    ``noise``: its step draws fresh noise (at its default eta). A Karras variant (``karras_variant``) is the
    same record with ``use_karras_sigmas=True``, no explicit timesteps and no A1111 names of its own.
    """

    name: str
    diffusers_class: str
    diffusers_kwargs: tuple[tuple[str, Any], ...] = ()
    spacing: bool = True
    timesteps: bool = False
    eta: Eta | None = None
    noise: bool = False
    a1111: A1111Names | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """``diffusers_kwargs`` as the dict ``from_config(config, **kwargs)`` takes."""
        return dict(self.diffusers_kwargs)

    @property
    def karras(self) -> bool:
        """Whether it runs Karras sigmas."""
        return bool(self.kwargs.get("use_karras_sigmas", False))


def _with_karras(base: Sampler) -> tuple[Sampler, Sampler]:
    """``base`` and its Karras-sigmas variant (diffusers refuses explicit timesteps with Karras sigmas)."""
    kwargs = tuple((k, v) for k, v in base.diffusers_kwargs if k != "use_karras_sigmas")
    variant = dataclasses.replace(base, name=base.name + "_karras", diffusers_kwargs=(*kwargs, ("use_karras_sigmas", True)),
                                  timesteps=False, a1111=None)
    return base, variant


_DPM = "DPMSolverMultistepScheduler"

SAMPLERS: tuple[Sampler, ...] = (
    *_with_karras(Sampler("euler", "EulerDiscreteScheduler", (("use_karras_sigmas", False),), timesteps=True,
                          a1111=A1111Names("Euler", 4, ("k_euler",)))),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", noise=True,
            a1111=A1111Names("Euler a", 3, ("k_euler_a", "k_euler_ancestral"), eta=1.0)),
    *_with_karras(Sampler("dpmpp_2m", _DPM, (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), timesteps=True,
                          a1111=A1111Names("DPM++ 2M", 0, ("k_dpmpp_2m",), ("dpm++ 2m karras", "k_dpmpp_2m_ka"),
                                           automatic="karras"))),
    *_with_karras(Sampler("dpmpp_2m_sde", _DPM, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
                          timesteps=True, noise=True,
                          a1111=A1111Names("DPM++ 2M SDE", 1, ("k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka"),
                                           ("dpm++ 2m sde karras",), eta=1.0))),
    *_with_karras(Sampler("dpmpp_3m_sde", _DPM, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)),
                          timesteps=True, noise=True,
                          a1111=A1111Names("DPM++ 3M SDE", 2, ("k_dpmpp_3m_sde",), ("dpm++ 3m sde karras",), eta=1.0))),
    Sampler("ddim", "DDIMScheduler", eta=Eta(0.0, 0.0, 0.0), a1111=A1111Names("DDIM", 5, ("ddim",), eta=0.0)),
    Sampler("unipc", "UniPCMultistepScheduler", (("solver_order", 2), ("solver_type", "bh2")),
            a1111=A1111Names("UniPC", 6, ("unipc",))),
    Sampler("lcm", "LCMScheduler", spacing=False, timesteps=True, noise=True,
            a1111=A1111Names("LCM", 7, ("lcm", "k_lcm"))),
    Sampler("tcd", "TCDScheduler", spacing=False, timesteps=True, eta=Eta(0.0, 1.0, 0.3), noise=True,
            a1111=A1111Names("TCD", 8, ("tcd",))),
)
"""Every sampler, in the order names are listed (errors, ``--help``, the README). Not provided: Heun, DPM2,
DPM2 ancestral, DPM++ 2S ancestral and DPM++ SDE (two UNet calls per step, so not one captured step), DDIM with
eta > 0."""

SCHEDULERS: tuple[str, ...] = tuple(s.name for s in SAMPLERS)
"""The sampler names a request may give (``GenerationRequest.scheduler``)."""

OWN_TIMESTEPS: tuple[str, ...] = tuple(s.name for s in SAMPLERS if not s.spacing)
"""Samplers that choose their own timesteps: ``timestep_spacing`` does not apply to them."""

CUSTOM_TIMESTEPS: tuple[str, ...] = tuple(s.name for s in SAMPLERS if s.timesteps)
"""Samplers that take an explicit ``timesteps`` list."""

ETA: tuple[str, ...] = tuple(s.name for s in SAMPLERS if s.eta is not None)
"""Samplers whose diffusers step takes ``eta``."""

_BY_NAME: dict[str, Sampler] = {s.name: s for s in SAMPLERS}


def sampler(name: str) -> Sampler:
    """The record of sampler ``name``; an unknown name is refused with the list."""
    record = _BY_NAME.get(name)
    if record is None:
        raise InvalidRequestError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}",
                                  param="scheduler")
    return record


def karras_variant(record: Sampler) -> Sampler | None:
    """The sampler that is ``record`` with Karras sigmas (``record`` itself if it has them), or None."""
    wanted = {**record.kwargs, "use_karras_sigmas": True}
    return next((s for s in SAMPLERS if s.diffusers_class == record.diffusers_class and s.kwargs == wanted), None)


def eta_range() -> tuple[float, float]:
    """The lowest and highest eta any sampler takes (a request's eta outside it is wrong for every sampler)."""
    etas = [s.eta for s in SAMPLERS if s.eta is not None]
    return min(e.low for e in etas), max(e.high for e in etas)


def _same(value: Any, wanted: Any) -> bool:
    return bool(value) == wanted if isinstance(wanted, bool) else value == wanted


def scheduler_for_config(config: Mapping[str, Any]) -> str | None:
    """The sampler equal to a diffusers scheduler config's own class and settings (an LCM-distilled model ships
    an LCMScheduler config, SDXL an EulerDiscreteScheduler one); None when no sampler here is that one.

    What a pipeline runs when a request does not name a sampler, as diffusers' pipeline would. A setting the
    config leaves out reads as diffusers' default (`DIFFUSERS_DEFAULTS`); Karras sigmas only match a record
    that asks for them."""
    cls = config.get("_class_name")
    defaults = {"use_karras_sigmas": False, **DIFFUSERS_DEFAULTS.get(str(cls), {})}
    for s in SAMPLERS:
        wanted = {"use_karras_sigmas": False, **s.kwargs}
        if s.diffusers_class == cls and all(_same(config.get(k, defaults[k]), v) for k, v in wanted.items()):
            return s.name
    return None


def markdown_table() -> str:
    """The README's sampler table (tests/test_sampler_registry.py keeps the README equal to it)."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "-"

    rows = ["| sampler | diffusers | A1111 | spacing | timesteps | eta | noise |", "|---|---|---|---|---|---|---|"]
    for s in SAMPLERS:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in s.diffusers_kwargs)
        a1111 = s.a1111.name if s.a1111 else ""
        base = next((b for b in SAMPLERS if b.a1111 and karras_variant(b) is s), None)
        if base is not None and base.a1111 is not None:
            a1111 = f"{base.a1111.name}, schedule Karras"
        rows.append(f"| `{s.name}` | `{s.diffusers_class}({kwargs})` | {a1111} | {yes(s.spacing)} | "
                    f"{yes(s.timesteps)} | {s.eta.describe() if s.eta else '-'} | {yes(s.noise)} |")
    return "\n".join(rows)


def check_registry(samplers: tuple[Sampler, ...]) -> None:
    """Refuse a registry whose records contradict each other, naming the record and the fix."""
    problems: list[str] = []
    names = [s.name for s in samplers]
    problems += [f"{n!r} is listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    a1111 = [(s, s.a1111) for s in samplers if s.a1111 is not None]
    spoken: dict[str, str] = {}
    for s, a in a1111:
        if a.automatic not in ("uniform", "karras"):
            problems.append(f"{s.name}: A1111 'Automatic' must be 'uniform' or 'karras', not {a.automatic!r}")
        if (a.automatic == "karras" or a.karras_names) and karras_variant(s) is None:
            problems.append(f"{s.name}: A1111 names a Karras schedule but no record is {s.name} with Karras sigmas")
        for text in (a.name.lower(), *a.aliases, *a.karras_names):
            if text != text.lower():
                problems.append(f"{s.name}: A1111 alias {text!r} must be lower case (names match case-insensitively)")
            if spoken.setdefault(text.lower(), s.name) != s.name:
                problems.append(f"A1111 name {text!r} means both {spoken[text.lower()]} and {s.name}")
    if len({a.listed for _, a in a1111}) != len(a1111):
        problems.append("two A1111 samplers share a place in A1111's list (A1111Names.listed)")
    for s in samplers:
        if s.eta is not None and not s.eta.low <= s.eta.default <= s.eta.high:
            problems.append(f"{s.name}: default eta {s.eta.default} outside [{s.eta.low}, {s.eta.high}]")
        unknown = [k for k in s.kwargs if k not in DIFFUSERS_DEFAULTS.get(s.diffusers_class, {})]
        if unknown:
            problems.append(f"{s.name}: add diffusers' defaults of {', '.join(unknown)} for {s.diffusers_class} "
                            "to DIFFUSERS_DEFAULTS")
    if problems:
        raise ValueError("sdxl_trt/samplers.py: " + "; ".join(problems))


check_registry(SAMPLERS)
