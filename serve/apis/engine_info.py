"""``GET /info``: the engines' facts a client needs to build a request these engines can run, read-only.

What ``sdxl-trt info`` prints about an engine directory, as the running service sees it: built sizes, backend,
device, precision, the model and refiner, ControlNets, LoRAs, and the service's limits. The playground page
builds its form from it (the samplers, schedules and LoRAs also come from their A1111 endpoints). Optional
features appear only when the engines have them: ``cache_branches`` (step caching) is absent, not empty, on
engines built without it, so a client reads a missing field as "no caching".
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from sdxl_trt import __version__

from ..http import endpoint
from . import samplers
from .a1111_routes import model_info
from .controlnet import controlnet_names
from .extras import MAX_LORAS, available_loras

router = APIRouter(tags=["Engines"])


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    """The built buckets, backend, device and limits of the loaded engines (503 while they load)."""
    service = endpoint.service_of(request)
    pipeline = service.require_pipeline()
    settings = service.settings
    default_scheduler = pipeline.default_scheduler
    sampler = next((s.name for s in samplers.available_samplers() if s.default == default_scheduler),
                   "Euler a")
    facts: dict[str, Any] = {
        "version": __version__,
        "backend": pipeline.backend,
        "device": str(pipeline.device),
        "precision": pipeline.manifest.precision,
        "model": model_info(pipeline),
        "refiner": model_info(pipeline, "refiner"),
        "buckets": [str(b) for b in pipeline.buckets],
        "max_batch": service.async_pipeline.max_batch if service.async_pipeline is not None else pipeline.max_batch,
        "max_images": settings.max_images,
        "max_steps": min(settings.max_steps, pipeline.max_steps),
        "max_prompt_chars": settings.max_prompt_chars,
        "default_scheduler": default_scheduler,
        "default_sampler": sampler,
        "controlnets": controlnet_names(pipeline),
        "loras": sorted(available_loras(pipeline)),
        "max_loras": MAX_LORAS,
    }
    if pipeline.cache_branches:
        facts["cache_branches"] = [int(b) for b in pipeline.cache_branches]
    return facts
