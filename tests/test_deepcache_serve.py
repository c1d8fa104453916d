"""Step caching through the entry points: ``sdxl-trt run --cache-interval/--cache-branch``, the OpenAI and the
AUTOMATIC1111 APIs of a real ``sdxl-trt serve`` (images equal DeepCache's ``DeepCacheSDHelper`` on diffusers, within
the bound test_deepcache explains), refusals (exit 2 / 400 naming the value, the built branches and the rebuild
command; the next request is fine) and ``/metrics``' count of cached steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.deepcache_reference import assert_close, diffusers_pipelines, run_deepcache
from support.serve_server import ServerProcess, auth, decode_png, metric, png_b64, served

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def reference(tiny_models):
    return diffusers_pipelines(tiny_models[0])


@pytest.fixture(scope="module")
def server(tiny_deepcache_engines: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from served(tiny_deepcache_engines, tmp_path_factory.mktemp("serve") / "server.log", "--max-steps", "10",
                      clean_exit=True)


def _post(srv: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=auth(), timeout=TIMEOUT)


def _cli(engines: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_trt.cli", "-q", "run", "--engines", str(engines), "--prompt",
                           "a red fox", "--width", "256", "--height", "256", "--steps", "4", "--seed", "5",
                           "--device", "cpu", "--out", str(out), *args], timeout=300, capture_output=True, text=True)


def test_cli_run_equals_helper_and_refuses_with_exit_2(tiny_deepcache_engines, reference, tmp_path) -> None:
    out = tmp_path / "fox.png"
    proc = _cli(tiny_deepcache_engines, out, "--cache-interval", "3", "--cache-branch", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = run_deepcache(reference["txt2img"], interval=3, branch=1, seed=5, prompt="a red fox", width=256,
                           height=256, num_inference_steps=4, guidance_scale=5.0)
    with Image.open(out) as im:
        assert_close([im], theirs)
    bad = _cli(tiny_deepcache_engines, tmp_path / "bad.png", "--cache-interval", "2", "--cache-branch", "4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cache_branch 4" in bad.stderr and "0, 1, 3" in bad.stderr and "--deepcache 0,1,3,4" in bad.stderr


def test_openai_and_a1111_equal_helper(server, reference) -> None:
    r = _post(server, "/v1/images/generations", {"prompt": "a lighthouse", "negative_prompt": "fog", "size": "256x256",
                                                 "steps": 4, "seed": 21, "guidance_scale": 6.0, "cache_interval": 2,
                                                 "cache_branch": 0})
    assert r.status_code == 200, r.text
    theirs = run_deepcache(reference["txt2img"], interval=2, branch=0, seed=21, prompt="a lighthouse",
                           negative_prompt="fog", width=256, height=256, num_inference_steps=4, guidance_scale=6.0)
    assert_close([decode_png(r.json()["data"][0]["b64_json"])], theirs)

    r = _post(server, "/sdapi/v1/txt2img", {"prompt": "a red barn", "sampler_name": "Euler", "steps": 5,
                                            "cfg_scale": 4.5, "width": 256, "height": 256, "seed": 5, "batch_size": 2,
                                            "cache_interval": 3, "cache_branch": 3})
    assert r.status_code == 200, r.text
    theirs = run_deepcache(reference["txt2img"], interval=3, branch=3, seed=5, n=2, prompt="a red barn", width=256,
                           height=256, num_inference_steps=5, guidance_scale=4.5)
    assert_close([decode_png(b) for b in r.json()["images"]], theirs)

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    r = _post(server, "/sdapi/v1/img2img", {"prompt": "a watercolor", "init_images": [png_b64(image)],
                                            "denoising_strength": 0.7, "sampler_name": "Euler", "steps": 6,
                                            "cfg_scale": 5.0, "width": 256, "height": 256, "seed": 9,
                                            "cache_interval": 2, "cache_branch": 0})
    assert r.status_code == 200, r.text
    theirs = run_deepcache(reference["img2img"], interval=2, branch=0, seed=9, prompt="a watercolor", image=image,
                           strength=0.7, num_inference_steps=6, guidance_scale=5.0)
    assert_close([decode_png(r.json()["images"][0])], theirs)


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/v1/images/generations", {"cache_interval": 2, "cache_branch": 2}, ["cache_branch 2", "0, 1, 3", "--deepcache"]),
    ("/v1/images/generations", {"cache_interval": 9}, ["cache_interval", "1..4", "9"]),
    ("/sdapi/v1/txt2img", {"cache_interval": 0}, ["cache_interval", "0"]),
    ("/sdapi/v1/txt2img", {"cache_interval": 2, "cache_branch": 7}, ["cache_branch 7", "0, 1, 3", "--deepcache"]),
])
def test_refusals_are_400_and_the_next_request_is_fine(server, path, body, words) -> None:
    base = {"prompt": "x", "steps": 4, **({"size": "256x256"} if path.startswith("/v1") else
                                          {"width": 256, "height": 256})}
    r = _post(server, path, {**base, **body})
    assert r.status_code == 400, r.text
    for w in words:
        assert w in r.text, r.text
    ok = _post(server, path, base)
    assert ok.status_code == 200, ok.text


def test_metrics_count_cached_steps(server) -> None:
    def cached() -> float:
        return metric(httpx.get(server.url + "/metrics", headers=auth(), timeout=TIMEOUT).text,
                      "sdxl_trt_cached_steps_total")

    before = cached()
    r = _post(server, "/v1/images/generations", {"prompt": "x", "size": "256x256", "steps": 5, "seed": 1,
                                                 "cache_interval": 2})
    assert r.status_code == 200, r.text
    assert cached() - before == 2  # steps 1 and 3 of 0..4 ran the shallow UNet
