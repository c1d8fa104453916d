"""The sampler registry (sdxl_trt/samplers.py) is the one statement of each sampler fact: its factories, the
README's table, the CLI's choices and the registry's own consistency rules follow it, and an edit that breaks
one of them fails loudly. (Its agreement with diffusers: tests/test_schedulers.py; with A1111's names:
tests/test_serve_samplers.py.)"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdxl_trt import samplers
from sdxl_trt.cli.run import add_run_arguments
from sdxl_trt.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_registry() -> None:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- sampler table: [^\n]*-->\n(.*?)\n<!-- end of sampler table -->", text, re.S)
    assert found, "README.md has no sampler table between its markers"
    assert found.group(1) == samplers.markdown_table(), (
        "README.md's sampler table differs from the registry; paste the output of\n  python -c 'from "
        "sdxl_trt.samplers import markdown_table; print(markdown_table())'")


def test_the_table_says_each_records_facts() -> None:
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
            for line in samplers.markdown_table().splitlines()[2:]}
    assert list(rows) == list(samplers.SCHEDULERS)
    for s in samplers.SAMPLERS:
        _, diffusers, a1111, spacing, timesteps, eta, noise = rows[s.name]
        assert diffusers.startswith(f"`{s.diffusers_class}(") and all(k in diffusers for k in s.kwargs)
        assert (spacing, timesteps, noise) == tuple("yes" if f else "-" for f in (s.spacing, s.timesteps, s.noise))
        assert (eta == "-") == (s.eta is None)
        assert (a1111 == "") == (s.a1111 is None and not s.karras)
    assert "[0, 1], default 0.3" in rows["tcd"][5] and rows["dpmpp_2m_karras"][2] == "DPM++ 2M, schedule Karras"


def test_cli_choices_and_help_follow_the_registry() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    base = ["--engines", "e", "--prompt", "p", "--out", "o.png"]
    for spacing in samplers.SPACINGS:
        assert parser.parse_args([*base, "--timestep-spacing", spacing]).timestep_spacing == spacing
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--timestep-spacing", "uniform"])
    text = " ".join(parser.format_help().split())
    assert all(name in text for name in samplers.SCHEDULERS)
    assert ", ".join(samplers.CUSTOM_TIMESTEPS) in text and "tcd: [0, 1], default 0.3" in text


def test_a_record_without_a_factory_or_a_factory_without_a_record_is_refused() -> None:
    from sdxl_trt.runtime.schedulers import _FACTORIES, check_factories

    check_factories(samplers.SCHEDULERS, _FACTORIES)
    with pytest.raises(RuntimeError, match=r"no factory for heun \(add one to _FACTORIES\)"):
        check_factories((*samplers.SCHEDULERS, "heun"), _FACTORIES)
    with pytest.raises(RuntimeError, match=r"no record for tcd \(add one to SAMPLERS\)"):
        check_factories(samplers.SCHEDULERS[:-1], _FACTORIES)


def test_importing_the_runtime_with_a_record_it_cannot_run_fails() -> None:
    """The check runs at import: a registry with one more record than the runtime has factories for stops the
    runtime from loading at all (never a sampler that is listed and then fails per request)."""
    code = textwrap.dedent("""
        from sdxl_trt import samplers
        samplers.SCHEDULERS = (*samplers.SCHEDULERS, "heun")
        import sdxl_trt.runtime.schedulers
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "no factory for heun" in done.stderr, done.stderr[-2000:]


def _euler(**changes: object) -> samplers.Sampler:
    return dataclasses.replace(samplers.sampler("euler"), name="probe", **changes)


@pytest.mark.parametrize(("record", "problem"), [
    (_euler(), "means both"),  # the probe keeps Euler's A1111 names
    (_euler(a1111=samplers.A1111Names("Probe", 99, ("Probe_Alias",))), "must be lower case"),
    (_euler(a1111=samplers.A1111Names("Probe", 4)), "share a place"),
    (_euler(diffusers_class="EulerAncestralDiscreteScheduler", diffusers_kwargs=(),
            a1111=samplers.A1111Names("Probe", 99, automatic="karras")), "no record is probe with Karras sigmas"),
    (_euler(a1111=samplers.A1111Names("Probe", 99, automatic="exponential")), "must be 'uniform' or 'karras'"),
    (_euler(a1111=None, eta=samplers.Eta(0.0, 1.0, 1.5)), "default eta 1.5 outside"),
    (_euler(a1111=None, diffusers_kwargs=(("final_sigmas_type", "zero"),)), "add diffusers' defaults of final_sigmas_type"),
    (dataclasses.replace(samplers.sampler("lcm"), a1111=None), "'lcm' is listed twice"),
])
def test_an_inconsistent_registry_is_refused(record: samplers.Sampler, problem: str) -> None:
    samplers.check_registry(samplers.SAMPLERS)
    with pytest.raises(ValueError, match=re.escape(problem)):
        samplers.check_registry((*samplers.SAMPLERS, record))


def test_karras_variants_and_lookups() -> None:
    assert samplers.karras_variant(samplers.sampler("dpmpp_2m")) == samplers.sampler("dpmpp_2m_karras")
    assert samplers.karras_variant(samplers.sampler("euler_a")) is None
    assert not samplers.sampler("euler_karras").timesteps and samplers.sampler("euler").timesteps
    with pytest.raises(InvalidRequestError, match="choose one of: euler, euler_karras") as info:
        samplers.sampler("heun")
    assert info.value.param == "scheduler"
