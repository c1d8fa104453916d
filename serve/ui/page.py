"""``mount(app, ...)``: ``GET /`` (the playground), its static files, ``GET /docs`` and ``GET /openapi.json``.

Rules of this module (keep them):

* Nothing here is on an API's request path: the routes are added after every API route (Starlette stops at the
  first route that matches, so an API request never reaches these) and no middleware is added; the headers
  below ride only on these responses.
* Every response carries a Content-Security-Policy that allows its own origin only and no inline script; text
  from requests and responses is set as text by the page's script, never parsed as HTML.
* Everything is served from package data read once at startup: swagger-ui's files come from the
  ``fastapi-offline`` package (swagger-ui 5, which renders FastAPI's OpenAPI 3.1; the ``swagger-ui-bundle``
  package's 4.15 does not), never from a CDN, so the pages fetch nothing from another origin.
* The pages carry no secret: with ``--api-key`` they stay open (the playground asks for the key and keeps it
  in the tab's sessionStorage); ``/openapi.json`` then declares bearer auth so /docs' "Authorize" works.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from sdxl_trt.errors import SdxlTrtError

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = PAGE_CSP.replace("img-src 'self' blob:", "img-src 'self' data:")  # swagger-ui's icons are data: SVGs
"""Only this origin, no inline script; the page shows its images as blob: URLs."""

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-cache"}

_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
_OWN = ("app.css", "app.js", "docs.js", "icon.svg")
_SWAGGER = ("swagger-ui-bundle.js", "swagger-ui.css")


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str


def paths() -> tuple[str, ...]:
    """Every path :func:`mount` serves: open without the API key (they carry no secret)."""
    return ("/", "/docs", "/openapi.json", *(f"/ui/{n}" for n in _OWN), *(f"/ui/swagger/{n}" for n in _SWAGGER))


def _read(name: str) -> _File:
    body = (resources.files("sdxl_trt.serve.ui") / "static" / name).read_bytes()
    return _File(body, _TYPES[Path(name).suffix])


def _swagger_dir() -> Path:
    """swagger-ui's files as the ``fastapi-offline`` package ships them (only its files are used)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise SdxlTrtError("the /docs page needs swagger-ui's files from the fastapi-offline package (part of the "
                           "serve extra): pip install 'sdxl-trt[serve]', or start with --no-ui")
    return Path(spec.origin).parent / "static"


def mount(app: FastAPI, *, bearer_auth: bool) -> None:
    """Add the playground and the OpenAPI page to ``app``; call after every API route is added."""
    files = {"/": _read("index.html"), "/docs": _read("docs.html"), **{f"/ui/{n}": _read(n) for n in _OWN}}
    swagger = _swagger_dir()
    for name in _SWAGGER:
        files[f"/ui/swagger/{name}"] = _File((swagger / name).read_bytes(), _TYPES[Path(name).suffix])

    for path, file in files.items():
        _add_file(app, path, file, DOCS_CSP if path.startswith(("/docs", "/ui/swagger", "/ui/docs")) else PAGE_CSP)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(_openapi(app, bearer_auth), headers={**SECURITY_HEADERS, "Content-Security-Policy":
                                                                 PAGE_CSP})

    log.info("playground on / and the OpenAPI page on /docs (--no-ui turns them off)")


def _add_file(app: FastAPI, path: str, file: _File, csp: str) -> None:
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": csp}

    async def serve() -> Response:
        return Response(file.body, media_type=file.media_type, headers=headers)

    app.add_api_route(path, serve, methods=["GET"], include_in_schema=False, name=f"ui:{path}")


def _openapi(app: FastAPI, bearer_auth: bool) -> dict[str, Any]:
    """FastAPI's schema of both APIs (built once, cached by FastAPI), with bearer auth declared when a key is
    required, so /docs' "Authorize" sends it."""
    schema = app.openapi()
    if not bearer_auth:
        return schema
    components = {**schema.get("components", {}),
                  "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                 "description": "the server's --api-key"}}}
    return {**schema, "components": components, "security": [{"apiKey": []}]}
