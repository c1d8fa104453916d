"""The playground page (``GET /``) and ``/docs``: in headless Chromium against a real ``sdxl-trt serve`` on the
tiny engines, plus the page's serving rules in-process.

The browser is Debian's ``chromium`` (``.ci/run`` installs it with apt), driven by Playwright pointed at
``/usr/bin/chromium``; nothing is downloaded. One server (``--api-key``, the tiny base + refiner, two LoRAs,
``--max-queue 1``) serves every browser step, in order: the 401 message before the key, then a generation whose
images must be bit for bit what ``/sdapi/v1/txt2img`` returns for the request the page sent, with the progress
bar recorded as it moves and the time split the service measured; a bad value (the server's 400, form kept); a
full queue (the server's 429); a random seed shown after. Prompts carrying HTML must show as text.

Regenerate ``docs/playground.png`` (the README's screenshot, taken after the first generation) with
``SDXL_TRT_PLAYGROUND_SCREENSHOT=docs/playground.png pytest tests/test_playground.py -k chromium``; without the
variable the screenshot goes to the test's tmp folder only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.serve_fakes import GatedPipeline
from support.serve_server import API_KEY, ServerProcess, auth, free_port
from test_lora_build import lora_files  # noqa: F401 - the module fixture lora_dir reads

from sdxl_trt.presets import TINY_BUCKETS
from sdxl_trt.serve.core.settings import ServeSettings
from sdxl_trt.serve.http.app import create_app
from sdxl_trt.serve.ui.page import paths

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HTML_PROMPT = 'a lighthouse <img src=x onerror="window.__pwned=1"> <b>at dusk</b> & "fog"'
STEPS = 30  # long enough on 2 cores for several progress polls (150 ms apart) inside one generation


# ------------------------------------------------------------------ in-process: what the app serves
def _settings(**kw: Any) -> ServeSettings:
    return ServeSettings(**{"engines": Path("unused"), "api_key": API_KEY, "warmup": "none", "batch_window_ms": 0,
                            **kw})


async def _get_all(settings: ServeSettings, requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    app = create_app(settings, lambda s: GatedPipeline(open_gate=True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            await app.state.service.wait_loaded()
            return [await client.get(path, headers=headers) for path, headers in requests]


def test_pages_need_no_key_and_carry_the_csp() -> None:
    """Every page path answers without the key (the pages hold no secret) with a same-origin, no-inline-script
    CSP; the APIs behind them still want the key, and /openapi.json describes both APIs with bearer auth."""
    got = asyncio.run(_get_all(_settings(), [(p, {}) for p in paths()] + [("/info", {}), ("/info", auth())]))
    pages, (info_no_key, info) = got[:-2], got[-2:]
    for path, r in zip(paths(), pages, strict=True):
        assert r.status_code == 200, (path, r.text)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp, (path, csp)
        assert r.headers["x-content-type-options"] == "nosniff"
    assert pages[0].headers["content-type"].startswith("text/html")
    assert b"<script src=\"/ui/app.js\" defer></script>" in pages[0].content
    assert info_no_key.status_code == 401 and info.status_code == 200
    assert info.json()["buckets"] == [str(b) for b in TINY_BUCKETS]  # the stand-in pipeline's
    assert "cache_branches" not in info.json()  # engines without step caching: the field is absent
    spec = pages[paths().index("/openapi.json")].json()
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/info"} <= set(spec["paths"])
    assert not any(p in spec["paths"] for p in ("/", "/docs", "/openapi.json"))
    assert spec["security"] == [{"apiKey": []}]
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_no_ui_turns_the_pages_off() -> None:
    got = asyncio.run(_get_all(_settings(ui=False), [(p, auth()) for p in paths()] + [("/info", auth())]))
    assert [r.status_code for r in got[:-1]] == [404] * len(paths())
    assert got[-1].status_code == 200  # the engine facts are an API, not the page


def test_page_script_sets_text_only() -> None:
    """The page builds its DOM with textContent and attributes only (the browser test proves HTML shows as text;
    this keeps an HTML sink from creeping in where no test looks)."""
    static = Path(__file__).parents[1] / "serve" / "ui" / "static"
    for name in ("app.js", "docs.js"):
        text = (static / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, (name, sink)
    for name in ("index.html", "docs.html"):
        html = (static / name).read_text()
        assert "<script>" not in html and " style=" not in html and "http" not in html, name


def test_progress_counts_a_real_generation(tiny_pipeline) -> None:
    """StepProgress, read from another thread while the tiny pipeline denoises: it moves through the steps,
    base and refiner as one run, and reads idle (0 of 0) once the batch is done."""
    from sdxl_trt.request import GenerationRequest

    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            s = tiny_pipeline.progress.snapshot()
            seen.append((s.step, s.steps))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = tiny_pipeline.generate(GenerationRequest(prompt="p", width=256, height=256, steps=12, seed=3,
                                                          refiner_mode="ensemble", refiner_start=0.75))
    finally:
        done.set()
        watcher.join()
    running = [s for s in seen if s[1]]
    assert result.steps_run["refiner"] > 0 and sum(result.steps_run.values()) == 12
    assert {total for _, total in running} == {12}  # the base's and the refiner's steps: one run
    steps = [step for step, _ in running]
    assert steps == sorted(steps) and len(set(steps) - {0, 12}) >= 3, steps
    assert tiny_pipeline.progress.snapshot().steps == 0


@pytest.mark.gpu
def test_progress_counts_device_steps_on_cuda() -> None:
    """On CUDA the host enqueues far ahead of the GPU: progress must count the steps the device finished (its
    events), not the ones the host marked."""
    import torch

    from sdxl_trt.runtime.progress import StepProgress

    progress = StepProgress(torch.device("cuda"), capacity=8)
    a = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    progress.begin(8)
    for _ in range(8):
        for _ in range(8):
            a = a @ a / 8192  # ~9 TFLOP a step: the host is done enqueueing long before the device
        progress.mark()
    early = progress.snapshot()
    torch.cuda.synchronize()
    assert early.steps == 8 and early.step < 8, early
    assert progress.snapshot().step == 8


# ------------------------------------------------------------------ the browser against a real server
@pytest.fixture(scope="module")
def lora_dir(request) -> Path:
    (style, _), _ = request.getfixturevalue("lora_files")
    return style.parent


@pytest.fixture(scope="module")
def server(tiny_engines: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_engines, tmp_path_factory.mktemp("playground") / "server.log", "--lora-dir",
                        str(lora_dir), "--warmup", "none", "--max-queue", "1", "--batch-window-ms", "0")
    try:
        srv.wait_ready(timeout_s=300)  # a crowded 2-core machine loads the engines slowly
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing in CI: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("Debian's chromium is not installed here (apt-get install -y chromium); CI installs it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is missing")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


class PageLog:
    """What a page did: every URL it asked for and every console error (a CSP violation is one)."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def foreign(self, origin: str) -> list[str]:
        return [u for u in self.urls if not u.startswith((origin + "/", "blob:", "data:"))]


