"""Shared fixtures: tiny models in PyTorch and their ONNX Runtime engines, built once per test session."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDXL_TRT_CACHE_DIR", tempfile.mkdtemp(prefix="sdxl-trt-test-cache-"))  # hermetic hash cache
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny base and refiner as PyTorch modules (fp32, CPU)."""
    from sdxl_trt.export.loading import load_model

    return load_model("tiny"), load_model("tiny-refiner")


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Path:
    """ONNX Runtime engines for tiny + tiny-refiner, all five tiny buckets, up to 2 images per batch."""
    from sdxl_trt.engine.build import BuildOptions, build_engines

    logging.getLogger("sdxl_trt").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("engines") / "tiny"
    build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="onnxruntime",
                               precision="fp32", max_batch=2))
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_engines: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_engines, device="cpu")
