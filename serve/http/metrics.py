"""Prometheus metrics on a per-app registry (two apps in one process, e.g. tests or Ray replicas, never clash).

``sdxl_trt_requests_total{endpoint,outcome}`` and ``sdxl_trt_request_seconds{endpoint}`` come from the
ASGI middleware below (every answer counts, refusals included); batch sizes, stage times and images from
the AsyncPipeline's per-batch report; ``sdxl_trt_controlnet_requests_total{controlnet}`` per answered request
that used each ControlNet; the queue depth and the CUDA graph count and pool
size are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.async_pipeline import BatchReport

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"

OUTCOMES = {200: "ok", 400: "invalid", 401: "unauthorized", 404: "not_found", 405: "not_found", 413: "too_large",
            429: "overloaded", CLIENT_CLOSED: "cancelled", 503: "unavailable", 504: "timeout"}


def outcome(status: int) -> str:
    if status in OUTCOMES:
        return OUTCOMES[status]
    return "ok" if status < 400 else "invalid" if status < 500 else "error"


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdxl_trt_requests", "HTTP requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.request_seconds = Histogram("sdxl_trt_request_seconds", "Time from request to answer",
                                         ["endpoint"], buckets=_SECONDS, registry=r)
        self.queue_depth = Gauge("sdxl_trt_queue_depth", "Requests waiting for the engine", registry=r)
        self.batch_size = Histogram("sdxl_trt_batch_size", "Images per batch the engine ran", buckets=_BATCH,
                                    registry=r)
        self.stage_seconds = Histogram("sdxl_trt_stage_seconds", "Seconds per pipeline stage per batch", ["stage"],
                                       buckets=_SECONDS, registry=r)
        self.images = Counter("sdxl_trt_images", "Images generated", registry=r)
        self.body_bytes = Gauge("sdxl_trt_request_body_bytes", "Bytes of request bodies being received now",
                                registry=r)
        self.cuda_graphs = Gauge("sdxl_trt_cuda_graphs", "CUDA graphs captured (all at warm-up)", registry=r)
        self.lora_switch_seconds = Histogram("sdxl_trt_lora_switch_seconds",
                                             "Seconds to switch the engines' weights to a batch's LoRA set",
                                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                                             registry=r)
        self.controlnet_requests = Counter("sdxl_trt_controlnet_requests",
                                           "Generation requests answered that used each ControlNet",
                                           ["controlnet"], registry=r)
        self.cached_steps = Counter("sdxl_trt_cached_steps",
                                    "Denoising steps that ran the step-caching shallow UNet (DeepCache), per batch",
                                    registry=r)
        self.graph_pool_bytes = Gauge("sdxl_trt_graph_pool_bytes", "Bytes of the CUDA graphs' shared memory pool",
                                      registry=r)

    def bind_queue_depth(self, read: Callable[[], float]) -> None:
        self.queue_depth.set_function(read)

    def bind_body_bytes(self, read: Callable[[], float]) -> None:
        self.body_bytes.set_function(read)

    def bind_cuda_graph_stats(self, read: Callable[[], dict[str, int]]) -> None:
        self.cuda_graphs.set_function(lambda: read()["graphs"])
        self.graph_pool_bytes.set_function(lambda: read()["pool_bytes"])

    def observe_batch(self, report: BatchReport) -> None:
        self.batch_size.observe(report.images)
        self.images.inc(report.images)
        for stage, seconds in report.timings.items():
            if seconds > 0:
                self.stage_seconds.labels(stage=stage).observe(seconds)
        self.cached_steps.inc(report.steps_run.get("unet_cached", 0))
        if report.timings.get("lora_switch", 0.0) > 0:
            self.lora_switch_seconds.observe(report.timings["lora_switch"])

    def observe_controlnets(self, names: Collection[str]) -> None:
        for name in names:
            self.controlnet_requests.labels(controlnet=name).inc()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome(status)).inc()
        self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every answer by endpoint and outcome; paths outside ``endpoints`` count as ``other``."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics, endpoints: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = CLIENT_CLOSED

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            status = 500
            raise
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)
