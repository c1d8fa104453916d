"""The ASGI app in-process over a gated stand-in pipeline (``create_app(settings, pipeline_factory)``, as a Ray
Serve deployment would build it): readiness while loading, a failed load, 504 past the deadline, 429 with
Retry-After, and the API-key check."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve_fakes import GatedPipeline

from sdxl_trt.errors import ManifestError
from sdxl_trt.serve.core.settings import ServeSettings
from sdxl_trt.serve.http.app import create_app
from sdxl_trt.serve.http.auth import key_matches

KEY = "k3y"
GEN = {"prompt": "x", "size": "256x256", "steps": 2}
A1111 = {"prompt": "x", "width": 256, "height": 256, "steps": 2}


def _settings(**kw: Any) -> ServeSettings:
    return ServeSettings(**{"engines": Path("unused"), "api_key": KEY, "warmup": "none", "batch_window_ms": 0, **kw})


async def _with_app(settings: ServeSettings, factory: Callable[[ServeSettings], Any],
                    body: Callable[[httpx.AsyncClient, Any], Any]) -> None:
    app = create_app(settings, factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            await body(client, app)


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_not_ready_while_loading_then_ready() -> None:
    loaded = threading.Event()
    fake = GatedPipeline(open_gate=True)

    def factory(settings: ServeSettings) -> GatedPipeline:
        assert loaded.wait(30)
        return fake

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["state"] == "loading"
        r = await client.post("/v1/images/generations", json=GEN)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = await client.post("/sdapi/v1/txt2img", json=A1111)
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        loaded.set()
        await app.state.service.wait_loaded()
        assert (await client.get("/ready")).status_code == 200
        r = await client.post("/v1/images/generations", json=GEN)
        assert r.status_code == 200 and len(r.json()["data"]) == 1

    asyncio.run(_with_app(_settings(), factory, body))


def test_warm_up_runs_before_ready_for_each_bucket_and_batch_size() -> None:
    """Every chosen bucket is captured at each batch size up to --max-batch while /ready is 503; /metrics shows
    the graphs and their pool from ``cuda_graph_stats()``; nothing is captured while serving."""
    entered, release = threading.Event(), threading.Event()

    class SlowWarmup(GatedPipeline):
        def warmup(self, **kw: Any) -> float:
            entered.set()
            assert release.wait(30)
            return super().warmup(**kw)

    fake = SlowWarmup(open_gate=True)

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await _until(entered.is_set)
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["state"] == "loading"
        assert (await client.post("/v1/images/generations", json=GEN)).status_code == 503
        release.set()
        await app.state.service.wait_loaded()
        assert (await client.get("/ready")).status_code == 200
        assert fake.warmed == [("256x256", 1), ("256x256", 2), ("384x192", 1), ("384x192", 2)]
        assert (await client.post("/v1/images/generations", json=GEN)).status_code == 200
        assert len(fake.warmed) == 4  # a request never warms up (captures) anything
        metrics = (await client.get("/metrics")).text
        assert "sdxl_trt_cuda_graphs 4.0" in metrics and "sdxl_trt_graph_pool_bytes 4096.0" in metrics

    asyncio.run(_with_app(_settings(warmup=("256x256", "384x192"), max_batch=2), lambda s: fake, body))
    assert fake.warm_samplers == (None, (5.0,))  # the model's own sampler, guidance on
    none = GatedPipeline(open_gate=True)

    async def skipped(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        assert (await client.get("/ready")).status_code == 200 and none.warmed == []
        assert "sdxl_trt_cuda_graphs 0.0" in (await client.get("/metrics")).text

    asyncio.run(_with_app(_settings(), lambda s: none, skipped))


def test_failed_load_is_reported_not_served() -> None:
    def factory(settings: ServeSettings) -> GatedPipeline:
        raise ManifestError("engines were built for another GPU; rebuild with: sdxl-trt build ...")

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        r = await client.get("/ready")  # its state only: why is in the log (and in the key-holders' 503s)
        assert r.status_code == 503 and r.json() == {"ready": False, "state": "failed"}
        r = await client.post("/v1/images/generations", json=GEN)
        assert r.status_code == 503 and "another GPU" in r.json()["error"]["message"]

    asyncio.run(_with_app(_settings(), factory, body))


def test_deadline_gives_504_in_each_api_shape_and_429_when_full() -> None:
    """Queued and running requests get the deadline; a full queue answers 429; a batch stuck past its deadline
    turns /ready 503 and new requests get 503 at once (the watchdog) until the engine returns."""
    fake = GatedPipeline()

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        running = asyncio.ensure_future(client.post("/v1/images/generations", json=GEN))
        await _until(fake.started.is_set)
        queued_openai = asyncio.ensure_future(client.post("/v1/images/generations", json={**GEN, "steps": 3}))
        queued_a1111 = asyncio.ensure_future(client.post("/sdapi/v1/txt2img", json={**A1111, "steps": 3}))
        await _until(lambda: app.state.service.queue_depth == 2)
        r = await client.post("/v1/images/generations", json={**GEN, "steps": 5})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        r = await queued_openai
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        r = await queued_a1111
        assert r.status_code == 504 and r.json()["error"] == "DeadlineExceeded"
        r = await running  # held by the gate past its deadline: answered, not left hanging
        assert r.status_code == 504 and "hung" in r.json()["error"]["message"]
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "past its deadline" in ready.json()["worker"]
        r = await client.post("/v1/images/generations", json=GEN)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        fake.gate.set()
        await _until(lambda: app.state.service.ready)  # the engine returned: the watchdog clears
        assert (await client.get("/ready")).status_code == 200
        assert (await client.post("/v1/images/generations", json=GEN)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'sdxl_trt_requests_total{endpoint="/sdapi/v1/txt2img",outcome="timeout"} 1.0' in metrics
        assert 'sdxl_trt_requests_total{endpoint="/v1/images/generations",outcome="overloaded"} 1.0' in metrics

    try:
        asyncio.run(_with_app(_settings(request_timeout_s=0.3, max_queue=2), lambda s: fake, body))
    finally:
        fake.gate.set()
    assert fake.ran == [["x"], ["x"]]  # the stuck one and the last one; the timed-out queued requests never ran


def test_watchdog_reports_a_stopped_worker() -> None:
    """If the batching worker ever stops without being asked to, /ready turns 503 and says so."""
    fake = GatedPipeline(open_gate=True)

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        assert (await client.post("/v1/images/generations", json=GEN)).status_code == 200
        worker = app.state.service.async_pipeline._worker
        worker.cancel()
        await asyncio.wait({worker})
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["worker"] == "the batching worker stopped"
        r = await client.post("/v1/images/generations", json=GEN)
        assert r.status_code == 503 and "worker stopped" in r.json()["error"]["message"]

    asyncio.run(_with_app(_settings(), lambda s: fake, body))


def test_images_are_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding client images is CPU work; it runs in a worker thread, never on the event loop's."""
    import io

    from PIL import Image

    from sdxl_trt.serve.apis import a1111_routes, openai_routes
    from sdxl_trt.serve.http import images_io

    fake = GatedPipeline(open_gate=True)
    threads: list[int] = []

    def recording(decode: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident())
            return decode(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(a1111_routes, "decode_b64_image", recording(images_io.decode_b64_image))
    monkeypatch.setattr(openai_routes, "open_image", recording(images_io.open_image))
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 100, 50)).save(buf, format="PNG")
    png = buf.getvalue()
    mask = io.BytesIO()
    Image.new("L", (256, 256), 255).save(mask, format="PNG")

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        loop_thread = threading.get_ident()
        r = await client.post("/sdapi/v1/img2img", json={**A1111, "init_images": [base64.b64encode(png).decode()]})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/images/edits", data={"prompt": "x", "steps": "2"},
                              files=[("image", ("i.png", png, "image/png")), ("mask", ("m.png", mask.getvalue(),
                                                                                        "image/png"))])
        assert r.status_code == 200, r.text
        assert len(threads) == 3 and loop_thread not in threads

    asyncio.run(_with_app(_settings(), lambda s: fake, body))


