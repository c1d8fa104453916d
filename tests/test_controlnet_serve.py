"""ControlNet through ``sdxl-trt serve``'s app (in-process ASGI, real engines): the OpenAI ``controlnets`` field and
the A1111 ControlNet extension's ``alwayson_scripts.controlnet.args``, ``/controlnet/model_list`` and
``module_list``.

Each image must equal ``Pipeline.generate`` of the same request in-process (the runtime's own tests compare that
against diffusers' ControlNet pipelines), within the pipeline tests' tolerance: what this file proves is that
every field reaches the request unchanged (name, image, scale, start/end, guess mode, canny). Bad input is a 400
naming the field, and the next request is fine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.serve_server import decode_png, metric, png_b64
from test_pipeline import assert_close

from sdxl_trt.request import ControlNetUnit, GenerationRequest
from sdxl_trt.serve.core.settings import ServeSettings
from sdxl_trt.serve.http.app import create_app

STEPS = 2
SEED = 11
PROMPT = "a lighthouse on a cliff"


def edges_image(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """White lines on black: what an edges ControlNet takes."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[::32, :, :] = 255
    arr[:, ::48, :] = 255
    arr[40:200, 100:104] = 255
    return Image.fromarray(arr)


def photo(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A smooth picture with a few hard shapes, so canny finds edges."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=2).astype(np.uint8)
    arr[60:180, 70:150] = (250, 240, 20)
    arr[20:50, 180:240] = (10, 10, 10)
    return Image.fromarray(arr)


class Client:
    """The app over a loaded pipeline on one event loop, driven synchronously from the tests."""

    def __init__(self, pipeline: Any) -> None:
        self.loop = asyncio.new_event_loop()
        settings = ServeSettings(engines=Path("unused"), warmup="none", batch_window_ms=0, max_steps=50)
        self.app = create_app(settings, lambda s: pipeline)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self._lifespan.__aenter__())
        self.loop.run_until_complete(self.app.state.service.wait_loaded())
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1",
                                      timeout=120)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        self.loop.close()


@pytest.fixture(scope="module")
def cn_pipeline(tiny_controlnet_engines: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_controlnet_engines, device="cpu")


@pytest.fixture(scope="module")
def client(cn_pipeline) -> Iterator[Client]:
    c = Client(cn_pipeline)
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(cn_pipeline) -> Callable[..., np.ndarray]:
    def generate(**kw: Any) -> np.ndarray:
        req = GenerationRequest(**{"prompt": PROMPT, "width": 256, "height": 256, "seed": SEED, "steps": STEPS,
                                   "guidance_scale": 5.0, **kw})
        return np.asarray(cn_pipeline.generate(req).images[0])

    return generate


def _openai(client: Client, controlnets: list[dict[str, Any]] | None, **fields: Any) -> httpx.Response:
    body = {"prompt": PROMPT, "size": "256x256", "seed": SEED, "steps": STEPS, "guidance_scale": 5.0, **fields}
    if controlnets is not None:
        body["controlnets"] = controlnets
    return client.request("POST", "/v1/images/generations", json=body)


def _a1111(client: Client, units: list[Any] | None, path: str = "txt2img", **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": PROMPT, "width": 256, "height": 256, "seed": SEED, "steps": STEPS,
                            "cfg_scale": 5, "sampler_name": "Euler", **fields}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    return client.request("POST", f"/sdapi/v1/{path}", json=body)


def _ok(client: Client) -> None:
    """The request after a refused one is served."""
    r = _openai(client, [{"name": "edges", "image": png_b64(edges_image()), "scale": 0.5}])
    assert r.status_code == 200, r.text


def test_model_and_module_lists(client: Client) -> None:
    r = client.request("GET", "/controlnet/model_list")
    assert r.status_code == 200 and sorted(r.json()["model_list"]) == ["depth", "edges"]
    assert client.request("GET", "/controlnet/module_list").json() == {"module_list": ["none", "canny"]}


def test_openai_one_controlnet_equals_pipeline(client: Client, direct) -> None:
    r = _openai(client, [{"name": "edges", "image": png_b64(edges_image()), "scale": 0.7}])
    assert r.status_code == 200, r.text
    got = decode_png(r.json()["data"][0]["b64_json"])
    want = direct(controlnets=(ControlNetUnit("edges", edges_image(), scale=0.7),))
    assert_close([Image.fromarray(got)], [Image.fromarray(want)])
    plain = direct()
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 2, "the ControlNet changed nothing"


def _webuiapi_unit() -> dict[str, Any]:
    """What ``webuiapi.ControlNetUnit`` sends (its defaults: "Resize and Fill", thresholds 64, hr_option "Both")."""
    import webuiapi

    return webuiapi.ControlNetUnit(image=edges_image(), model="edges", weight=0.7, module="none").to_dict()


