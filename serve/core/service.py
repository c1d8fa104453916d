"""``Service``: the engine behind the HTTP APIs and its life: loading -> ready -> draining -> stopped.

Loading happens in the background so ``/health`` answers at once and ``/ready`` says 503 until the engines are
loaded and warm. A sticky CUDA error while serving turns it "failed" too (:attr:`Service.device_error`): the
server then exits non-zero so that the orchestrator replaces the process. The app (and a Ray Serve replica
later) holds one ``Service``; no web library here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from sdxl_trt.errors import SdxlTrtError
from sdxl_trt.request import GenerationRequest, GenerationResult

from .async_pipeline import AsyncPipeline, BatchReport
from .errors import NotReadyError, ShuttingDownError
from .pipeline_like import PipelineLike
from .settings import ServeSettings

log = logging.getLogger(__name__)

State = Literal["starting", "loading", "ready", "draining", "stopped", "failed"]
PipelineFactory = Callable[[ServeSettings], PipelineLike]


def load_pipeline(settings: ServeSettings) -> PipelineLike:
    """The default factory: the engine directory's pipeline on ``settings.device``."""
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(settings.engines, device=settings.device, max_steps=settings.max_steps,
                         lora_dirs=settings.lora_dirs)


class Service:
    def __init__(self, settings: ServeSettings, pipeline_factory: PipelineFactory = load_pipeline, *,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self.settings = settings
        self._factory = pipeline_factory
        self._on_batch = on_batch
        self.state: State = "starting"
        self.error: str | None = None
        self.device_error: str | None = None  # a sticky CUDA error ended serving (the process must be replaced)
        self.pipeline: PipelineLike | None = None
        self.async_pipeline: AsyncPipeline | None = None
        self._load_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Begin loading in the background (call from the event loop, e.g. the ASGI lifespan)."""
        if self._load_task is None:
            self.state = "loading"
            self._load_task = asyncio.get_running_loop().create_task(self._load(), name="sdxl-trt-load")

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await asyncio.wait({self._load_task})

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            pipeline = await asyncio.to_thread(self._factory, self.settings)
            await asyncio.to_thread(self._warm_up, pipeline)
        except Exception as e:  # reported on /ready and by the CLI; the process cannot serve without engines
            log.error("loading the engines failed: %s", e, exc_info=not isinstance(e, SdxlTrtError))
            self.error = f"loading the engines failed: {e}"
            self.state = "failed"
            return
        s = self.settings
        self.pipeline = pipeline
        self.async_pipeline = AsyncPipeline(
            pipeline, max_batch=s.max_batch, batch_window_ms=s.batch_window_ms, max_queue=s.max_queue,
            max_images=s.max_images, max_steps=s.max_steps, default_timeout_s=s.request_timeout_s,
            on_batch=self._on_batch, on_device_failure=self._device_failed)
        if self.state == "loading":
            self.state = "ready"
            log.info("ready in %.1f s: max batch %d, batch window %g ms, queue %d", time.perf_counter() - t0,
                     self.async_pipeline.max_batch, s.batch_window_ms, s.max_queue)

    def _device_failed(self, message: str) -> None:
        self.device_error = message
        self.error = f"the GPU hit an unrecoverable CUDA error ({message}); the process exits to be replaced"
        self.state = "failed"

    def _warm_up(self, pipeline: PipelineLike) -> None:
        """Capture every chosen bucket at each batch size up to the service's max batch, then forbid capture,
        so no request ever waits behind a capture (or first-call initialisation)."""
        s = self.settings
        buckets = s.warmup_buckets
        if buckets == []:
            log.info("warm-up skipped (--warmup none): the first request of each shape pays for its capture")
            return
        largest = min(s.max_batch or pipeline.max_batch, pipeline.max_batch)
        sizes = list(range(1, largest + 1))
        t0 = time.perf_counter()
        pipeline.warmup(buckets=buckets, batch_sizes=sizes, steps=s.warmup_steps,
                        refiner=pipeline.has_refiner, schedulers=s.warmup_schedulers,
                        guidance_scales=s.warmup_guidance, prompt_chunks=s.warmup_prompt_chunks)
        stats = pipeline.cuda_graph_stats()
        log.info("warm-up of %s at batch sizes 1..%d took %.2f s: %d CUDA graphs, pool %.1f MB",
                 "every built bucket" if buckets is None else ", ".join(buckets), largest,
                 time.perf_counter() - t0, stats["graphs"], stats["pool_bytes"] / 2**20)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new work, let queued and running work finish; True when all of it did in time."""
        if self.state in ("starting", "loading", "ready"):
            self.state = "draining"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        ok = True
        if self.async_pipeline is not None:
            timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
            ok = await self.async_pipeline.aclose(timeout)
        if self.state != "failed":
            self.state = "stopped"
        return ok

    # ------------------------------------------------------------------ work
    @property
    def ready(self) -> bool:
        """Ready to take traffic: loaded, not draining, and the worker alive and not stuck (the watchdog)."""
        return self.state == "ready" and (self.async_pipeline is None or self.async_pipeline.healthy)

    @property
    def worker_health(self) -> str:
        return self.async_pipeline.health() if self.async_pipeline is not None else "ok"

    def require_pipeline(self) -> PipelineLike:
        """The loaded pipeline (for bucket lists and model names), or :class:`NotReadyError`."""
        if self.pipeline is None:
            raise NotReadyError(self.error or "the engines are still loading; retry shortly")
        return self.pipeline

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.state in ("draining", "stopped"):
            raise ShuttingDownError("the service is shutting down and accepts no new requests")
        if self.state != "ready" or self.async_pipeline is None:
            raise NotReadyError(self.error or "the engines are still loading; retry shortly")
        if not self.async_pipeline.healthy:  # the watchdog: refuse at once rather than queue behind a hung engine
            raise NotReadyError(f"not serving right now: {self.async_pipeline.health()}; retry shortly")
        return await self.async_pipeline.generate(request)

    def cuda_graph_stats(self) -> dict[str, int]:
        """The pipeline's captured graphs and their pool's bytes (zeros before loading), for /metrics."""
        if self.pipeline is None:
            return {"graphs": 0, "pool_bytes": 0}
        return self.pipeline.cuda_graph_stats()

    @property
    def queue_depth(self) -> int:
        return self.async_pipeline.queue_depth if self.async_pipeline is not None else 0
