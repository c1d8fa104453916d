"""The service over the runtime: ``AsyncPipeline`` (batching queue, deadlines, backpressure, drain) for services
that embed the engine, and ``sdxl-trt serve``: OpenAI Images and AUTOMATIC1111 APIs, probes and Prometheus
metrics over one ``AsyncPipeline`` (``app.create_app``).

Modules: ``async_pipeline`` (no web library), ``service`` (load, warm up, drain), ``settings``; the HTTP edge:
``app`` (wiring), ``openai_api``/``a1111_api`` (request and response models), ``openai_routes``/
``a1111_routes`` (translation into one ``GenerationRequest``), ``samplers`` (A1111 names), ``images_io``
(checked image decoding), ``auth``, ``limits``, ``metrics``, ``http_errors``, ``server`` and ``cli``.
Importing this package imports no web library; only the HTTP modules need the ``[serve]`` extra.
"""

from __future__ import annotations

from .core.async_pipeline import AsyncPipeline, AsyncPipelineStats, BatchReport
from .core.errors import DeadlineExceededError, NotReadyError, OverloadedError, ServeError, ShuttingDownError
from .core.pipeline_like import PipelineLike

__all__ = ["AsyncPipeline", "AsyncPipelineStats", "BatchReport", "DeadlineExceededError", "NotReadyError",
           "OverloadedError", "PipelineLike", "ServeError", "ShuttingDownError"]
