"""``AsyncPipeline``: the asyncio front of a :class:`~sdxl_trt.runtime.pipeline.Pipeline` for services.

Rules of this module (keep them):

* One owner. A single worker (an asyncio task that forms batches, and one thread that runs them with
  ``pipeline.generate_batch``) is the only caller of the pipeline; the event loop never blocks on the GPU.
* Batching is a queue policy with two knobs, as in Triton's dynamic batcher and Ray Serve's ``@serve.batch``:
  a batch leaves when it holds ``max_batch`` images or when its oldest request has waited
  ``batch_window_ms``. Only requests with equal step shapes share a batch (``StepShape``, from the pipeline's
  ``admit``: bucket, guidance, prompt chunks, mode, sampler, ControlNets, steps, strength, refiner, LoRA set
  and the rest), the same value the pipeline groups by, so a formed batch runs as one. Since every image has
  its own seeded generator, an image never depends on its batch-mates.
* The queue is bounded: a full queue refuses at once (:class:`OverloadedError`) instead of growing latency.
* Work nobody waits for is never run: a request still queued past its deadline is dropped
  (:class:`DeadlineExceededError`), and so is one whose awaiting task was cancelled (the client went away).
  A deadline bounds the wait in the queue; a request whose batch has started is finished and delivered.
* Requests are checked before they are queued, so a bad one is refused at once and never spoils a batch; if
  a batch still fails, its requests are retried one by one so only the culprit gets the error.
* The worker cannot die: any exception in forming or running a batch (or a pipeline returning the wrong
  number of results) fails only the requests it concerns. A running batch gets a deadline too
  (``default_timeout_s`` from its start): past it, its requests get :class:`DeadlineExceededError` and
  :attr:`AsyncPipeline.healthy` is False (``/ready`` answers 503) until the pipeline call returns.
* A sticky CUDA error (an illegal address, a launch failure: :func:`sticky_device_error`) is not retried one by
  one, since every later call in the process fails too: the batch's requests, the queued ones and every later
  one get :class:`DeviceFailedError`, :attr:`AsyncPipeline.healthy` is False for good and ``on_device_failure``
  is told, so the service can exit and be replaced.
* No web library here: services embed this without HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sdxl_trt.buckets import Bucket
from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.step_shape import StepShape

from .errors import (
    DeadlineExceededError,
    DeviceFailedError,
    OverloadedError,
    ShuttingDownError,
    sticky_device_error,
)
from .pipeline_like import PipelineLike

log = logging.getLogger(__name__)

__all__ = ["AsyncPipeline", "AsyncPipelineStats", "BatchReport", "PipelineLike"]


@dataclass(frozen=True)
class BatchReport:
    """One finished batch, for metrics: images in it, requests, wall seconds and the pipeline's stage timings."""

    images: int
    requests: int
    seconds: float
    timings: dict[str, float]
    steps_run: dict[str, int] = field(default_factory=dict)  # the batch's UNet steps (``unet_cached``: shallow)


@dataclass
class AsyncPipelineStats:
    """Counters since start (a snapshot; for metrics and tests)."""

    queue_depth: int = 0
    queued_images: int = 0
    running_requests: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # images per batch -> number of batches
    completed: int = 0
    failed: int = 0
    images: int = 0
    rejected_overloaded: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0


@dataclass(eq=False)
class _Item:
    request: GenerationRequest
    shape: StepShape  # the batch key: requests with equal shapes share a batch
    images: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future[GenerationResult]
    state: str = "queued"  # queued -> running -> done, or queued -> dropped


