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
# Under pytest-xdist (CI runs two workers on its two cores) each worker takes one core's share of threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


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


@pytest.fixture(scope="session")
def tiny_controlnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-controlnet-small written as a diffusers-format directory (the build reads it like a user's)."""
    from support.controlnet_files import write_controlnet_dir

    d = tmp_path_factory.mktemp("controlnets")
    return {"depth": write_controlnet_dir("tiny-controlnet-small", d / "tiny-controlnet-small")}


@pytest.fixture(scope="session")
def tiny_controlnet_engines(tmp_path_factory: pytest.TempPathFactory, tiny_controlnet_files: dict[str, Path]) -> Path:
    """ONNX Runtime fp32 engines of tiny (no refiner) with ControlNets ``edges`` (preset tiny-controlnet) and
    ``depth`` (tiny-controlnet-small from a diffusers directory), all tiny buckets, up to 2 images per batch."""
    from sdxl_trt.engine.build import BuildOptions, build_engines

    logging.getLogger("sdxl_trt").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("engines") / "tiny-controlnet"
    build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="fp32", max_batch=2,
                               controlnets=("tiny-controlnet:edges", f"{tiny_controlnet_files['depth']}:depth")))
    return out
