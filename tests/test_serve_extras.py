"""LoRAs and few-step controls through a real ``sdxl-trt serve --lora-dir`` subprocess, over both HTTP APIs.

Each image must equal, bit for bit, what ``Pipeline.generate`` gives for the same request in-process (the
runtime's own tests compare those against diffusers): the OpenAI ``loras``/``timestep_spacing``/``timesteps``/
``eta`` fields and A1111's ``<lora:NAME:WEIGHT>`` tags, ``LCM``/``TCD`` samplers and ``SGM Uniform`` schedule
must reach the request unchanged. Bad LoRA input is a 400 naming it, and the next request is fine.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from support.serve_server import ServerProcess, auth, decode_png, metric, served
from test_lora_build import lora_files  # noqa: F401 - the module fixture lora_dir reads

from sdxl_trt.request import GenerationRequest

STEPS = 4


@pytest.fixture(scope="module")
def lora_dir(request) -> Path:
    (style, _), (detail, _) = request.getfixturevalue("lora_files")
    return style.parent


@pytest.fixture(scope="module")
def server(tiny_engines: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from served(tiny_engines, tmp_path_factory.mktemp("serve-extras") / "server.log",
                      "--lora-dir", str(lora_dir), "--warmup", "none", "--batch-window-ms", "0")


@pytest.fixture(scope="module")
def direct(tiny_engines: Path, lora_dir: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_engines, device="cpu", lora_dirs=[lora_dir])

    def generate(**kw) -> np.ndarray:
        return np.asarray(pipe.generate(GenerationRequest(width=256, height=256, seed=5, **kw)).images[0])

    return generate


def _openai(server: ServerProcess, **fields) -> httpx.Response:
    body = {"prompt": "a harbour at dawn", "size": "256x256", "seed": 5, "steps": STEPS, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(), timeout=300)


def _a1111(server: ServerProcess, **fields) -> httpx.Response:
    body = {"prompt": "a harbour at dawn", "width": 256, "height": 256, "seed": 5, "steps": STEPS, "cfg_scale": 5,
            "sampler_name": "Euler", **fields}
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=auth(), timeout=300)


def test_openai_loras_equal_the_pipeline(server, direct):
    r = _openai(server, loras=[{"name": "style", "scale": 0.8}, {"name": "detail", "scale": -0.6}])
    assert r.status_code == 200, r.text
    expected = direct(prompt="a harbour at dawn", steps=STEPS, loras=(("style", 0.8), ("detail", -0.6)))
    assert np.array_equal(decode_png(r.json()["data"][0]["b64_json"]), expected)
    plain = _openai(server)
    assert not np.array_equal(decode_png(plain.json()["data"][0]["b64_json"]), expected)  # LoRAs did something
    text = httpx.get(f"{server.url}/metrics", headers=auth(), timeout=30).text
    assert metric(text, "sdxl_trt_lora_switch_seconds_count") >= 2  # to the set, and back to base


def test_switching_through_the_server_gives_each_sets_images(server, direct):
    """base -> A -> B -> A -> base over HTTP: each image is its set's (the runtime tests prove these equal fresh
    loads bit for bit), so nothing of an earlier set is left in the weights."""
    sets = {"base": [], "A": [{"name": "style", "scale": 0.8}],
            "B": [{"name": "detail", "scale": -0.6}, {"name": "style", "scale": 0.3}]}
    expected = {k: direct(prompt="a harbour at dawn", steps=STEPS, loras=tuple((x["name"], x["scale"]) for x in v))
                for k, v in sets.items()}
    for name in ("base", "A", "B", "A", "base"):
        r = _openai(server, loras=sets[name]) if sets[name] else _openai(server)
        assert r.status_code == 200, r.text
        assert np.array_equal(decode_png(r.json()["data"][0]["b64_json"]), expected[name]), name


def test_a1111_lora_tags_equal_the_pipeline_and_are_listed(server, direct):
    loras = httpx.get(f"{server.url}/sdapi/v1/loras", headers=auth(), timeout=30).json()
    assert sorted(x["name"] for x in loras) == ["detail", "style"] and all("/" not in x["path"] for x in loras)
    r = _a1111(server, prompt="a harbour <lora:style:0.8> at dawn<lora:detail:-0.6>")
    assert r.status_code == 200, r.text
    # A1111 takes the tags out of the text before encoding
    expected = direct(prompt="a harbour  at dawn", steps=STEPS, guidance_scale=5.0,
                      loras=(("style", 0.8), ("detail", -0.6)))
    assert np.array_equal(decode_png(r.json()["images"][0]), expected)


@pytest.mark.parametrize("fields", [
    {"loras": [{"name": "nope", "scale": 1}]},
    {"loras": [{"name": "../style", "scale": 1}]},
    {"loras": [{"name": "/etc/passwd", "scale": 1}]},
    {"loras": [{"name": "style", "scale": 11}]},
])
def test_bad_openai_loras_are_400_and_the_next_request_is_fine(server, fields):
    r = _openai(server, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("loras")
    if fields["loras"][0]["name"] == "nope":
        assert "available: detail, style" in r.json()["error"]["message"]
    assert _openai(server, loras=[{"name": "style", "scale": 0.5}]).status_code == 200


def test_bad_a1111_lora_tag_is_400(server):
    r = _a1111(server, prompt="a cat <lora:missing:1>")
    assert r.status_code == 400 and "missing" in r.text
    assert _a1111(server).status_code == 200


def test_few_step_fields_through_openai(server, direct):
    cases = [
        ({"scheduler": "lcm", "guidance_scale": 0, "timesteps": [999, 749, 499, 249]},
         dict(scheduler="lcm", guidance_scale=0.0, timesteps=(999, 749, 499, 249))),
        ({"scheduler": "euler", "guidance_scale": 0, "timestep_spacing": "trailing", "steps": 2},
         dict(scheduler="euler", guidance_scale=0.0, timestep_spacing="trailing", steps=2)),
        ({"scheduler": "tcd", "guidance_scale": 0, "eta": 0.3}, dict(scheduler="tcd", guidance_scale=0.0, eta=0.3)),
    ]
    for body, req in cases:
        r = _openai(server, **body)
        assert r.status_code == 200, (body, r.text)
        expected = direct(prompt="a harbour at dawn", **{"steps": STEPS, **req})
        assert np.array_equal(decode_png(r.json()["data"][0]["b64_json"]), expected), body
    r = _openai(server, timestep_spacing="sideways")
    assert r.status_code == 400 and _openai(server).status_code == 200


def test_few_step_names_through_a1111(server, direct):
    r = _a1111(server, sampler_name="LCM", cfg_scale=0)
    assert r.status_code == 200, r.text
    expected = direct(prompt="a harbour at dawn", steps=STEPS, scheduler="lcm", guidance_scale=0.0)
    assert np.array_equal(decode_png(r.json()["images"][0]), expected)
    r = _a1111(server, sampler_name="Euler", scheduler="SGM Uniform", cfg_scale=0, steps=2)
    assert r.status_code == 200, r.text
    expected = direct(prompt="a harbour at dawn", steps=2, scheduler="euler", guidance_scale=0.0,
                      timestep_spacing="trailing")
    assert np.array_equal(decode_png(r.json()["images"][0]), expected)
    r = _a1111(server, sampler_name="TCD", cfg_scale=0, eta=0.5)
    assert r.status_code == 200, r.text
    expected = direct(prompt="a harbour at dawn", steps=STEPS, scheduler="tcd", guidance_scale=0.0, eta=0.5)
    assert np.array_equal(decode_png(r.json()["images"][0]), expected)