class AsyncPipeline:
    """An asyncio front of one pipeline: bounded queue, batching window, deadlines, cancellation, drain.

    Use ``await generate(request)`` from any number of tasks of one event loop; ``await aclose()`` to drain.
    """

    def __init__(self, pipeline: PipelineLike, *, max_batch: int | None = None, batch_window_ms: float = 10.0,
                 max_queue: int = 64, max_images: int = 64, max_steps: int | None = None,
                 default_timeout_s: float | None = None, on_batch: Callable[[BatchReport], None] | None = None,
                 on_device_failure: Callable[[str], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        self.pipeline = pipeline
        self.max_batch = max_batch if max_batch is not None else pipeline.max_batch
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_batch > pipeline.max_batch:
            log.warning("max_batch %d exceeds the engines' max batch %d: batches of up to %d images run in chunks "
                        "of %d", self.max_batch, pipeline.max_batch, self.max_batch, pipeline.max_batch)
        self.batch_window_s = batch_window_ms / 1000.0
        self.max_queue = max_queue
        self.max_images = max_images
        self.max_steps = min(max_steps or pipeline.max_steps, pipeline.max_steps)
        self.default_timeout_s = default_timeout_s
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._running: list[_Item] = []
        self._changed = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-trt-worker")
        self._stats = AsyncPipelineStats()
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._stuck_since: float | None = None  # a running batch outlived its deadline; the call has not returned
        self._on_device_failure = on_device_failure
        self.device_error: str | None = None  # the sticky CUDA error that ended this pipeline's usefulness

    # ------------------------------------------------------------------ public API
    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """False when the worker stopped without being asked to, a pipeline call outlived its deadline, or the
        GPU hit a sticky error (for good)."""
        if self._stuck_since is not None or self.device_error is not None:
            return False
        worker = self._worker
        return worker is None or not worker.done() or self._closing

    def health(self) -> str:
        """Why :attr:`healthy` is False, in words for ``/ready`` ("ok" otherwise)."""
        if self.device_error is not None:
            return self._device_failed().args[0]
        if self._stuck_since is not None:
            return (f"a batch has been running for {time.monotonic() - self._stuck_since:.0f} s past its deadline; "
                    "the engine may be hung")
        if not self.healthy:
            return "the batching worker stopped"
        return "ok"

    def stats(self) -> AsyncPipelineStats:
        s = self._stats
        return AsyncPipelineStats(
            queue_depth=len(self._queue), queued_images=sum(i.images for i in self._queue),
            running_requests=len(self._running), batches=s.batches, batch_sizes=Counter(s.batch_sizes),
            completed=s.completed, failed=s.failed, images=s.images, rejected_overloaded=s.rejected_overloaded,
            dropped_deadline=s.dropped_deadline, dropped_cancelled=s.dropped_cancelled,
        )

    def admit(self, request: GenerationRequest) -> StepShape:
        """Everything that can be refused before queueing (the pipeline's own checks, with this service's
        limits); returns the request's step shape, its batch key."""
        return self.pipeline.admit(request, max_images=self.max_images, max_steps=self.max_steps)

    def check(self, request: GenerationRequest) -> Bucket:
        """:meth:`admit`, returning the request's bucket only (kept for callers from before step shapes)."""
        return self.admit(request).bucket

    async def generate(self, request: GenerationRequest, *, timeout_s: float | None = None) -> GenerationResult:
        """Queue ``request`` and wait for its images.

        Raises :class:`InvalidRequestError` (bad values, at once), :class:`OverloadedError` (queue full, at once),
        :class:`ShuttingDownError` (draining), :class:`DeadlineExceededError` (still queued after ``timeout_s``,
        default ``default_timeout_s``). Cancelling the awaiting task drops the request if it has not started.
        """
        if self._closing:
            raise ShuttingDownError("the service is shutting down and accepts no new requests")
        if self.device_error is not None:
            raise self._device_failed()
        shape = self.admit(request)
        if len(self._queue) >= self.max_queue:
            self._stats.rejected_overloaded += 1
            raise OverloadedError(
                f"the queue is full ({self.max_queue} requests waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        self._ensure_worker()
        timeout = timeout_s if timeout_s is not None else self.default_timeout_s
        now = time.monotonic()
        item = _Item(request=request, shape=shape, images=request.num_images, enqueued=now,
                     deadline=None if timeout is None else now + timeout,
                     future=asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._changed.set()
        try:
            return await self._wait(item)
        except asyncio.CancelledError:
            self._abandon(item)
            raise

    def retry_after_s(self) -> int:
        """A client's fair wait before retrying: the batches ahead of it at the recent batch time."""
        ahead = sum(i.images for i in self._queue) / max(1, self.max_batch) + 1
        return max(1, math.ceil(ahead * self._batch_seconds))

    async def aclose(self, drain_timeout_s: float | None = 30.0) -> bool:
        """Stop accepting (new calls raise :class:`ShuttingDownError`); let queued and running work finish.

        Returns True when everything finished within ``drain_timeout_s``; otherwise what is left is failed
        with :class:`ShuttingDownError` and False is returned. Safe to call more than once.
        """
        self._closing = True
        self._changed.set()
        drained = True
        worker = self._worker
        if worker is not None and not worker.done():
            done, _ = await asyncio.wait({worker}, timeout=drain_timeout_s)
            if not done:
                drained = False
                log.warning("drain timed out after %s s with %d queued and %d running requests; failing them",
                            drain_timeout_s, len(self._queue), len(self._running))
                worker.cancel()
                await asyncio.wait({worker})
        for item in list(self._queue):
            self._fail_queued(item, ShuttingDownError("the service shut down before this request ran"))
        self._executor.shutdown(wait=False)
        return drained

    # ------------------------------------------------------------------ the waiting side
    async def _wait(self, item: _Item) -> GenerationResult:
        if item.deadline is not None:
            await asyncio.wait({item.future}, timeout=max(0.0, item.deadline - time.monotonic()))
            if not item.future.done() and item.state == "queued":
                self._queue.remove(item)
                item.state = "dropped"
                item.future.cancel()
                self._stats.dropped_deadline += 1
                raise DeadlineExceededError(
                    f"the request waited {time.monotonic() - item.enqueued:.1f} s in the queue, past its "
                    f"deadline, and was dropped unrun; retry later or allow a longer timeout")
        await asyncio.wait({item.future})
        return item.future.result()

    def _abandon(self, item: _Item) -> None:
        """The awaiting task was cancelled: drop the request if it has not started; nobody reads its result."""
        if item.state == "queued":
            self._queue.remove(item)
            item.state = "dropped"
            self._stats.dropped_cancelled += 1
            self._changed.set()
        elif item.future.done() and not item.future.cancelled():
            item.future.exception()  # mark it retrieved: nobody will read it
        item.future.cancel()

    def _fail_queued(self, item: _Item, error: Exception) -> None:
        if item in self._queue:
            self._queue.remove(item)
        item.state = "dropped"
        if not item.future.done():
            item.future.set_exception(error)

    # ------------------------------------------------------------------ the worker
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="sdxl-trt-batcher")

    async def _work(self) -> None:
        while True:
            batch: list[_Item] = []
            try:
                formed = await self._next_batch()
                if formed is None:
                    return
                batch = formed
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in forming or finishing a batch: fail only its requests, keep working
                log.exception("the batching worker hit an error; failing the %d requests of this batch", len(batch))
                for it in batch:
                    it.state = "done"
                    if not it.future.done():
                        it.future.set_exception(e)

    async def _next_batch(self) -> list[_Item] | None:
        """Wait until a batch is full or its oldest request's window ran out; None when closing and empty."""
        while True:
            now = time.monotonic()
            self._expire(now)
            if not self._queue:
                if self._closing:
                    return None
                await self._wait_for_change(None)
                continue
            head = self._queue[0]
            batch = self._compatible(head)
            wait = head.enqueued + self.batch_window_s - now
            if sum(i.images for i in batch) >= self.max_batch or wait <= 0 or self._closing:
                for it in batch:
                    self._queue.remove(it)
                    it.state = "running"
                return batch
            deadlines = [i.deadline - now for i in self._queue if i.deadline is not None]
            await self._wait_for_change(min([wait, *deadlines]))

    def _compatible(self, head: _Item) -> list[_Item]:
        batch, images = [head], head.images
        for it in self._queue:
            if it is not head and it.shape == head.shape and images + it.images <= self.max_batch:
                batch.append(it)
                images += it.images
        return batch

    def _expire(self, now: float) -> None:
        for item in [i for i in self._queue if i.deadline is not None and i.deadline <= now]:
            self._stats.dropped_deadline += 1
            self._fail_queued(item, DeadlineExceededError(
                f"the request waited {now - item.enqueued:.1f} s in the queue, past its deadline, and was dropped "
                "unrun; retry later or allow a longer timeout"))

    async def _wait_for_change(self, timeout: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run(self, batch: list[_Item]) -> None:
        self._running = batch
        requests = [it.request for it in batch]
        images = sum(it.images for it in batch)
        t0 = time.monotonic()
        call = asyncio.get_running_loop().run_in_executor(self._executor, self._run_sync, requests)
        try:
            outcomes = await self._within_deadline(call, batch, t0)
        except asyncio.CancelledError:
            for it in batch:
                it.state = "done"
                if not it.future.done():
                    it.future.set_exception(ShuttingDownError("the service shut down before this request finished"))
            raise
        finally:
            self._running = []
            self._stuck_since = None
        if self.device_error is not None:
            self._device_failure_reached()
        seconds = time.monotonic() - t0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        s = self._stats
        s.batches += 1
        s.batch_sizes[images] += 1
        timings: dict[str, float] = {}
        steps_run: dict[str, int] = {}
        for it, outcome in zip(batch, outcomes, strict=True):
            it.state = "done"
            if isinstance(outcome, BaseException):
                s.failed += 1
                if not it.future.done():
                    it.future.set_exception(outcome)
                continue
            s.completed += 1
            s.images += len(outcome.images)
            timings = timings or dict(outcome.timings)
            steps_run = steps_run or dict(outcome.steps_run)
            outcome.timings["queue_wait"] = t0 - it.enqueued  # this request's own wait (after the metrics' copy)
            if not it.future.done():
                it.future.set_result(outcome)
        log.debug("batch of %d requests (%d images) in %.3f s", len(batch), images, seconds)
        if self._on_batch is not None:
            try:
                self._on_batch(BatchReport(images=images, requests=len(batch), seconds=seconds, timings=timings,
                                           steps_run=steps_run))
            except Exception:
                log.exception("the on_batch callback failed")

    async def _within_deadline(self, call: asyncio.Future[list[GenerationResult | Exception]], batch: list[_Item],
                               t0: float) -> list[GenerationResult | Exception]:
        """The pipeline call's outcomes; past the running deadline its requests fail with 504 at once and the
        worker waits for the call to return (one thread owns the pipeline) while ``healthy`` says so."""
        if self.default_timeout_s is not None:
            done, _ = await asyncio.wait({call}, timeout=self.default_timeout_s)
            if not done:
                self._stuck_since = t0 + self.default_timeout_s
                log.error("a batch of %d requests is still running after %g s; failing them, and /ready is 503 "
                          "until the engine returns", len(batch), self.default_timeout_s)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(DeadlineExceededError(
                            f"the request ran for {self.default_timeout_s:g} s without finishing; the engine may "
                            "be hung; retry later"))
        return await call

    def _run_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult | Exception]:
        """In the worker thread: the whole batch, or on failure each request alone so only the culprit fails
        (not after a sticky CUDA error: nothing would succeed). Never raises: a result count that does not
        match the requests is an error for each of them."""
        if self.device_error is not None:
            return [self._device_failed() for _ in requests]
        try:
            return self._checked(requests, self.pipeline.generate_batch(requests))
        except Exception as e:
            if self._sticky(e):
                return [self._device_failed() for _ in requests]
            if len(requests) == 1:
                return [e]
            log.warning("a batch of %d requests failed (%s); running them one at a time", len(requests), e)
        outcomes: list[GenerationResult | Exception] = []
        for r in requests:
            if self.device_error is not None:
                outcomes.append(self._device_failed())
                continue
            try:
                outcomes += self._checked([r], self.pipeline.generate_batch([r]))
            except Exception as e:
                outcomes.append(self._device_failed() if self._sticky(e) else e)
        return outcomes

    def _sticky(self, error: Exception) -> bool:
        """Whether ``error`` is a sticky CUDA error; the first one is kept (and logged) as :attr:`device_error`."""
        message = sticky_device_error(error)
        if message is None:
            return False
        if self.device_error is None:
            self.device_error = message
            log.critical("the GPU hit an unrecoverable CUDA error (%s): every later call in this process would "
                         "fail; failing all requests, /ready answers 503", message, exc_info=error)
        return True

    def _device_failed(self) -> DeviceFailedError:
        return DeviceFailedError(f"the GPU hit an unrecoverable CUDA error ({self.device_error}); this process "
                                 "can no longer generate and must be restarted: retry on another replica")

    def _device_failure_reached(self) -> None:
        """On the event loop after the failing batch: fail what is queued (it cannot run), tell the owner once."""
        for item in list(self._queue):
            self._fail_queued(item, self._device_failed())
        callback, self._on_device_failure = self._on_device_failure, None
        if callback is not None:
            try:
                callback(str(self.device_error))
            except Exception:
                log.exception("the on_device_failure callback failed")

    @staticmethod
    def _checked(requests: list[GenerationRequest], results: Sequence[GenerationResult]) -> list[GenerationResult | Exception]:
        results = list(results)
        if len(results) != len(requests):
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(requests)} requests")
        bad = [k for k, (q, r) in enumerate(zip(requests, results, strict=True))
               if not isinstance(r, GenerationResult) or len(r.images) != q.num_images]
        if bad:
            raise RuntimeError(f"the pipeline returned a wrong result for request {bad[0]} of the batch")
        return list(results)