def _shown_pixels(page: Any) -> list[np.ndarray]:
    """The RGB pixels each shown image of the newest result has on screen, read back through a canvas."""
    drawn = page.evaluate("""() => [...document.querySelectorAll('.result:first-child img.generated')].map((img) => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)]; })""")
    return [np.array(rgba, dtype=np.uint8).reshape(h, w, 4)[..., :3] for w, h, rgba in drawn]


def _downloads(page: Any, folder: Path) -> list[bytes]:
    """Each PNG link of the newest result, clicked and saved as the browser downloads it."""
    out = []
    for k in range(page.locator(".result:first-child a.download").count()):
        with page.expect_download() as download:
            page.locator(".result:first-child a.download").nth(k).click()
        path = folder / download.value.suggested_filename
        download.value.save_as(path)
        out.append(path.read_bytes())
    return out


def _set(page: Any, values: dict[str, str | bool]) -> None:
    """Set form controls as a person would: a checkbox checked or not, a select's option, text typed."""
    for selector, value in values.items():
        if isinstance(value, bool):
            page.set_checked(selector, value)
        elif page.eval_on_selector(selector, "e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)


def _generate(page: Any) -> tuple[dict[str, Any], httpx.Response | Any]:
    """Click Generate; the body the page sent and the page's response."""
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/txt2img"), timeout=180_000) as answer:
        page.click("#generate")
    response = answer.value
    return json.loads(response.request.post_data), response


def test_playground_in_chromium(server: ServerProcess, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    log = PageLog(page)
    page.goto(server.url + "/")

    # 1. --api-key: the 401 message as the server words it, then the key once; the form fills from the engines.
    no_key = httpx.get(server.url + "/info").json()["detail"]
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == f"HTTP 401: {no_key}"
    assert page.is_visible("#auth") and page.is_disabled("#generate")
    page.fill("#api-key", API_KEY)
    page.click("#auth button")
    page.wait_for_selector("#generate:not([disabled])")
    assert page.evaluate("sessionStorage.getItem('sdxl-trt.api-key')") == API_KEY
    assert not page.is_visible("#auth") and not page.is_visible("#error")
    info = httpx.get(server.url + "/info", headers=auth()).json()
    assert page.eval_on_selector_all("#size option", "os => os.map(o => o.value)") == info["buckets"]
    samplers = [s["name"] for s in httpx.get(server.url + "/sdapi/v1/samplers", headers=auth()).json()]
    assert page.eval_on_selector_all("#sampler_name option", "os => os.map(o => o.value)") == samplers
    assert page.eval_on_selector_all("#lora-list input[type=checkbox]", "bs => bs.map(b => b.dataset.name)") == \
        ["detail", "style"]
    assert page.is_visible("#refiner") and not page.is_visible("#controlnet") and not page.is_visible("#cache")

    # 2. A generation: two images, fixed seed, a LoRA, the refiner, a non-default sampler and schedule.
    _set(page, {"#prompt": HTML_PROMPT, "#negative_prompt": "blurry", "#size": "256x256", "#steps": str(STEPS),
                "#cfg_scale": "6", "#batch_size": "2", "#sampler_name": "DPM++ 2M", "#scheduler": "karras",
                "#seed": "1234", "#lora-1": True, "#lora-weight-1": "0.7", "#refiner-enabled": True,
                "#refiner_switch_at": "0.75"})  # lora-1: style
    page.evaluate("""() => { window.__progress = []; const bar = document.getElementById('progress');
        new MutationObserver(() => window.__progress.push(bar.value)).observe(bar, {attributes: true}); }""")
    sent, response = _generate(page)
    page.wait_for_selector(".result img.generated >> nth=1")
    assert response.status == 200
    assert sent["prompt"] == HTML_PROMPT + " <lora:style:0.7>" and sent["refiner_checkpoint"] == info["refiner"]["title"]
    assert sent["seed"] == 1234 and sent["batch_size"] == 2 and sent["scheduler"] == "karras"

    # The same request through the A1111 API: the PNGs the page offers are its bytes, and what it shows its pixels.
    api = httpx.post(server.url + "/sdapi/v1/txt2img", json=sent, headers=auth(), timeout=180)
    assert api.status_code == 200, api.text
    pngs = [base64.b64decode(b) for b in api.json()["images"]]
    links = page.eval_on_selector_all(".result:first-child a.download", "as => as.map(a => [a.href, a.download])")
    images = page.eval_on_selector_all(".result:first-child img.generated", "is => is.map(i => i.src)")
    assert [href for href, _ in links] == images  # the download is the very blob the <img> shows
    assert [name for _, name in links] == ["sdxl-trt-1234.png", "sdxl-trt-1235.png"]
    assert _downloads(page, tmp_path) == pngs  # bit for bit, generation parameters included
    for shown, png_bytes in zip(_shown_pixels(page), pngs, strict=True):
        with Image.open(io.BytesIO(png_bytes)) as png:
            assert np.array_equal(shown, np.asarray(png.convert("RGB")))
    with Image.open(io.BytesIO(pngs[1])) as png:
        assert json.loads(png.text["parameters"])["seed"] == 1235 and png.size == (256, 256)
    assert page.eval_on_selector_all(".result figcaption", "fs => fs.map(f => f.textContent)") == \
        ["seed 1234 · PNG", "seed 1235 · PNG"]

    # The progress bar moved through the denoising steps, forward only, and ended full.
    values = page.evaluate("window.__progress")
    inner = [v for v in values if 0 < v < 1]
    assert len(set(inner)) >= 2 and inner == sorted(inner) and values[-1] == 1, values

    # Text from the request shows as text: no element made from the prompt, no handler run.
    card = page.locator(".result").first
    assert card.locator("dd").first.text_content() == sent["prompt"]
    assert card.locator("b").count() == 0 and card.locator("dd img").count() == 0
    assert page.evaluate("window.__pwned") is None

    # The time split the service measured, as it measured it, with the backend and device.
    measured = json.loads(response.json()["info"])
    timings, steps_run = measured["timings"], measured["steps_run"]
    assert {"queue_wait", "text_encoders", "denoise", "refiner", "vae_decode"} <= set(timings)
    assert set(steps_run) == {"unet", "refiner"} and sum(steps_run.values()) == STEPS, steps_run  # split at 0.75
    rows = {r[0]: r[1:] for r in card.locator("table.timings tr").evaluate_all(
        "rs => rs.map(r => [...r.children].map(c => c.textContent))")}
    for label, key in (("Queue wait", "queue_wait"), ("Text encoders", "text_encoders"), ("Denoising", "denoise"),
                       ("Refiner", "refiner"), ("VAE decode", "vae_decode")):
        assert rows[label][0] == f"{timings[key] * 1000:.1f} ms", (label, rows[label], timings[key])
    for label, unet, key in (("Denoising", "unet", "denoise"), ("Refiner", "refiner", "refiner")):
        n = steps_run[unet]
        assert rows[label][1] == f"{n} steps, {timings[key] / n * 1000:.1f} ms/step", rows[label]
    assert card.locator(".engine").text_content().startswith(f"onnxruntime on {info['device']}")

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("SDXL_TRT_PLAYGROUND_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)

    # 3. A bad value: the server's 400 message as it is, naming the field; the form is kept.
    page.fill("#steps", "100000")
    bad, response = _generate(page)
    page.wait_for_selector("#error:not([hidden])")
    expected = httpx.post(server.url + "/sdapi/v1/txt2img", json=bad, headers=auth()).json()["detail"]
    assert response.status == 400 and "steps" in expected
    assert page.text_content("#error") == f"HTTP 400: {expected}"
    assert page.input_value("#steps") == "100000" and page.input_value("#prompt") == HTML_PROMPT
    assert page.is_checked("#lora-1") and page.locator(".result").count() == 1

    # 4. A full queue: the server's 429, which says to retry, with its Retry-After.
    page.fill("#steps", "8")
    page.uncheck("#refiner-enabled")
    page.fill("#batch_size", "1")
    busy = [threading.Thread(target=httpx.post, args=(server.url + "/sdapi/v1/txt2img",),
                             kwargs={"json": {"prompt": "busy", "width": 256, "height": 256, "steps": steps},
                                     "headers": auth(), "timeout": 180}) for steps in (60, 2)]
    # One running (long), then one waiting (short); their step counts keep them out of one batch.
    for jobs, thread in enumerate(busy, start=1):
        thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/sdapi/v1/progress", headers=auth()).json()["state"]["job_count"] < jobs:
            assert time.monotonic() < deadline, f"never {jobs} jobs in the service"
            time.sleep(0.02)
    _, response = _generate(page)
    page.wait_for_function("document.getElementById('error').textContent.startsWith('HTTP 429')")
    refusal = response.json()["detail"]
    assert "retry" in refusal
    assert page.text_content("#error") == f"HTTP 429: {refusal} (Retry-After: {response.headers['retry-after']} s)"
    for t in busy:
        t.join(120)

    # 5. A random seed: the seed used is shown after, and "last" puts it in the form.
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    _, response = _generate(page)
    page.wait_for_selector(".result >> nth=1")
    used = json.loads(response.json()["info"])["seed"]
    assert used != -1 and page.locator(".result figcaption").first.text_content() == f"seed {used} · PNG"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == str(used)

    assert not log.foreign(server.url), log.foreign(server.url)
    assert not log.errors or all("401" in e or "400" in e or "429" in e for e in log.errors), log.errors
    page.close()


def _sign_in(page: Any, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#auth:not([hidden])")
    page.fill("#api-key", API_KEY)
    page.click("#auth button")
    page.wait_for_selector("#generate:not([disabled])")


@pytest.fixture(scope="module")
def controlnet_server(tiny_controlnet_engines: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_controlnet_engines, tmp_path_factory.mktemp("playground-cn") / "server.log",
                        "--warmup", "none", "--batch-window-ms", "0")
    try:
        srv.wait_ready(timeout_s=300)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_controlnet_in_chromium(controlnet_server: ServerProcess, browser: Any, tmp_path: Path) -> None:
    """Engines with ControlNets: the page lists them and their preprocessors, sends the chosen control image and
    settings as the A1111 extension's unit, and shows the images the API gives for that request."""
    url = controlnet_server.url
    page = browser.new_page()
    log = PageLog(page)
    _sign_in(page, url)
    assert page.is_visible("#controlnet")
    models = httpx.get(url + "/controlnet/model_list", headers=auth()).json()["model_list"]
    modules = httpx.get(url + "/controlnet/module_list", headers=auth()).json()["module_list"]
    assert page.eval_on_selector_all("#cn-model option", "os => os.map(o => o.value)") == models
    assert page.eval_on_selector_all("#cn-module option", "os => os.map(o => o.value)") == modules
    control = tmp_path / "edges.png"
    image = Image.new("RGB", (256, 256), "black")
    image.paste((255, 255, 255), (64, 64, 192, 192))
    image.save(control)
    page.set_input_files("#cn-image", str(control))
    _set(page, {"#steps": "4", "#seed": "7", "#cn-enabled": True, "#cn-model": "edges", "#cn-module": "canny",
                "#cn-weight": "0.8", "#cn-start": "0.1", "#cn-end": "0.9", "#cn-mode": "2"})
    sent, response = _generate(page)
    page.wait_for_selector(".result img.generated")
    assert response.status == 200
    unit = sent["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit["image"] == "data:image/png;base64," + base64.b64encode(control.read_bytes()).decode()
    assert {k: unit[k] for k in ("model", "module", "weight", "guidance_start", "guidance_end", "control_mode")} == \
        {"model": "edges", "module": "canny", "weight": 0.8, "guidance_start": 0.1, "guidance_end": 0.9,
         "control_mode": 2}
    api = httpx.post(url + "/sdapi/v1/txt2img", json=sent, headers=auth(), timeout=180)
    assert api.status_code == 200, api.text
    pngs = [base64.b64decode(b) for b in api.json()["images"]]
    assert _downloads(page, tmp_path) == pngs
    with Image.open(io.BytesIO(pngs[0])) as png:
        assert np.array_equal(_shown_pixels(page)[0], np.asarray(png.convert("RGB")))
    used = json.loads(api.json()["info"])["extra_generation_params"]["ControlNet 0"]
    shown = page.eval_on_selector_all(".result dt, .result dd", "es => es.map(e => e.textContent)")
    assert shown[shown.index("ControlNet 0") + 1] == used
    assert not log.foreign(url) and not [e for e in log.errors if "401" not in e], log.errors
    page.close()


class _CachingPipeline(GatedPipeline):
    """The stand-in pipeline with step-caching branches, as engines built with --deepcache would report them."""

    cache_branches = (0, 3)


@contextlib.contextmanager
def _app_server(pipeline: Any) -> Iterator[str]:
    """Our app (``create_app``) on uvicorn in a thread, over ``pipeline``: real HTTP, a stand-in engine."""
    import uvicorn

    port = free_port()
    app = create_app(_settings(), lambda s: pipeline)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started or httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-thread server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_step_caching_controls_light_up(browser: Any) -> None:
    """When /info reports cache branches, the page shows the step-caching controls and sends ``cache_interval``
    and ``cache_branch``; it then shows whatever the server answers (this test's engine is a stand-in)."""
    with _app_server(_CachingPipeline(open_gate=True)) as url:
        page = browser.new_page()
        _sign_in(page, url)
        assert page.is_visible("#cache")
        assert page.eval_on_selector_all("#cache_branch option", "os => os.map(o => o.value)") == ["0", "3"]
        page.fill("#cache_interval", "3")
        page.select_option("#cache_branch", "3")
        sent, response = _generate(page)
        assert (sent["cache_interval"], sent["cache_branch"]) == (3, 3)
        page.wait_for_selector(".result, #error:not([hidden])")
        if response.status != 200:
            assert page.text_content("#error") == f"HTTP {response.status}: {response.json()['detail']}"
        page.close()


def test_docs_in_chromium(server: ServerProcess, browser: Any) -> None:
    """/docs renders FastAPI's OpenAPI page for both APIs from this origin only, under its CSP."""
    page = browser.new_page()
    log = PageLog(page)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path >> nth=0", timeout=30_000)
    shown = set(page.eval_on_selector_all(".opblock-summary-path", "ps => ps.map(p => p.dataset.path)"))
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/progress", "/info"} <= shown, shown
    assert page.is_visible(".btn.authorize")  # --api-key: the spec declares bearer auth
    assert not log.foreign(server.url), log.foreign(server.url)
    assert not log.errors, log.errors
    page.close()
