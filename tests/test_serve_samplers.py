"""A1111 sampler and schedule names -> ours: current and legacy names, aliases, refusals with the list.

The A1111 tables are derived from the sampler records (sdxl_trt/samplers.py); `A1111` below is what A1111's API
says of the samplers we provide (its /sdapi/v1/samplers names, aliases and order, the "Automatic" schedule of
1.9+, the eta its version reads), written out independently of the records, so a record edit that changes what
an A1111 client sees fails here."""

from __future__ import annotations

import pytest

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.samplers import SCHEDULERS
from sdxl_trt.serve.apis import samplers

# A1111 name: (aliases, ours with its default schedule, ours with Karras, eta, "Automatic"), in A1111's order.
A1111: dict[str, tuple[tuple[str, ...], str, str | None, float | None, str]] = {
    "DPM++ 2M": (("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras", None, "karras"),
    "DPM++ 2M SDE": (("k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka"), "dpmpp_2m_sde", "dpmpp_2m_sde_karras", 1.0, "uniform"),
    "DPM++ 3M SDE": (("k_dpmpp_3m_sde",), "dpmpp_3m_sde", "dpmpp_3m_sde_karras", 1.0, "uniform"),
    "Euler a": (("k_euler_a", "k_euler_ancestral"), "euler_a", None, 1.0, "uniform"),
    "Euler": (("k_euler",), "euler", "euler_karras", None, "uniform"),
    "DDIM": (("ddim",), "ddim", None, 0.0, "uniform"),
    "UniPC": (("unipc",), "unipc", None, None, "uniform"),
    "LCM": (("lcm", "k_lcm"), "lcm", None, None, "uniform"),
    "TCD": (("tcd",), "tcd", None, None, "uniform"),
}
# Pre-1.9 clients' combined names -> ours.
COMBINED = {"DPM++ 2M Karras": "dpmpp_2m_karras", "k_dpmpp_2m_ka": "dpmpp_2m_karras",
            "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras", "DPM++ 3M SDE Karras": "dpmpp_3m_sde_karras"}


def test_the_derived_a1111_table_is_a1111s() -> None:
    assert {s.name: (s.aliases, s.default, s.karras, s.eta, s.automatic) for s in samplers.SAMPLERS} == A1111
    assert [s.name for s in samplers.available_samplers()] == list(A1111)  # A1111's order, all implemented


@pytest.mark.parametrize("name", [n for n, (aliases, *_) in A1111.items() for n in (n, n.upper(), *aliases)])
def test_every_a1111_name_and_alias_resolves(name: str) -> None:
    entry = next(v for n, v in A1111.items() if name.lower() in (n.lower(), *v[0]))
    _, default, karras, _, automatic = entry
    assert samplers.resolve(name, "Uniform")[0] == default
    assert samplers.resolve(name, "Automatic")[0] == (karras if automatic == "karras" else default)
    if karras is not None:
        assert samplers.resolve(name, "Karras")[0] == karras


@pytest.mark.parametrize(("name", "ours"), list(COMBINED.items()))
def test_combined_names_mean_karras_unless_a_schedule_is_given(name: str, ours: str) -> None:
    assert samplers.resolve(name, None)[0] == ours
    assert samplers.resolve(name, "Uniform")[0] == ours.removesuffix("_karras")


@pytest.mark.parametrize(("schedule", "spacing"), [("sgm_uniform", "trailing"), ("SGM Uniform", "trailing"),
                                                   ("Uniform", None), (None, None)])
def test_sgm_uniform_is_trailing_spacing_except_for_samplers_with_their_own_timesteps(schedule, spacing) -> None:
    assert samplers.timestep_spacing(schedule, "euler") == spacing
    assert samplers.timestep_spacing(schedule, "lcm") is None


@pytest.mark.parametrize(("sampler", "schedule", "ours"), [
    (None, None, "euler_a"),  # A1111's default sampler
    ("Euler a", "automatic", "euler_a"),  # webuiapi sends the schedule in lower case
    ("k_euler_a", "Automatic", "euler_a"),
    ("Euler", "Karras", "euler_karras"),
    ("Euler", "Uniform", "euler"),
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),  # A1111 1.9+: DPM++ 2M defaults to Karras
    ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # the pre-1.9 combined name
    ("dpm++ 2m sde karras", None, "dpmpp_2m_sde_karras"),
    ("DDIM", None, "ddim"),
    ("UniPC", "Automatic", "unipc"),
])
def test_names_map_to_ours(sampler, schedule, ours) -> None:
    assert samplers.resolve(sampler, schedule, ours=SCHEDULERS)[0] == ours


@pytest.mark.parametrize(("sampler", "schedule", "param", "lists"), [
    ("Heun", None, "sampler_name", "Euler a"),
    ("Euler", "Exponential", "scheduler", "Karras"),
    ("Euler a", "Karras", "scheduler", "DPM++ 2M"),
])
def test_unknown_names_are_refused_with_the_list(sampler, schedule, param, lists) -> None:
    with pytest.raises(InvalidRequestError) as e:
        samplers.resolve(sampler, schedule, ours=SCHEDULERS)
    assert e.value.param == param and lists in str(e.value)


def test_only_implemented_samplers_are_listed() -> None:
    listed = samplers.available_samplers(("euler", "ddim"))
    assert [s.name for s in listed] == ["Euler", "DDIM"]


def test_only_a_per_request_eta_is_passed_on() -> None:
    """TCD's gamma is the body's; elsewhere A1111's eta is implied by the sampler (checked against
    A1111Sampler.eta), never passed to a sampler that would refuse it."""
    assert samplers.request_eta("tcd", 0.5) == 0.5
    assert samplers.request_eta("tcd", None) is None
    assert samplers.request_eta("ddim", 0.0) is None and samplers.request_eta("euler_a", 1.0) is None
