"""A sticky CUDA error (issue 20 item 11): after an illegal address every call in the process fails, so the
batch is not retried request by request, every request gets a 503 that says why, ``/ready`` turns 503 and the
server exits 3 for the orchestrator to replace it. The error is planted on the CPU with CUDA's own message (a
pipeline double that raises it, then keeps raising it, as a poisoned CUDA context does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from support.serve_double import ILLEGAL_ADDRESS
from support.serve_fakes import GatedPipeline
from support.serve_server import ServerProcess, auth

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest, GenerationResult
from sdxl_trt.serve.core.async_pipeline import AsyncPipeline
from sdxl_trt.serve.core.errors import DeviceFailedError, sticky_device_error


class CrashingPipeline(GatedPipeline):
    """Raises CUDA's illegal-address error from the batch holding ``crash`` on, like a poisoned context."""

    def __init__(self) -> None:
        super().__init__(open_gate=True)
        self.crashed = False

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.ran.append([r.prompt for r in requests])
        if self.crashed or any(r.prompt == "crash" for r in requests):
            self.crashed = True
            raise RuntimeError(ILLEGAL_ADDRESS)
        return _images(requests)


def _images(requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    from PIL import Image

    return [GenerationResult(images=[Image.new("RGB", (8, 8))] * r.num_images, seeds=[0] * r.num_images,
                             timings={}, parameters={}) for r in requests]


def test_sticky_cuda_errors_are_told_from_recoverable_ones() -> None:
    assert sticky_device_error(RuntimeError(ILLEGAL_ADDRESS)) == "CUDA error: an illegal memory access was encountered"
    try:  # found through the exception that wraps it (a TensorRT or pipeline error raised from it)
        try:
            raise RuntimeError("[TRT] IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (unspecified launch "
                               "failure)")
        except RuntimeError as inner:
            raise ValueError("the UNet engine failed") from inner
    except ValueError as outer:
        assert "unspecified launch failure" in str(sticky_device_error(outer))
    for recoverable in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), KeyError("boom"),
                        InvalidRequestError("bad size", param="size")):
        assert sticky_device_error(recoverable) is None, recoverable


def test_a_sticky_error_fails_every_request_without_retries_and_the_pipeline_for_good() -> None:
    pipe = CrashingPipeline()
    told: list[str] = []

    async def main() -> tuple[list[BaseException | GenerationResult], AsyncPipeline]:
        apipe = AsyncPipeline(pipe, batch_window_ms=200, on_device_failure=told.append)
        try:
            first = [asyncio.create_task(apipe.generate(GenerationRequest(prompt=p, width=256, height=256)))
                     for p in ("crash", "good")]  # one batch of two
            await asyncio.sleep(0.05)
            behind = asyncio.create_task(apipe.generate(GenerationRequest(prompt="queued", width=320, height=256)))
            outcomes = await asyncio.gather(*first, behind, return_exceptions=True)
            assert not apipe.healthy and "illegal memory access" in apipe.health()
            with pytest.raises(DeviceFailedError):  # refused at once from now on
                await apipe.generate(GenerationRequest(prompt="later", width=256, height=256))
            return outcomes, apipe
        finally:
            await apipe.aclose()

    outcomes, _ = asyncio.run(main())
    assert all(isinstance(o, DeviceFailedError) for o in outcomes), outcomes
    assert "illegal memory access" in str(outcomes[0]) and "restarted" in str(outcomes[0])
    # The failing batch ran once: neither retried request by request nor followed by the queued request.
    assert pipe.ran == [["crash", "good"]]
    assert told == ["CUDA error: an illegal memory access was encountered"]


def test_a_server_whose_gpu_fails_answers_503_then_exits_3(tmp_path: Path) -> None:
    srv = ServerProcess(None, tmp_path / "server.log", double=True)
    try:
        srv.wait_ready()
        with httpx.Client(headers=auth(), timeout=60) as client:
            assert client.post(srv.url + "/v1/images/generations", json={"prompt": "fine"}).status_code == 200
            r = client.post(srv.url + "/v1/images/generations", json={"prompt": "crash"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "device_failed", r.text
            ready = client.get(srv.url + "/ready")  # within the linger: probes see why
            assert ready.status_code == 503 and ready.json()["state"] == "failed", ready.text
            assert "illegal memory access" in ready.json()["worker"], ready.text
        t0 = time.monotonic()
        code = srv.proc.wait(30)
        assert code == 3, srv.log()[-3000:]
        assert time.monotonic() - t0 < 20
        assert "unrecoverable CUDA error" in srv.log()
    finally:
        srv.stop()
