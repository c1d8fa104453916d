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


MAX_JSON_DEPTH = 200
"""Nesting of a request body (pydantic-core's own limit; a deeper body is a 400, parsed by either parser)."""
_SURROGATE_ERRORS = ("lone leading surrogate", "unexpected end of hex escape", "invalid unicode code point")
"""pydantic-core's messages for a lone surrogate (escaped, or UTF-8-encoded), which ``json`` accepts."""


class _FastJsonRequest(Request):
    """Parses the JSON body with pydantic-core (about 20x faster than ``json.loads`` on a 15 MB prompt, so an
    over-long body is refused in milliseconds). Only text pydantic-core refuses for a lone surrogate falls back
    to ``json.loads`` (to be refused by name in ``inputs.check_texts``, as the field it is in); anything else it
    refuses (bad JSON, nesting past its depth limit, a number too long) is a 400, and so is a fallback body
    nested past the same depth, so no body is accepted that the response could not serialise."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=True)
            except ValueError as e:
                if not any(s in str(e) for s in _SURROGATE_ERRORS):
                    raise json.JSONDecodeError(str(e), body.decode("utf-8", "replace"), 0) from None
                self._json = _fallback_json(body)
        return self._json


def _fallback_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is int()'s digit limit
        raise json.JSONDecodeError(str(e), "", 0) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


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
    service = service_of(request)
    if gen.loras and service.async_pipeline is not None:
        # Checking a LoRA set reads its files (seconds for a large one, and diffusers' import the first time):
        # done here in a thread, the files (and failures) are cached, so the queue's own check on the event
        # loop finds them read.
        await asyncio.to_thread(service.async_pipeline.check, gen)
    work = asyncio.ensure_future(service.generate(gen))
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
