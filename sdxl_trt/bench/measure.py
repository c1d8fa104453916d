"""Timers and memory probes that tell the truth on a GPU.

* Every timed region is bracketed by device synchronisation: CUDA events recorded on the current stream
  (the one the runtime enqueues on), read after the end event completes. A host clock without a sync
  would stop while the GPU is still working.
* Memory is measured per pipeline as deltas from a baseline taken with that pipeline's predecessor gone
  (``empty_cache`` first): the caching allocator's peak reserved and allocated bytes above the baseline,
  and the device-wide used bytes (``cudaMemGetInfo``) above the baseline, which also sees allocations
  outside torch's allocator (TensorRT's, cuDNN's). Never a process-wide peak with two pipelines resident.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` takes, synchronised at both ends (CUDA events on a GPU), and its result."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0, out


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """p50 / p90 / min / mean over the timed runs (p90 by nearest rank), plus the raw values."""
    s = sorted(seconds)
    if not s:
        raise ValueError("no timed runs")
    return {"p50_s": statistics.median(s), "p90_s": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
            "min_s": s[0], "mean_s": statistics.fmean(s), "runs": len(s), "latencies_s": s}


@dataclass
class MemoryProbe:
    """Peak device memory of one pipeline, as deltas above the moment :meth:`start` ran (None on the CPU)."""

    device: torch.device
    reserved0: int = 0
    allocated0: int = 0
    used0: int = 0
    used_peak: int = 0
    samples: list[int] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> MemoryProbe:
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reserved0 = torch.cuda.memory_reserved(self.device)
            self.allocated0 = torch.cuda.memory_allocated(self.device)
            self.used0 = self.used_peak = self._used()
        return self

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        """Device-wide used bytes now (call after each run: allocations outside torch have no peak counter)."""
        if self.cuda:
            self.used_peak = max(self.used_peak, self._used())

    def result(self) -> dict[str, Any]:
        if not self.cuda:
            return {"peak_reserved_gib": None, "peak_allocated_gib": None, "device_used_gib": None,
                    "note": "not measured on the CPU"}
        self.sample()
        gib = 2**30
        return {
            "peak_reserved_gib": (torch.cuda.max_memory_reserved(self.device) - self.reserved0) / gib,
            "peak_allocated_gib": (torch.cuda.max_memory_allocated(self.device) - self.allocated0) / gib,
            "device_used_gib": (self.used_peak - self.used0) / gib,
            # what was already held when this pipeline started (a previous pipeline not fully freed shows here)
            "start_reserved_gib": self.reserved0 / gib, "start_device_used_gib": self.used0 / gib,
            "note": "deltas above the device state before this pipeline was loaded (previous one freed)",
        }


def release(device: torch.device) -> None:
    """Free what a dropped pipeline left in the caching allocator, so the next probe starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
