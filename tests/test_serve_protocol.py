"""serve's ``PipelineLike`` is all serve reads of a pipeline: the real pipeline and every test double implement
it whole (members and call signatures), a double missing a member fails the check, and the HTTP app over a
proxy that answers nothing but the protocol's members serves both APIs (so no read goes past it)."""

from __future__ import annotations

import asyncio
import base64
import inspect
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve_double import MisbehavingPipeline
from support.serve_fakes import GatedPipeline

from sdxl_trt.serve.core.pipeline_like import LoraListing, ModelFacts, PipelineLike, ProgressReader
from sdxl_trt.serve.core.settings import ServeSettings
from sdxl_trt.serve.http.app import create_app


def _members(protocol: type) -> list[str]:
    return sorted(n for n in vars(protocol) if not n.startswith("_"))


def _parameters(fn: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _assert_implements(obj: Any, protocol: type) -> None:
    for name in _members(protocol):
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {protocol.__name__}.{name}"
        declared = vars(protocol)[name]
        if callable(declared) and not isinstance(declared, property):
            wanted = _parameters(declared)
            have = dict(_parameters(getattr(obj, name)))
            for pname, kind in wanted:  # the protocol's call works: each parameter, of the same kind
                assert have.get(pname) == kind, f"{type(obj).__name__}.{name}: {pname} is {have.get(pname)}, " \
                                                f"the protocol has {kind}"
    assert isinstance(obj, protocol), type(obj).__name__


@pytest.mark.parametrize("double", [GatedPipeline, MisbehavingPipeline])
def test_the_doubles_implement_the_whole_protocol(double) -> None:
    pipeline = double()
    _assert_implements(pipeline, PipelineLike)
    _assert_implements(pipeline.manifest, ModelFacts)
    _assert_implements(pipeline.loras, LoraListing)


def test_the_real_pipeline_implements_the_whole_protocol(tiny_pipeline) -> None:
    _assert_implements(tiny_pipeline, PipelineLike)
    _assert_implements(tiny_pipeline.manifest, ModelFacts)
    _assert_implements(tiny_pipeline.loras, LoraListing)


def test_a_double_missing_a_member_fails_the_check() -> None:
    lacking = type("Lacking", (), {k: v for k, v in vars(GatedPipeline).items() if k != "default_scheduler"})
    assert not isinstance(lacking(), PipelineLike)
    with pytest.raises(AssertionError, match="default_scheduler"):
        _assert_implements(lacking(), PipelineLike)


class _Only:
    """A proxy that answers the members of ``protocol`` (wrapping nested ones) and raises for anything else.
    ``warmup`` is recorded, not run: the shared session pipeline must not have capture forbidden."""

    NESTED = {"manifest": ModelFacts, "loras": LoraListing, "progress": ProgressReader}

    def __init__(self, target: Any, protocol: type) -> None:
        self._target, self._allowed = target, set(_members(protocol))
        self.warmed: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        if name not in self._allowed:
            raise AttributeError(f"serve read {name!r}, which {self._target.__class__.__name__}'s protocol does "
                                 "not declare")
        if name == "warmup":
            return lambda **kw: self.warmed.append(kw) or 0.0
        value = getattr(self._target, name)
        return _Only(value, self.NESTED[name]) if name in self.NESTED else value


def test_the_app_reads_nothing_past_the_protocol(tiny_pipeline) -> None:
    strict = _Only(tiny_pipeline, PipelineLike)
    settings = ServeSettings(engines=Path("unused"), warmup=("256x256",), warmup_steps=1, batch_window_ms=0)

    async def main() -> None:
        app = create_app(settings, lambda s: strict)
        async with app.router.lifespan_context(app):
            await app.state.service.wait_loaded()
            assert app.state.service.state == "ready", app.state.service.error
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
                for path in ("/ready", "/metrics", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/loras",
                             "/sdapi/v1/samplers", "/controlnet/model_list"):
                    r = await client.get(path)
                    assert r.status_code == 200, (path, r.text)
                r = await client.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "width": 256,
                                                                 "height": 256, "steps": 1, "seed": 1})
                assert r.status_code == 200, r.text
                assert base64.b64decode(r.json()["images"][0])[:4] == b"\x89PNG"
                r = await client.post("/v1/images/generations", json={"prompt": "a boat", "size": "256x256",
                                                                      "steps": 1, "seed": 2})
                assert r.status_code == 200, r.text

    asyncio.run(main())
    assert strict.warmed and strict.warmed[0]["refiner"] is True  # read through has_refiner