@pytest.mark.parametrize("shape", ["extension", "webuiapi"])
def test_a1111_controlnet_extension_shape_equals_pipeline(client: Client, direct, shape: str) -> None:
    unit = {"image": "data:image/png;base64," + png_b64(edges_image()), "model": "edges [0a1b2c3d]", "weight": 0.7,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", "module": "none",
            "resize_mode": "Crop and Resize", "processor_res": 512, "pixel_perfect": False, "low_vram": False}
    if shape == "webuiapi":
        unit = _webuiapi_unit()
    r = _a1111(client, [unit, {"enabled": False, "model": "depth", "image": ""}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]["image"] is None  # not echoed back
    info = json.loads(body["info"])
    entry = "Model: edges, Weight: 0.7, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced"
    assert info["extra_generation_params"] == {"ControlNet 0": entry}  # the extension's infotext entry
    assert info["infotexts"][0].endswith(f'ControlNet 0: "{entry}"')
    want = direct(controlnets=(ControlNetUnit("edges", edges_image(), scale=0.7),))
    assert_close([Image.fromarray(decode_png(body["images"][0]))], [Image.fromarray(want)])


def test_a1111_img2img_guess_mode_and_canny(client: Client, direct) -> None:
    """img2img with a canny unit in "ControlNet is more important" (guess mode), window 0.2..0.8; the canny map
    is OpenCV's with the extension's default thresholds and processor resolution."""
    import cv2

    init = photo()
    unit = {"input_image": png_b64(photo()), "model": "depth", "weight": 0.8, "guidance_start": 0.2,
            "guidance_end": 0.8, "control_mode": 2, "module": "canny", "threshold_a": -1, "threshold_b": -1}
    r = _a1111(client, [unit], path="img2img", init_images=[png_b64(init)], denoising_strength=0.9, steps=3)
    assert r.status_code == 200, r.text
    # The extension detects at processor_res 512 (short side, cubic upscale; 512 needs no padding to 64).
    raw = np.asarray(photo())
    k = 512 / min(raw.shape[:2])
    big = cv2.resize(raw, (round(raw.shape[1] * k), round(raw.shape[0] * k)), interpolation=cv2.INTER_CUBIC)
    edges = cv2.Canny(big, 100, 200)
    control = Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
    want = direct(controlnets=(ControlNetUnit("depth", control, scale=0.8, start=0.2, end=0.8, guess_mode=True),),
                  init_image=init, strength=0.9, steps=3)
    assert_close([Image.fromarray(decode_png(r.json()["images"][0]))], [Image.fromarray(want)])


def test_canny_preprocessor_is_opencv_canny() -> None:
    import cv2

    from sdxl_trt.control_images import canny

    image = photo((200, 120))
    out = canny(image, 50, 120)
    assert out.mode == "RGB" and out.size == (200, 120)
    want = cv2.Canny(np.asarray(image), 50, 120)
    got = np.asarray(out)
    assert (got[:, :, 0] == want).all() and (got[:, :, 1] == want).all() and (got[:, :, 2] == want).all()
    assert want.max() == 255  # it found edges


def test_canny_at_a_processor_resolution_pads_to_64_and_cuts_the_pad() -> None:
    """The extension's resize_image_with_pad: short side to the resolution (area down), edge-padded to a
    multiple of 64, detected, the padding removed."""
    import cv2

    from sdxl_trt.control_images import canny

    image = photo((300, 200))
    out = canny(image, 100, 200, resolution=100)
    assert out.size == (150, 100)
    small = cv2.resize(np.asarray(image), (150, 100), interpolation=cv2.INTER_AREA)
    padded = np.pad(small, [[0, 28], [0, 42], [0, 0]], mode="edge")
    assert (np.asarray(out)[:, :, 0] == cv2.Canny(padded, 100, 200)[:100, :150]).all()


def test_resize_modes_fit_the_request_size() -> None:
    from sdxl_trt.serve.apis.controlnet import fit_control_image

    wide = photo((512, 256))
    assert fit_control_image(wide, (256, 256), "just") is wide
    assert fit_control_image(wide, (256, 256), "crop").size == (256, 256)
    filled = fit_control_image(wide, (256, 256), "fill")
    band = np.asarray(filled)[:64]
    assert filled.size == (256, 256) and (band == band[0, 0]).all()  # the top band is one fill colour
    assert fit_control_image(photo((128, 128)), (256, 256), "crop").size == (128, 128)  # same aspect: as is


def _bomb_png() -> str:
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")  # ~50 KB declaring 400 M pixels
    return base64.b64encode(out.getvalue()).decode()


OPENAI_BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, unit fields over a good edges unit, param, words in the message)
    ("unknown name", {"name": "pose"}, "controlnets[0].name", "edges"),
    ("undecodable image", {"image": base64.b64encode(b"not an image at all").decode()}, "controlnets[0].image",
     "not a readable image"),
    ("bad base64", {"image": "%%%"}, "controlnets[0].image", "base64"),
    ("decompression bomb", {"image": _bomb_png()}, "controlnets[0].image", "pixels"),
    ("scale as text", {"scale": "strong"}, "controlnets.0.scale", "number"),
    ("scale too large", {"scale": 11}, "controlnets.0.scale", "10"),
    ("start >= end", {"start": 0.6, "end": 0.4}, "controlnets[0].start", "below"),
    ("unknown preprocessor", {"preprocessor": "openpose"}, "controlnets[0].preprocessor", "canny"),
    ("name twice", {}, "controlnets", "once"),
]


