"""``StepProgress``: how far the denoising loop running now has got, readable from any thread.

A service's progress endpoint (AUTOMATIC1111's ``/sdapi/v1/progress``) reads it while the worker thread runs a
batch. Rules (it sits on the hot loop):

* ``mark()`` after each step costs no allocation and no synchronisation: on CPU it counts; on CUDA it records
  one of the events allocated at construction on the current stream, so a reader counts the steps the
  *device* has finished (the host enqueues a loop of graph replays far ahead of the GPU, so counting on the
  host would report 100 % while the GPU is still at the first step).
* ``begin(steps)`` starts a batch: the base loop and the refiner's loop count as one run of ``steps`` steps;
  ``end()`` after it, so the gap before the next batch reads as idle rather than as the last batch's figures.
* Readers never block and never sync: ``snapshot()`` only queries events. A reader racing a ``begin`` may see
  the previous batch's figures once; progress is for display, never for control.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ProgressSnapshot:
    """``step`` of ``steps`` finished in the run started ``elapsed_s`` ago (0 of 0 before the first)."""

    step: int
    steps: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left at the pace so far (0 until a step has finished)."""
        if not self.step or not self.steps:
            return 0.0
        return self.elapsed_s / self.step * (self.steps - self.step)


class StepProgress:
    """Steps of the running batch: ``begin``/``mark``/``end`` from the worker thread, ``snapshot`` from any."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.capacity = capacity
        self._events: list[Any] = ([torch.cuda.Event() for _ in range(capacity)]
                                   if device.type == "cuda" else [])
        self._lock = threading.Lock()
        self._marked = 0
        self._steps = 0
        self._started = time.monotonic()

    def begin(self, steps: int) -> None:
        with self._lock:
            self._marked = 0
            self._steps = steps
            self._started = time.monotonic()

    def end(self) -> None:
        """The batch is done: readers see 0 of 0 until the next ``begin``."""
        self.begin(0)

    def mark(self) -> None:
        """One step enqueued (CUDA) or done (CPU). Steps past ``capacity`` are not counted."""
        n = self._marked
        if n >= self.capacity:
            return
        if self._events:
            self._events[n].record()
        self._marked = n + 1

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            marked, steps, started = self._marked, self._steps, self._started
        done = marked if not self._events else _completed(self._events, marked)
        return ProgressSnapshot(step=min(done, steps), steps=steps, elapsed_s=time.monotonic() - started)


def _completed(events: list[Any], marked: int) -> int:
    """How many of the first ``marked`` events the device has passed (they complete in order)."""
    lo, hi = 0, marked
    while lo < hi:
        mid = (lo + hi) // 2
        if events[mid].query():
            lo = mid + 1
        else:
            hi = mid
    return lo
