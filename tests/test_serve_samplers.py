"""A1111 sampler and schedule names -> ours: current and legacy names, aliases, refusals with the list."""

from __future__ import annotations

import pytest

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.runtime.schedulers import SCHEDULERS
from sdxl_trt.serve.apis import samplers


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
