"""``sdxl-trt serve`` as a real subprocess on a loopback port: images equal the pipeline's and ``sdxl-trt run``'s,
concurrent requests batch and match sequential ones, the official clients work, bad input is refused with the
right status in each API's shape, overload answers 429, and SIGTERM drains and exits 0."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.serve_server import API_KEY, ServerProcess, auth, decode_png, metric, png_b64, served

from sdxl_trt.request import GenerationRequest

TOLERANCE = 1  # uint8 levels between an image batched with others and the same request run alone
TIMEOUT = 120.0  # per HTTP request; every loop below is bounded in count too


@pytest.fixture(scope="module")
def server(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    yield from served(tiny_engines, log, "--max-queue", "4", "--max-images", "4", "--max-steps", "10",
                      "--max-body-mb", "1", "--batch-window-ms", "100", "--request-timeout-s", "60",
                      clean_exit=True, secret=API_KEY)  # the key never reaches a log line


def _post(srv: ServerProcess, path: str, body: Any = None, **kw: Any) -> httpx.Response:
    headers = {**auth(), **kw.pop("headers", {})}
    timeout = kw.pop("timeout", TIMEOUT)
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=timeout, **kw)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _pattern(width: int = 256, height: int = 256) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 64) * 4], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def _left_half_mask(width: int = 256, height: int = 256) -> Image.Image:
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[:, : width // 2] = 255
    return Image.fromarray(arr, mode="L")


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that declare ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- equality
def test_openai_generation_equals_pipeline_and_cli(server, tiny_pipeline, tiny_engines, tmp_path) -> None:
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "size": "256x256", "steps": 2, "seed": 21,
            "guidance_scale": 6.0, "scheduler": "euler_a", "model": "sdxl-tiny"}
    r = _post(server, "/v1/images/generations", body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["seed"] == 21
    got = decode_png(data[0]["b64_json"])
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a lighthouse at dusk", negative_prompt="fog", width=256, height=256, steps=2, seed=21,
        guidance_scale=6.0, scheduler="euler_a"))
    assert np.array_equal(got, _pixels(ref.images[0]))

    out = tmp_path / "run.png"
    subprocess.run([sys.executable, "-m", "sdxl_trt.cli", "-q", "run", "--engines", str(tiny_engines), "--prompt",
                    "a lighthouse at dusk", "--negative-prompt", "fog", "--width", "256", "--height", "256",
                    "--steps", "2", "--seed", "21", "--guidance", "6", "--scheduler", "euler_a", "--device", "cpu",
                    "--out", str(out)], check=True, timeout=180, capture_output=True)
    with Image.open(out) as im:
        assert np.array_equal(got, _pixels(im))


def test_a1111_txt2img_equals_pipeline(server, tiny_pipeline) -> None:
    body = {"prompt": "a red barn", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "steps": 3, "cfg_scale": 4.5, "width": 320, "height": 256, "seed": 5, "batch_size": 2, "n_iter": 1}
    r = _post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6]
    assert out["parameters"]["prompt"] == "a red barn"
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a red barn", negative_prompt="blurry", scheduler="dpmpp_2m_karras", steps=3, guidance_scale=4.5,
        width=320, height=256, seed=5, num_images=2))
    for b64, image in zip(out["images"], ref.images, strict=True):
        assert np.array_equal(decode_png(b64), _pixels(image))

    # the refiner in ensemble mode, as A1111's refiner_checkpoint / refiner_switch_at
    body = {"prompt": "a red barn", "sampler_name": "Euler", "steps": 4, "cfg_scale": 5, "width": 256,
            "height": 256, "seed": 6, "refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.5}
    r = _post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a red barn", scheduler="euler", steps=4, guidance_scale=5.0, width=256, height=256, seed=6,
        refiner_mode="ensemble", refiner_start=0.5))
    assert np.array_equal(decode_png(r.json()["images"][0]), _pixels(ref.images[0]))


def test_a1111_img2img_and_inpainting_equal_pipeline(server, tiny_pipeline) -> None:
    init, mask = _pattern(), _left_half_mask()
    common = {"prompt": "a stone wall", "sampler_name": "Euler", "steps": 3, "cfg_scale": 5, "width": 256,
              "height": 256, "init_images": ["data:image/png;base64," + png_b64(init)]}
    r = _post(server, "/sdapi/v1/img2img", {**common, "denoising_strength": 0.6, "seed": 8})
    assert r.status_code == 200, r.text
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a stone wall", scheduler="euler", steps=3, guidance_scale=5.0, width=256, height=256, seed=8,
        init_image=init, strength=0.6))
    assert np.array_equal(decode_png(r.json()["images"][0]), _pixels(ref.images[0]))

    r = _post(server, "/sdapi/v1/img2img", {**common, "denoising_strength": 0.9, "seed": 9, "mask": png_b64(mask),
                                            "mask_blur": 0})
    assert r.status_code == 200, r.text
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a stone wall", scheduler="euler", steps=3, guidance_scale=5.0, width=256, height=256, seed=9,
        init_image=init, strength=0.9, mask_image=mask))
    assert np.array_equal(decode_png(r.json()["images"][0]), _pixels(ref.images[0]))


def test_openai_edit_equals_pipeline_inpainting(server, tiny_pipeline) -> None:
    init = _pattern()
    alpha_mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (0, 0, 128, 256))  # OpenAI: transparent = edit
    files = [("image", ("image.png", _png_bytes(init), "image/png")),
             ("mask", ("mask.png", _png_bytes(alpha_mask), "image/png"))]
    form = {"prompt": "a stone wall", "n": "1", "size": "256x256", "steps": "2", "seed": "10", "strength": "0.9"}
    r = httpx.post(server.url + "/v1/images/edits", data=form, files=files, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    ref = tiny_pipeline.generate(GenerationRequest(
        prompt="a stone wall", width=256, height=256, steps=2, seed=10, init_image=init, strength=0.9,
        mask_image=_left_half_mask()))
    assert np.array_equal(decode_png(r.json()["data"][0]["b64_json"]), _pixels(ref.images[0]))


# ---------------------------------------------------------------------------------------------- batching
def _batches_over_one(srv: ServerProcess) -> float:
    text = httpx.get(srv.url + "/metrics", headers=auth(), timeout=TIMEOUT).text
    return metric(text, "sdxl_trt_batch_size_count") - metric(text, "sdxl_trt_batch_size_bucket", 'le="1.0"')


def test_concurrent_requests_batch_and_match_sequential(server) -> None:
    bodies = [{"prompt": "a green field", "size": "256x256", "steps": 2, "seed": s} for s in (31, 32, 33, 34)]
    before = _batches_over_one(server)
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda b: _post(server, "/v1/images/generations", b), bodies))
    assert all(r.status_code == 200 for r in concurrent), [r.text for r in concurrent]
    assert _batches_over_one(server) > before  # a batch of more than one image ran
    for body, r in zip(bodies, concurrent, strict=True):
        alone = _post(server, "/v1/images/generations", body)
        assert alone.status_code == 200, alone.text
        a = decode_png(r.json()["data"][0]["b64_json"]).astype(np.int16)
        b = decode_png(alone.json()["data"][0]["b64_json"]).astype(np.int16)
        assert np.abs(a - b).max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- clients
def test_openai_client_works_unchanged(server, tiny_pipeline) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
    resp = client.images.generate(model="sdxl-tiny", prompt="a fox", n=1, size="256x256",
                                  response_format="b64_json", extra_body={"steps": 2, "seed": 41})
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a fox", width=256, height=256, steps=2, seed=41))
    assert np.array_equal(decode_png(resp.data[0].b64_json), _pixels(ref.images[0]))

    init = _pattern()
    edit = client.images.edit(image=("image.png", _png_bytes(init), "image/png"),
                              mask=("mask.png", _png_bytes(_left_half_mask()), "image/png"), prompt="a fox",
                              size="256x256", extra_body={"steps": 2, "seed": 42, "strength": 0.9})
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a fox", width=256, height=256, steps=2, seed=42,
                                                   init_image=init, strength=0.9, mask_image=_left_half_mask()))
    assert np.array_equal(decode_png(edit.data[0].b64_json), _pixels(ref.images[0]))

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", size="100x100", extra_body={"steps": 2})
    assert "256x256" in str(e.value) and e.value.body["param"] == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="a fox")


def test_webuiapi_client_works_unchanged(server, tiny_pipeline) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="user", password=API_KEY,
                            sampler="Euler", steps=2)
    result = api.txt2img(prompt="a castle", width=256, height=256, seed=51, cfg_scale=5)
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a castle", width=256, height=256, steps=2, seed=51,
                                                   scheduler="euler", guidance_scale=5.0))
    assert np.array_equal(_pixels(result.image), _pixels(ref.images[0]))
    assert result.info["all_seeds"] == [51]

    init = _pattern()
    result = api.img2img(images=[init], prompt="a castle", denoising_strength=0.5, width=256, height=256, seed=52,
                         cfg_scale=5, steps=3)
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a castle", width=256, height=256, steps=3, seed=52,
                                                   scheduler="euler", guidance_scale=5.0, init_image=init,
                                                   strength=0.5))
    assert np.array_equal(_pixels(result.image), _pixels(ref.images[0]))
    assert api.get_samplers()[0]["name"]
    wrong = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="user", password="wrong")
    with pytest.raises(RuntimeError, match="401"):
        wrong.txt2img(prompt="a castle", width=256, height=256, steps=2)


# ---------------------------------------------------------------------------------------------- bad input
JSON = {"Content-Type": "application/json"}
TEXT_B64 = base64.b64encode(b"hello, not an image").decode()
_PNG = _png_bytes(_pattern())
A1111 = {"prompt": "x", "width": 256, "height": 256, "steps": 2}
IMG2IMG = {**A1111, "init_images": [base64.b64encode(_PNG).decode()]}


def _basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"user:{password}".encode()).decode()}


def _edit_files(image: bytes, mask: bytes | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = [("image", ("image.png", image, "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    return files


# (id, path, httpx keyword arguments, status, what the error must name: OpenAI's param, or text in A1111's detail)
BAD: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    ("malformed_json", "/v1/images/generations", {"content": b'{"prompt": "x",', "headers": JSON}, 400, None),
    ("prompt_wrong_type", "/v1/images/generations", {"json": {"prompt": 5, "steps": 2}}, 400, "prompt"),
    ("n_wrong_type", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "n": "two"}}, 400, "n"),
    ("prompt_missing", "/v1/images/generations", {"json": {"size": "256x256", "steps": 2}}, 400, "prompt"),
    ("size_not_a_bucket", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "size": "250x256"}}, 400, "size"),
    ("size_unparsable", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "size": "big"}}, 400, "size"),
    ("n_over_max_images", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "n": 5}}, 400, "n"),
    ("steps_zero", "/v1/images/generations", {"json": {"prompt": "x", "steps": 0}}, 400, "steps"),
    ("steps_over_max", "/v1/images/generations", {"json": {"prompt": "x", "steps": 11}}, 400, "steps"),
    ("guidance_nan", "/v1/images/generations",
     {"content": b'{"prompt": "x", "steps": 2, "guidance_scale": NaN}', "headers": JSON}, 400, "guidance_scale"),
    ("guidance_inf", "/v1/images/generations",
     {"content": b'{"prompt": "x", "steps": 2, "guidance_scale": Infinity}', "headers": JSON}, 400, "guidance_scale"),
    ("scheduler_unknown", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "scheduler": "heun"}}, 400, "scheduler"),
    ("response_format_url", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "response_format": "url"}}, 400,
     "response_format"),
    ("style_unsupported", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "style": "vivid"}}, 400, "style"),
    ("body_over_limit", "/v1/images/generations", {"json": {"prompt": "x" * 1_200_000}}, 413, None),
    ("body_over_limit_chunked", "/v1/images/generations",
     {"content": iter([b'{"prompt": "'] + [b"x" * 65536] * 20 + [b'"}']), "headers": JSON}, 413, None),
    ("key_missing", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2}, "headers": {"Authorization": ""}}, 401, None),
    ("key_wrong", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2}, "headers": {"Authorization": "Bearer no"}},
     401, None),
    ("edit_not_an_image", "/v1/images/edits", {"data": {"prompt": "x", "steps": "2"}, "files": _edit_files(b"hello")}, 400,
     "image"),
    ("edit_mask_size_differs", "/v1/images/edits",
     {"data": {"prompt": "x", "steps": "2"}, "files": _edit_files(_PNG, _png_bytes(_left_half_mask(128, 128)))}, 400, "mask"),
    ("edit_mask_all_opaque", "/v1/images/edits",
     {"data": {"prompt": "x", "steps": "2"}, "files": _edit_files(_PNG, _png_bytes(Image.new("RGBA", (256, 256),
                                                                                            (0, 0, 0, 255))))},
     400, "mask"),
    ("edit_mask_all_black", "/v1/images/edits",
     {"data": {"prompt": "x", "steps": "2"}, "files": _edit_files(_PNG, _png_bytes(Image.new("L", (256, 256))))},
     400, "mask"),
    ("size_superscript", "/v1/images/generations", {"json": {"prompt": "x", "steps": 2, "size": "\u00b2x256"}}, 400,
     "size"),
    ("prompt_over_cap", "/v1/images/generations", {"json": {"prompt": "x" * 9000, "steps": 2}}, 400, "prompt"),
    ("a1111_prompt_surrogate", "/sdapi/v1/txt2img",  # json.dumps writes it as the escape \ud800 (valid JSON)
     {"content": json.dumps({**A1111, "prompt": "\ud800"}).encode(), "headers": JSON}, 400, "prompt"),
    ("a1111_malformed_json", "/sdapi/v1/txt2img", {"content": b"{", "headers": JSON}, 400, "JSON"),
    ("a1111_images_over_max", "/sdapi/v1/txt2img", {"json": {**A1111, "batch_size": 3, "n_iter": 2}}, 400,
     "batch_size"),
    ("a1111_sampler_unknown", "/sdapi/v1/txt2img", {"json": {**A1111, "sampler_name": "Heun"}}, 400, "Euler a"),
    ("a1111_scheduler_unknown", "/sdapi/v1/txt2img", {"json": {**A1111, "scheduler": "Exponential"}}, 400, "Karras"),
    ("a1111_steps_zero", "/sdapi/v1/txt2img", {"json": {**A1111, "steps": 0}}, 400, "steps"),
    ("a1111_cfg_nan", "/sdapi/v1/txt2img", {"content": b'{"prompt": "x", "steps": 2, "cfg_scale": NaN}', "headers": JSON}, 400,
     "cfg_scale"),
    ("a1111_enable_hr", "/sdapi/v1/txt2img", {"json": {**A1111, "enable_hr": True}}, 400, "enable_hr"),
    ("a1111_restore_faces", "/sdapi/v1/txt2img", {"json": {**A1111, "restore_faces": True}}, 400, "restore_faces"),
    ("a1111_script", "/sdapi/v1/txt2img", {"json": {**A1111, "script_name": "x/y/z plot", "script_args": [1]}}, 400,
     "script"),
    ("a1111_unknown_feature", "/sdapi/v1/txt2img", {"json": {**A1111, "magic_feature": {"on": True}}}, 400,
     "magic_feature"),
    ("a1111_init_not_base64", "/sdapi/v1/img2img", {"json": {**IMG2IMG, "init_images": ["not base64!"]}}, 400,
     "base64"),
    ("a1111_init_not_an_image", "/sdapi/v1/img2img", {"json": {**IMG2IMG, "init_images": [TEXT_B64]}}, 400,
     "not a readable image"),
    ("a1111_init_truncated", "/sdapi/v1/img2img",
     {"json": {**IMG2IMG, "init_images": [base64.b64encode(_PNG[: len(_PNG) // 2]).decode()]}}, 400, "truncated"),
    ("a1111_init_declares_30000x30000", "/sdapi/v1/img2img",
     {"json": {**IMG2IMG, "init_images": [base64.b64encode(_bomb_png(30000, 30000)).decode()]}}, 400, "pixels"),
    ("a1111_init_too_many_pixels", "/sdapi/v1/img2img",
     {"json": {**IMG2IMG, "init_images": [png_b64(Image.new("L", (2048, 2048)))]}}, 400, "pixels"),
    ("a1111_mask_size_differs", "/sdapi/v1/img2img",
     {"json": {**IMG2IMG, "mask": png_b64(_left_half_mask(128, 128))}}, 400, "same size"),
    ("a1111_basic_auth_wrong", "/sdapi/v1/txt2img", {"json": A1111, "headers": _basic("wrong")}, 401, None),
    ("a1111_basic_auth_missing", "/sdapi/v1/txt2img", {"json": A1111, "headers": {"Authorization": ""}}, 401, None),
]


@pytest.mark.parametrize(("path", "kwargs", "status", "names"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_refused_and_the_server_keeps_serving(server, path, kwargs, status, names) -> None:
    kwargs = dict(kwargs)
    headers = {**auth(), **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    r = httpx.post(server.url + path, headers=headers, timeout=TIMEOUT, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    if path.startswith("/v1/"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if names is not None:
            assert err["param"] == names, err
    else:
        assert set(body) == {"error", "detail", "body", "errors"} and body["detail"]
        if names is not None:
            assert names in body["detail"], body
    assert "Traceback" not in r.text
    ok = _post(server, "/v1/images/generations", {"prompt": "ok", "size": "256x256", "steps": 1, "seed": 1})
    assert ok.status_code == 200, ok.text


def test_probes_metrics_and_info_endpoints(server) -> None:
    ok = _post(server, "/v1/images/generations", {"prompt": "ok", "size": "256x256", "steps": 1, "seed": 1})
    assert ok.status_code == 200, ok.text
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    ready = httpx.get(server.url + "/ready", timeout=TIMEOUT)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert httpx.get(server.url + "/metrics", timeout=TIMEOUT).status_code == 401
    text = httpx.get(server.url + "/metrics", headers=auth(), timeout=TIMEOUT).text
    for name in ("sdxl_trt_requests_total", "sdxl_trt_queue_depth", "sdxl_trt_batch_size_bucket",
                 "sdxl_trt_request_seconds_bucket", "sdxl_trt_stage_seconds_bucket", "sdxl_trt_images_total",
                 "sdxl_trt_cuda_graphs", "sdxl_trt_graph_pool_bytes"):
        assert name in text
    assert metric(text, "sdxl_trt_requests_total", 'endpoint="/v1/images/generations",outcome="ok"') > 0
    for path in ("samplers", "schedulers", "sd-models", "options", "progress"):
        r = httpx.get(f"{server.url}/sdapi/v1/{path}", headers=_basic(API_KEY), timeout=TIMEOUT)
        assert r.status_code == 200, (path, r.text)
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= {
        s["name"] for s in httpx.get(server.url + "/sdapi/v1/samplers", headers=auth(), timeout=TIMEOUT).json()}


def test_warm_up_runs_at_start_for_every_bucket(server, tiny_pipeline) -> None:
    """The default --warmup all ran before /ready turned 200, over every built bucket and batch size."""
    assert "warm-up of every built bucket at batch sizes 1..2" in server.log()
    text = httpx.get(server.url + "/metrics", headers=auth(), timeout=TIMEOUT).text
    assert metric(text, "sdxl_trt_cuda_graphs") == tiny_pipeline.cuda_graph_stats()["graphs"]  # 0 on the CPU


def test_warmup_of_an_unbuilt_bucket_exits_2(tiny_engines) -> None:
    r = subprocess.run([sys.executable, "-m", "sdxl_trt.cli", "serve", "--engines", str(tiny_engines),
                        "--warmup", "256x256,999x999"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "999x999" in r.stderr and "256x256" in r.stderr, r.stderr


def test_client_gone_drops_its_queued_request_unrun(server) -> None:
    def scrape() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics", headers=auth(), timeout=TIMEOUT).text
        cancelled = metric(text, "sdxl_trt_requests_total", 'endpoint="/v1/images/generations",outcome="cancelled"')
        return cancelled, metric(text, "sdxl_trt_images_total")

    cancelled0, images0 = scrape()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_post, server, "/v1/images/generations",
                           {"prompt": "slow", "size": "256x256", "steps": 10, "seed": 1})
        for _ in range(200):  # until it runs (bounded: 10 s)
            progress = httpx.get(server.url + "/sdapi/v1/progress", headers=auth(), timeout=TIMEOUT).json()
            if progress["state"]["job_count"] >= 1:
                break
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits in the queue
            _post(server, "/v1/images/generations", {"prompt": "gone", "size": "256x256", "steps": 3, "seed": 2},
                  timeout=httpx.Timeout(TIMEOUT, read=0.3))
        assert slow.result(timeout=TIMEOUT).status_code == 200
    for _ in range(100):  # bounded: 10 s
        cancelled, images = scrape()
        if cancelled > cancelled0:
            break
        time.sleep(0.1)
    assert cancelled == cancelled0 + 1
    assert images == images0 + 1  # only the slow request's image was made


# ---------------------------------------------------------------------------------------------- overload, SIGTERM
def test_overload_answers_429_and_loses_no_accepted_request(server) -> None:
    bodies = [{"prompt": "a crowd", "size": "256x256", "steps": 2, "seed": 100 + i} for i in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: _post(server, "/v1/images/generations", b), bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1, codes
    for r, body in zip(responses, bodies, strict=True):
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["data"][0]["seed"] == body["seed"]


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_engines, tmp_path) -> None:
    srv = ServerProcess(tiny_engines, tmp_path / "server.log", "--max-queue", "16", "--batch-window-ms", "50",
                        "--drain-timeout-s", "60", "--warmup", "none")  # the warm-up is the module server's test
    try:
        srv.wait_ready()
        bodies = [{"prompt": "a harbour", "size": "256x256", "steps": 2, "seed": 200 + i} for i in range(6)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_post, srv, "/v1/images/generations", b) for b in bodies]
            for _ in range(200):  # until every request is held by the server or answered (bounded: 10 s)
                progress = httpx.get(srv.url + "/sdapi/v1/progress", headers=auth(), timeout=TIMEOUT).json()
                answered = sum(f.done() for f in futures)
                if progress["state"]["job_count"] + answered >= len(bodies):
                    break
                time.sleep(0.05)
            srv.proc.terminate()
            time.sleep(0.2)
            assert httpx.get(srv.url + "/ready", timeout=TIMEOUT).status_code == 503
            late = _post(srv, "/v1/images/generations", bodies[0])
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            responses = [f.result(timeout=TIMEOUT) for f in futures]
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
        assert srv.proc.wait(60) == 0, srv.log()[-3000:]
    finally:
        srv.stop()
    assert "drained; shutting down" in srv.log()