@pytest.mark.parametrize("case,fields,param,words", OPENAI_BAD, ids=[c[0] for c in OPENAI_BAD])
def test_openai_bad_controlnet_refused_then_next_fine(client: Client, case: str, fields: dict[str, Any], param: str,
                                                     words: str) -> None:
    unit = {"name": "edges", "image": png_b64(edges_image()), "scale": 0.7, **fields}
    units = [unit, dict(unit)] if case == "name twice" else [unit]
    r = _openai(client, units)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    _ok(client)


def test_openai_missing_image_and_nan_scale(client: Client) -> None:
    r = _openai(client, [{"name": "edges", "scale": 0.7}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "controlnets.0.image", r.text
    _ok(client)
    body = json.dumps({"prompt": PROMPT, "size": "256x256", "steps": STEPS, "controlnets": [
        {"name": "edges", "image": png_b64(edges_image()), "scale": "__NAN__"}]}).replace('"__NAN__"', "NaN")
    r = client.request("POST", "/v1/images/generations", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
    _ok(client)


A1111_BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("prompt more important", {"control_mode": 1}, "control_mode", "not supported"),
    ("unknown control mode", {"control_mode": 7}, "control_mode", "Balanced"),
    ("unknown module", {"module": "depth_midas"}, "module", "none, canny"),
    ("unknown model", {"model": "openpose [123]"}, "model", "edges"),
    ("no model", {"model": "None"}, "model", "model_list"),
    ("weight NaN-like", {"weight": "nan"}, "weight", "finite"),
    ("start >= end", {"guidance_start": 0.9, "guidance_end": 0.1}, "guidance_start", "below"),
    ("no image", {"image": ""}, "image", "required"),
    ("masked unit", {"image": {"image": "x", "mask": "y"}}, "image.mask", "masked"),
    ("unknown field", {"ipadapter_input": ["x"]}, "ipadapter_input", "not supported"),
    ("canny threshold", {"module": "canny", "threshold_a": 300}, "threshold_a", "0..255"),
]


@pytest.mark.parametrize("case,fields,field,words", A1111_BAD, ids=[c[0] for c in A1111_BAD])
def test_a1111_bad_unit_refused_then_next_fine(client: Client, case: str, fields: dict[str, Any], field: str,
                                               words: str) -> None:
    unit = {"image": png_b64(edges_image()), "model": "edges", "weight": 0.7, "module": "none", **fields}
    r = _a1111(client, [unit])
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "InvalidRequestError" and words in body["detail"], body
    assert f"alwayson_scripts.controlnet.args[0].{field}" in body["detail"], body
    _ok(client)


def test_large_control_image_is_not_a_text_only_body(client: Client) -> None:
    """With ControlNets built, txt2img and generations take control images: a body over the text-only limit
    (1 MiB) reaches the decoder (here refused for its pixels, not as a 413)."""
    rng = np.random.default_rng(0)
    big = png_b64(Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)))
    assert len(big) > 2**20
    r = _a1111(client, [{"image": big, "model": "edges"}])
    assert r.status_code == 400 and "pixels" in r.json()["detail"], r.text
    r = _openai(client, [{"name": "edges", "image": big}])
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"], r.text


def test_controlnet_metrics(client: Client) -> None:
    _ok(client)
    text = client.request("GET", "/metrics").text
    assert metric(text, "sdxl_trt_controlnet_requests_total", 'controlnet="edges"') >= 1


def test_engines_without_controlnet_refuse_with_rebuild_command(tiny_pipeline) -> None:
    c = Client(tiny_pipeline)
    try:
        assert c.request("GET", "/controlnet/model_list").json() == {"model_list": []}
        r = _openai(c, [{"name": "edges", "image": png_b64(edges_image())}])
        assert r.status_code == 400, r.text
        assert "sdxl-trt build" in r.json()["error"]["message"] and "--controlnet" in r.json()["error"]["message"]
        r = _a1111(c, [{"image": png_b64(edges_image()), "model": "edges"}])
        assert r.status_code == 400 and "--controlnet" in r.json()["detail"], r.text
        r = _openai(c, None)
        assert r.status_code == 200, r.text
    finally:
        c.close()
