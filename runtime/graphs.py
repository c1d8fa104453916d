"""CUDA graphs of the pipeline: a table from shape key to captured graph, all in one memory pool.

Rules (vLLM's cudagraph_utils, the next engineer: keep them):

* A key names a *shape*, never a request's settings: a denoising step's is ``StepShape.graph_key``
  (sdxl_trt/step_shape.py: UNet, bucket, images, guidance on/off, prompt chunks, inpainting, sampler,
  ControlNet signature), a text encoder's (encoder, rows). What a request changes (step count, strength,
  refiner split, seeds, prompts) lives in fixed buffers the graph reads, so the number of graphs is bounded
  by the built buckets and batch sizes.
* Every graph captures into one shared pool (``torch.cuda.graph_pool_handle()``): graphs run one after
  another, never concurrently, so their intermediates can share memory instead of a private pool each.
* Capture happens during warm-up only; afterwards :attr:`CudaGraphs.capture_allowed` is False and an
  unknown key runs eagerly (correct, slower, logged once) instead of stalling a request behind a capture.
* Only engines that enqueue on the stream they are given may be captured (``Engine.graph_safe``): ONNX
  Runtime runs on its own stream, so inside a capture it would record nothing and a replay would reuse
  a stale output.
* Capture snapshots the tensors the captured work mutates and restores them afterwards, so capturing
  does not advance a request. The eager warm-up runs before capture restore the snapshot after each run:
  they never read past the first row of a schedule (a one-step schedule has one row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import torch

log = logging.getLogger(__name__)

WARMUP_RUNS = 2
"""Eager runs on a side stream before capture: lazy initialisation (cuDNN/cuBLAS handles, autotuning,
TensorRT's first enqueue) must not happen while capturing."""


class CudaGraphs:
    """Captured graphs of one pipeline on one device (inactive on the CPU or when disabled)."""

    def __init__(self, device: torch.device, *, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.capture_allowed = True
        self._warned: set[Hashable] = set()
        self._recapture: set[Hashable] = set()  # keys dropped by invalidate(): captured again at next use

    def get(self, key: Hashable, work: Callable[[], None], *, graph_safe: bool,
            mutable: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph | None:
        """The graph of ``key`` (captured now from ``work`` if capture is allowed), or None: run eagerly.

        ``mutable``: every tensor ``work`` changes in place that must keep its value (latents, step index,
        scheduler state); the capture leaves them as they were.
        """
        if not (self.enabled and graph_safe):
            return None
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        if not self.capture_allowed and key not in self._recapture:
            if key not in self._warned:
                log.warning("no CUDA graph was captured for %s at warm-up; running it eagerly", key)
                self._warned.add(key)
            return None
        return self._capture(key, work, mutable)

    def _capture(self, key: Hashable, work: Callable[[], None], mutable: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
        saved = [t.clone() for t in mutable]

        def restore() -> None:
            for t, s in zip(mutable, saved, strict=True):
                t.copy_(s)

        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                work()
                restore()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            work()
        restore()
        self.graphs[key] = graph
        self._recapture.discard(key)
        log.info("captured CUDA graph %d for %s", len(self.graphs), key)
        return graph

    def invalidate(self, components: set[str]) -> list[Hashable]:
        """Drop every graph whose key names one of ``components`` (the graphs that enqueue their engines) and
        let each be captured again at its next use, even after warm-up. A TensorRT refit (a LoRA switch) calls
        this: a graph replays the kernels and weight pointers it recorded, so one captured before a refit is not
        proven to see the new weights. Returns the dropped keys."""
        dropped = [k for k in self.graphs if _names(k) & components]
        for k in dropped:
            del self.graphs[k]
            self._recapture.add(k)
        if dropped:
            log.info("dropped %d CUDA graph(s) enqueueing %s; they are captured again at their next use",
                     len(dropped), sorted(components))
        return dropped

    def forbid_capture(self) -> None:
        self.capture_allowed = False

    def pool_bytes(self) -> int:
        """Bytes the shared pool holds on the device (its segments in the caching allocator)."""
        if self.pool is None or not self.graphs:
            return 0
        pool = tuple(self.pool)
        return sum(int(seg.get("total_size", 0)) for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self.graphs), "pool_bytes": self.pool_bytes()}


def _names(key: Hashable) -> set[str]:
    """Every string in a (nested) graph key: the component names it mentions."""
    if isinstance(key, str):
        return {key}
    if isinstance(key, tuple):
        return set().union(*(_names(k) for k in key)) if key else set()
    return set()