def test_an_unexpected_exception_anywhere_becomes_a_json_500() -> None:
    """A bug in a route (or a middleware) is answered in the API's error shape and not re-raised to the server
    (uvicorn closes a connection whose app raised, failing the client's next pooled request too)."""
    fake = GatedPipeline(open_gate=True)

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()

        async def broken() -> None:
            raise TypeError("a bug")

        app.router.add_api_route("/v1/images/broken", broken, methods=["POST"])
        app.router.add_api_route("/sdapi/v1/broken", broken, methods=["POST"])
        r = await client.post("/v1/images/broken")  # ASGITransport would raise it, had the app re-raised
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        r = await client.post("/sdapi/v1/broken")
        assert r.status_code == 500 and r.json()["error"] == "InternalError"
        metrics = (await client.get("/metrics")).text
        assert 'outcome="error"' in metrics

    asyncio.run(_with_app(_settings(), lambda s: fake, body))


def test_api_key_forms() -> None:
    basic = "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert key_matches(f"Bearer {KEY}", KEY) and key_matches(basic, KEY)
    for header in (None, "", f"Bearer {KEY}x", "Bearer", f"Token {KEY}", "Basic !!!",
                   "Basic " + base64.b64encode(KEY.encode()).decode()):
        assert not key_matches(header, KEY), header


@pytest.mark.parametrize("path", ["/v1/images/generations", "/sdapi/v1/txt2img", "/metrics", "/sdapi/v1/options"])
def test_every_api_path_needs_the_key_but_probes_do_not(path: str) -> None:
    fake = GatedPipeline(open_gate=True)

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()
        anon = {"Authorization": ""}
        method = client.post if "generations" in path or "txt2img" in path else client.get
        kwargs = {"json": GEN} if method == client.post else {}
        r = await method(path, headers=anon, **kwargs)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
        for probe in ("/health", "/ready"):
            assert (await client.get(probe, headers=anon)).status_code == 200

    asyncio.run(_with_app(_settings(), lambda s: fake, body))


def test_warmup_sampler_and_guidance_flags_reach_the_pipeline() -> None:
    """--warmup-schedulers / --warmup-guidance are parsed, checked and handed to Pipeline.warmup."""
    from sdxl_trt.cli import build_parser
    from sdxl_trt.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--engines", "e", "--warmup-schedulers", "euler,unipc",
                                      "--warmup-guidance", "5,0"])
    settings = settings_from_args(args)
    assert settings.warmup_schedulers == ("euler", "unipc") and settings.warmup_guidance == (5.0, 0.0)
    for bad in (["--warmup-schedulers", "euler,heun3"], ["--warmup-guidance", "five"], ["--warmup-guidance", "nan"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["serve", "--engines", "e", *bad])
        assert exc.value.code == 2
    fake = GatedPipeline(open_gate=True)

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        await app.state.service.wait_loaded()

    asyncio.run(_with_app(_settings(warmup="all", warmup_schedulers=("lcm",), warmup_guidance=(0.0,)),
                          lambda s: fake, body))
    assert fake.warm_samplers == (("lcm",), (0.0,))
