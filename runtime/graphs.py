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
* Each instance captures on a stream of its own device (``torch.cuda.graph``'s default capture stream is
  one per process, made on whichever GPU captured first: a pipeline on a second GPU would record nothing).
* On the CPU, graphs can be *emulated* when asked (``emulate=True``; ``Pipeline.load(cuda_graphs="emulate")``),
  never by default: runtime/graph_emulation.py records the work's aten calls and replays them with a CUDA
  graph's semantics, so the captured-step path and everything above runs in CI. Keys, the pool, warm-up
  capture and ``graph_safe`` are the same code on both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeAlias

import torch

from . import graph_emulation

log = logging.getLogger(__name__)

GRAPH_MODES = ("on", "off", "emulate")
"""``Pipeline.load(cuda_graphs=)``: CUDA graphs on a CUDA device (nothing on the CPU), none, or emulated on the
CPU (tests of the graph path; slower than eager)."""


def graph_mode(cuda_graphs: str | None, use_cuda_graphs: bool) -> str:
    """The mode of ``cuda_graphs`` (one of GRAPH_MODES), else ``use_cuda_graphs``' (the older flag)."""
    if cuda_graphs is None:
        return "on" if use_cuda_graphs else "off"
    if cuda_graphs not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}, got {cuda_graphs!r}")
    if not use_cuda_graphs and cuda_graphs != "off":
        raise ValueError(f"use_cuda_graphs=False contradicts cuda_graphs={cuda_graphs!r}; pass one of them")
    return cuda_graphs

WARMUP_RUNS = 2
"""Eager runs on a side stream before capture: lazy initialisation (cuDNN/cuBLAS handles, autotuning,
TensorRT's first enqueue) must not happen while capturing."""


Graph: TypeAlias = torch.cuda.CUDAGraph | graph_emulation.EmulatedGraph


class CudaGraphs:
    """Captured graphs of one pipeline on one device (inactive on the CPU unless emulated, or when disabled)."""

    def __init__(self, device: torch.device, *, enabled: bool, emulate: bool = False) -> None:
        if emulate and device.type != "cpu":
            raise ValueError(f"CUDA graphs are emulated on the CPU only, not on {device}; on a GPU use real ones "
                             "(cuda_graphs='on')")
        self.device = device
        self.emulated = enabled and emulate
        self.enabled = enabled and (device.type == "cuda" or self.emulated)
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None
        if self.emulated:
            self.pool = graph_emulation.graph_pool_handle()
            log.warning("CUDA graphs are emulated on %s: the graph path as a GPU runs it, for tests (slower than "
                        "eager)", device)
        elif self.enabled:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)
        self.graphs: dict[Hashable, Graph] = {}
        self.capture_allowed = True
        self._warned: set[Hashable] = set()
        self._recapture: set[Hashable] = set()  # keys dropped by invalidate(): captured again at next use

    def get(self, key: Hashable, work: Callable[[], None], *, graph_safe: bool,
            mutable: Sequence[torch.Tensor]) -> Graph | None:
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

    def _capture(self, key: Hashable, work: Callable[[], None], mutable: Sequence[torch.Tensor]) -> Graph:
        saved = [t.clone() for t in mutable]

        def restore() -> None:
            for t, s in zip(mutable, saved, strict=True):
                t.copy_(s)

        graph: Graph
        if self.emulated:
            for _ in range(WARMUP_RUNS):  # as on CUDA, without streams
                work()
                restore()
            graph = graph_emulation.EmulatedGraph()
            try:
                with graph_emulation.graph(graph, pool=self.pool):
                    work()
            finally:
                restore()  # a refused capture leaves the request's state as it was, too
        else:
            assert self.stream is not None
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_RUNS):
                    work()
                    restore()
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                work()
            restore()
        self.graphs[key] = graph
        self._recapture.discard(key)
        log.info("captured %sCUDA graph %d for %s", "emulated " if self.emulated else "", len(self.graphs), key)
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
        """Bytes the shared pool holds on the device (its segments in the caching allocator; 0 when emulated)."""
        if self.pool is None or not self.graphs or self.emulated:
            return 0
        pool = tuple(self.pool)
        return sum(int(seg.get("total_size", 0)) for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def stats(self) -> dict[str, int]:
        """Graphs captured and the pool's bytes; ``emulated``: whether they are CPU emulations."""
        return {"graphs": len(self.graphs), "pool_bytes": self.pool_bytes(), "emulated": self.emulated}


def _names(key: Any) -> set[str]:
    """Every string in a (nested) graph key, a denoising step's ``GraphKey`` (a dataclass) included: the
    component names it mentions (its UNet and ControlNets)."""
    if isinstance(key, str):
        return {key}
    if dataclasses.is_dataclass(key) and not isinstance(key, type):
        key = tuple(getattr(key, f.name) for f in dataclasses.fields(key))
    if isinstance(key, tuple):
        return set().union(*(_names(k) for k in key)) if key else set()
    return set()
