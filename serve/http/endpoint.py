"""What every generation endpoint does around its API's translation: find the service, run the request
while watching for the client to go away, and encode the images off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from sdxl_trt.errors import SdxlTrtError
from sdxl_trt.request import GenerationRequest, GenerationResult

from ..core.service import Service
from .errors import from_exception
from .images_io import png_b64

log = logging.getLogger(__name__)


class _FastJsonRequest(Request):
    """Parses the JSON body with pydantic-core (about 20x faster than ``json.loads`` on a 15 MB prompt, so an
    over-long body is refused in milliseconds); text ``json`` accepts that pydantic-core does not (a lone
    surrogate escape) falls back to ``json.loads`` and is then refused by name in ``inputs.check_texts``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=True)
            except ValueError:
                self._json = json.loads(body)
        return self._json


class FastJsonRoute(APIRoute):
    """The API routers' route class: FastAPI's route over :class:`_FastJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_FastJsonRequest(request.scope, request.receive))

        return route


class ClientGone(Exception):
    """The client disconnected while its request waited or ran; nobody is left to answer."""


def service_of(request: Request) -> Service:
    return request.app.state.service


def max_pixels(service: Service) -> int:
    """Largest decoded client image accepted: four times the largest bucket (resizing more is pointless)."""
    pipeline = service.require_pipeline()
    return 4 * max(b.width * b.height for b in pipeline.buckets)


async def generate(request: Request, gen: GenerationRequest) -> GenerationResult:
    """Run ``gen``; if the client disconnects first, cancel it (a queued request is then dropped unrun)."""
    work = asyncio.ensure_future(service_of(request).generate(gen))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            try:
                result = work.result()
                if gen.controlnets and hasattr(request.app.state, "metrics"):
                    request.app.state.metrics.observe_controlnets([u.name for u in gen.controlnets])
                return result
            except SdxlTrtError:
                raise
            except Exception as e:  # a bug or an engine failure: logged once, answered as a plain 500
                raise from_exception(e) from None
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        log.info("client went away; its request was cancelled")
        raise ClientGone()
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def encode_pngs(result: GenerationResult) -> list[str]:
    """PNG base64 per image, with its generation parameters in the PNG's text chunks."""

    def encode() -> list[str]:
        out = []
        for k, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            params: dict[str, Any] = {**result.parameters, "seed": seed, "image_index": k}
            out.append(png_b64(image, params))
        return out

    return await asyncio.to_thread(encode)
