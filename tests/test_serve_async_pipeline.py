"""AsyncPipeline: bit-exact single requests, batching of compatible requests, overload, deadlines,
cancellation and draining. Real tiny engines where images are compared; a gated double where timing matters."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from support.serve_fakes import GatedPipeline

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.serve.core.async_pipeline import AsyncPipeline
from sdxl_trt.serve.core.errors import DeadlineExceededError, OverloadedError, ShuttingDownError

TOLERANCE = 1  # uint8 levels: a batch of 2 may round differently from a batch of 1, by at most one level


def _pixels(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in result.images]


def test_single_request_is_bit_exact(tiny_pipeline) -> None:
    req = GenerationRequest(prompt="a red lighthouse", width=256, height=256, steps=2, seed=11)
    expected = _pixels(tiny_pipeline.generate(req))

    async def main() -> GenerationResult:
        apipe = AsyncPipeline(tiny_pipeline, batch_window_ms=0)
        try:
            return await apipe.generate(req)
        finally:
            await apipe.aclose()

    got = _pixels(asyncio.run(main()))
    assert np.array_equal(got[0], expected[0])


def test_compatible_requests_are_batched_and_match_single_runs(tiny_pipeline) -> None:
    reqs = [GenerationRequest(prompt="a blue boat", width=256, height=256, steps=2, seed=s) for s in (1, 2, 3, 4)]
    odd = GenerationRequest(prompt="a blue boat", width=320, height=256, steps=2, seed=5)  # another bucket
    singles = [_pixels(tiny_pipeline.generate(r))[0] for r in [*reqs, odd]]

    async def main() -> tuple[list[GenerationResult], object]:
        apipe = AsyncPipeline(tiny_pipeline, batch_window_ms=300)
        try:
            results = await asyncio.gather(*(apipe.generate(r) for r in [*reqs, odd]))
            return results, apipe.stats()
        finally:
            await apipe.aclose()

    results, stats = asyncio.run(main())
    assert max(stats.batch_sizes) == 2 == tiny_pipeline.max_batch, stats.batch_sizes  # a batch > 1 happened
    assert stats.batch_sizes[1] == 1  # the other bucket ran alone
    for result, single in zip(results, singles, strict=True):
        diff = np.abs(_pixels(result)[0] - single).max()
        assert diff <= TOLERANCE, f"batched image differs from its single run by {diff} levels"


def _req(prompt: str, **kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "width": 256, "height": 256, "steps": 2, "seed": 0, **kw})


async def _until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_full_queue_is_refused_at_once() -> None:
    fake = GatedPipeline()

    async def main() -> None:
        apipe = AsyncPipeline(fake, max_queue=2, batch_window_ms=0)
        running = asyncio.ensure_future(apipe.generate(_req("running")))
        await _until(fake.started.is_set)
        queued = [asyncio.ensure_future(apipe.generate(_req(f"queued {i}"))) for i in range(2)]
        await _until(lambda: apipe.queue_depth == 2)
        with pytest.raises(OverloadedError) as e:
            await asyncio.wait_for(apipe.generate(_req("refused")), 1.0)
        assert e.value.retry_after_s >= 1
        fake.gate.set()
        done = await asyncio.gather(running, *queued)
        assert len(done) == 3
        assert apipe.stats().rejected_overloaded == 1
        await apipe.aclose()

    asyncio.run(main())
    assert "refused" not in sum(fake.ran, [])


def test_deadline_drops_queued_request_unrun() -> None:
    fake = GatedPipeline()

    async def main() -> None:
        apipe = AsyncPipeline(fake, batch_window_ms=0)
        running = asyncio.ensure_future(apipe.generate(_req("running")))
        await _until(fake.started.is_set)
        with pytest.raises(DeadlineExceededError):
            await apipe.generate(_req("late", steps=3), timeout_s=0.1)
        assert apipe.queue_depth == 0
        fake.gate.set()
        await running
        await apipe.aclose()
        assert apipe.stats().dropped_deadline == 1

    asyncio.run(main())
    assert fake.ran == [["running"]]


def test_cancelled_request_is_dropped_unrun() -> None:
    fake = GatedPipeline()

    async def main() -> None:
        apipe = AsyncPipeline(fake, batch_window_ms=0)
        running = asyncio.ensure_future(apipe.generate(_req("running")))
        await _until(fake.started.is_set)
        gone = asyncio.ensure_future(apipe.generate(_req("client gone", steps=3)))
        kept = asyncio.ensure_future(apipe.generate(_req("kept", steps=3)))
        await _until(lambda: apipe.queue_depth == 2)
        gone.cancel()
        await asyncio.sleep(0)
        assert apipe.queue_depth == 1
        fake.gate.set()
        await asyncio.gather(running, kept)
        await apipe.aclose()
        assert apipe.stats().dropped_cancelled == 1

    asyncio.run(main())
    assert sum(fake.ran, []) == ["running", "kept"]


def test_drain_finishes_queued_work_and_refuses_new() -> None:
    fake = GatedPipeline()

    async def main() -> None:
        apipe = AsyncPipeline(fake, batch_window_ms=0)
        tasks = [asyncio.ensure_future(apipe.generate(_req(f"r{i}", steps=2 + i))) for i in range(3)]
        await _until(fake.started.is_set)
        closing = asyncio.ensure_future(apipe.aclose(drain_timeout_s=20))
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDownError):
            await apipe.generate(_req("too late"))
        fake.gate.set()
        assert await closing is True
        assert all(len(t.result().images) == 1 for t in tasks)

    asyncio.run(main())
    assert sorted(sum(fake.ran, [])) == ["r0", "r1", "r2"]


def test_drain_timeout_fails_what_is_left() -> None:
    fake = GatedPipeline()

    async def main() -> None:
        apipe = AsyncPipeline(fake, batch_window_ms=0)
        running = asyncio.ensure_future(apipe.generate(_req("stuck")))
        await _until(fake.started.is_set)
        queued = asyncio.ensure_future(apipe.generate(_req("queued", steps=3)))
        await _until(lambda: apipe.queue_depth == 1)
        assert await apipe.aclose(drain_timeout_s=0.1) is False
        for task in (running, queued):
            with pytest.raises(ShuttingDownError):
                await task

    try:
        asyncio.run(main())
    finally:
        fake.gate.set()  # let the worker thread finish


def test_bad_requests_are_refused_before_queueing_and_never_spoil_a_batch() -> None:
    fake = GatedPipeline(open_gate=True)

    async def main() -> None:
        apipe = AsyncPipeline(fake, batch_window_ms=200, max_images=4)
        with pytest.raises(InvalidRequestError) as e:
            await apipe.generate(_req("x", width=250))
        assert e.value.param == "size"
        with pytest.raises(InvalidRequestError):
            await apipe.generate(_req("x", num_images=5))
        with pytest.raises(InvalidRequestError):
            await apipe.generate(_req("x", scheduler="heun"))
        good, bad = await asyncio.gather(apipe.generate(_req("good")), apipe.generate(_req("poison")),
                                         return_exceptions=True)
        assert isinstance(good, GenerationResult)
        assert isinstance(bad, InvalidRequestError)
        await apipe.aclose()

    asyncio.run(main())
    assert fake.ran[0] == ["good", "poison"]  # batched together, then retried one by one
