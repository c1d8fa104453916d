"""The ASGI app: wiring only. ``create_app(settings, pipeline_factory)`` is the one way to build it, so the CLI
and a Ray Serve deployment serve the same app.

Layers, outermost first: error guard (any exception -> a JSON error, the connection kept) -> metrics (counts
every answer) -> allowed hosts (``Host`` and a browser's ``Origin``) -> API key (before any body is read) ->
body limits (size, deadline, per-chunk timeout) -> FastAPI routes (OpenAI, A1111, ControlNet, engine facts,
probes, metrics; then, unless ``--no-ui``, the playground and /docs, which need no key). Each API's errors keep
that API's shape (``errors``); header deadlines and sizes are the protocol's (``edge``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from sdxl_trt import __version__
from sdxl_trt.errors import SdxlTrtError

from ..apis import a1111_routes, controlnet, engine_info, openai_routes
from ..core.service import PipelineFactory, Service, load_pipeline
from ..core.settings import ServeSettings
from ..ui import page
from .auth import ApiKeyMiddleware
from .endpoint import ClientGone
from .errors import ApiError, ErrorGuardMiddleware, from_exception, from_validation, render
from .hosts import AllowedHostsMiddleware
from .limits import BodyLimitMiddleware, BodyStats
from .metrics import CLIENT_CLOSED, MetricsMiddleware, ServeMetrics

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready")
TEXT_ONLY_PATHS = ("/v1/images/generations", "/sdapi/v1/txt2img")
"""Endpoints whose bodies carry no images unless the engines have ControlNets: their body limit follows the
character cap, not --max-body-mb (with ControlNets built, they take control images and --max-body-mb)."""


def create_app(settings: ServeSettings, pipeline_factory: PipelineFactory = load_pipeline) -> FastAPI:
    """A FastAPI app serving one engine directory; the engines load in the background at startup."""
    metrics = ServeMetrics()
    service = Service(settings, pipeline_factory, on_batch=metrics.observe_batch)
    metrics.bind_queue_depth(lambda: service.queue_depth)
    metrics.bind_cuda_graph_stats(service.cuda_graph_stats)
    body_stats = BodyStats()
    metrics.bind_body_bytes(lambda: body_stats.buffered_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await service.drain()

    app = FastAPI(title="sdxl-trt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics
    app.include_router(openai_routes.router)
    app.include_router(a1111_routes.router)
    app.include_router(controlnet.router)
    app.include_router(engine_info.router)
    _add_probes(app, service, metrics)
    if settings.ui:  # last: an API request never reaches these routes (the first match wins)
        page.mount(app, bearer_auth=settings.api_key is not None)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                       chunk_timeout_s=settings.chunk_timeout_s, stats=body_stats, text_paths=TEXT_ONLY_PATHS,
                       text_max_bytes=settings.max_text_body_bytes,
                       text_only=lambda: not controlnet.controlnet_names(service.pipeline))
    open_paths = (*OPEN_PATHS, *page.paths()) if settings.ui else OPEN_PATHS  # the pages carry no secret
    app.add_middleware(ApiKeyMiddleware, key=settings.api_key, open_paths=open_paths)
    app.add_middleware(AllowedHostsMiddleware, allowed=settings.hosts_allowed)
    routes = [*openai_routes.router.routes, *a1111_routes.router.routes, *controlnet.router.routes,
              *engine_info.router.routes, *app.routes]
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints={getattr(r, "path", "") for r in routes})
    app.add_middleware(ErrorGuardMiddleware)
    return app


def _add_probes(app: FastAPI, service: Service, metrics: ServeMetrics) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        """Alive: the process answers. Not a statement about the engines (that is /ready)."""
        return {"status": "ok", "state": service.state}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 once the engines are loaded and warm; 503 while loading, after a failed load, while draining, or
        when the watchdog finds the worker stopped or stuck past a batch's deadline. It says only its state (no
        key is needed): why a load failed is in the server log."""
        body: dict[str, object] = {"ready": service.ready, "state": service.state}
        if service.async_pipeline is not None:
            body["queue_depth"] = service.queue_depth
            body["worker"] = service.worker_health
        return JSONResponse(body, status_code=200 if service.ready else 503,
                            headers=None if service.ready else {"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        return render(request.url.path, exc if isinstance(exc, ApiError) else from_exception(exc))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return render(request.url.path, from_validation(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                       headers=dict(exc.headers or {}))
        return render(request.url.path, err)

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(SdxlTrtError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientGone, client_gone)  # anything else: ErrorGuardMiddleware
