"""GPU-only checks of the runtime (skipped without CUDA): graph replay equals eager execution, and a
warmed pipeline allocates no new device memory across consecutive requests.

They run on the tiny model with torch engines so they finish in seconds on any CUDA GPU; the full-size
measurements live in benchmarks/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_trt.request import GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("cuda") / "tiny-torch"
    build_engines(BuildOptions(model="tiny", out=out, backend="torch", precision="fp16", device="cuda",
                               max_batch=2, buckets="256x256,384x192"))
    return out


def test_graph_replay_equals_eager(cuda_engines: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    graphed = Pipeline.load(cuda_engines, device="cuda", use_cuda_graphs=True)
    eager = Pipeline.load(cuda_engines, device="cuda", use_cuda_graphs=False)
    for scheduler in ("euler", "euler_a", "dpmpp_2m_karras"):
        req = GenerationRequest(prompt="a lighthouse", steps=6, seed=3, scheduler=scheduler, num_images=2)
        a = np.stack([np.asarray(im) for im in graphed.generate(req).images]).astype(int)
        b = np.stack([np.asarray(im) for im in eager.generate(req).images]).astype(int)
        assert graphed.denoisers["unet"].graphs, "no graph was captured"
        assert np.abs(a - b).max() <= 1, scheduler


def test_no_device_allocation_across_requests_after_warmup(cuda_engines: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(cuda_engines, device="cuda")
    pipe.warmup(steps=4, batch_sizes=[1])
    pipe.generate(GenerationRequest(prompt="one more", steps=4, seed=99))
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for i in range(10):
        pipe.generate(GenerationRequest(prompt=f"request {i}", steps=4, seed=i))
    torch.cuda.synchronize()
    # The caching allocator asked the device for nothing new: every request lived in the arena, the
    # graphs' pools and blocks freed by the request before.
    assert torch.cuda.memory_reserved() == reserved
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
