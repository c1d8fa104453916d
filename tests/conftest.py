"""Shared fixtures and the suite's rules.

* Tiny models in PyTorch (per process) and their ONNX Runtime engines, built once per machine and shared by
  every pytest process (tests/support/engine_cache.py says when a cached build is reused). A test that writes
  into a shared engine directory fails at its teardown; tests that change one copy it first.
* ``slow`` tests (over ~8 s on 2 cores) are deselected unless ``--run-slow`` is given (CI gives it), a ``-m``
  expression chooses, or the test is named on the command line.
* No test writes into the checkout: ``git status`` is compared at session end.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import engine_cache

from sdxl_trt.files import process_temp_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "SDXL_TRT_CACHE_DIR" not in os.environ:  # a hermetic hash cache, made by the first process (the workers inherit it)
    os.environ["SDXL_TRT_CACHE_DIR"] = str(process_temp_dir("hash-cache"))  # removed when that process exits
# Under pytest-xdist (CI runs two workers on its two cores) each worker takes one core's share of threads, and so
# do the processes it starts (servers, CLI runs: torch reads OMP_NUM_THREADS at import). With torch's default of
# one thread per core there, a server beside a busy worker has 3 threads on 2 cores, and OpenMP's barriers made its
# torch work about 2x dearer in CPU time (the tiny UNet: 60x, measured on a loaded machine). Results do not change.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
logging.getLogger("sdxl_trt.tests").setLevel(logging.INFO)

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (deselected by default; CI runs them)")


SAME_WORKER = {"tests/test_torch_backend.py": "torch-programs", "tests/test_lora_runtime.py": "torch-programs"}
"""Files that ``--dist loadfile`` hands to one worker as one unit, by unit name: the readers of
``tiny_torch_parsed``, which share its parsed programs only within a process."""


COSTLIEST_FIRST = (
    "tests/test_torch_backend.py", "tests/test_lora_runtime.py",  # one unit (SAME_WORKER), the tiny-torch build in it
    "tests/test_int8.py", "tests/test_lora_kinds.py", "tests/test_export.py", "tests/test_gpu.py",
    "tests/test_controlnet_build.py", "tests/test_serve_http.py", "tests/test_build.py", "tests/test_playground.py",
    "tests/test_serve_hardening2.py",
)
"""The files that cost the most CPU (self + the processes they start: 47-200 s each on 2 cores, 2026-12-02), collected
first and in this order, the rest after them as pytest found them. Under xdist a worker takes the next file when it
runs low, so big files at the start leave small ones to even out the end. xdist's own order (most tests first) left
the torch unit, few tests and the costliest, to start near the end. ``test_controlnet_build`` waits for the
tiny-torch build of the first unit, so it comes after files that take the other worker that long."""


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, with the files of :data:`SAME_WORKER` grouped and handed out in collection order
    (:data:`COSTLIEST_FIRST`), not most tests first; other modes: xdist's own."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SAME_WORKER.get(file, file)

    return GroupedFiles(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {f: k for k, f in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if config.getoption("--run-slow") or config.getoption("markexpr"):
        return
    named = [a.split("[")[0] for a in config.args if "::" in a]

    def asked_for(item: pytest.Item) -> bool:
        test = item.nodeid.split("[")[0]
        return any(test == n or test.startswith(n + "::") for n in named)

    slow = [i for i in items if "slow" in i.keywords and not asked_for(i)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if "slow" not in i.keywords or asked_for(i)]


# --------------------------------------------------------------------------------------- the checkout guard
def _git_status() -> str | None:
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_unchanged() -> Iterator[None]:
    """Fails the session if a test wrote into the checkout (skipped outside a git checkout)."""
    before = _git_status()
    yield
    if before is None:
        return
    after = _git_status()
    assert after == before, (
        "a test wrote into the checkout (write under tmp_path instead); `git status --porcelain` went from\n"
        f"{before or '(clean)'}\nto\n{after or '(clean)'}")


# ------------------------------------------------------------------------------------ shared engine directories
@pytest.fixture(autouse=True)
def _shared_dirs_unchanged() -> Iterator[None]:
    """After every test: the shared directories handed out in this process kept every file's size and mtime."""
    yield
    for d in engine_cache.handed_out():
        changed = d.changed_since_last_check()
        assert not changed, (
            f"the shared test directory {d.path} ({d.name}) changed during this test (or in another pytest process "
            f"sharing it): {', '.join(changed[:8])}; copy it first (shutil.copytree into tmp_path)")


@pytest.fixture(scope="session", autouse=True)
def _shared_dirs_intact() -> Iterator[None]:
    """At session end: every shared directory handed out still has the bytes its build wrote."""
    yield
    for d in engine_cache.handed_out():
        changed = d.changed_contents()
        assert not changed, f"the shared test directory {d.path} ({d.name}) was changed: {', '.join(changed[:8])}"


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny base and refiner as PyTorch modules (fp32, CPU)."""
    from sdxl_trt.export.loading import load_model

    return load_model("tiny"), load_model("tiny-refiner")


@pytest.fixture(scope="session")
def tiny_engines() -> Path:
    """ONNX Runtime engines for tiny + tiny-refiner, all five tiny buckets, up to 2 images per batch. Shared:
    read it, or copy it before changing anything."""
    return engine_cache.shared("tiny")


@pytest.fixture(scope="session")
def tiny_torch_engines() -> Path:
    """torch.export programs of tiny (no refiner), fp32, buckets 256x256 and 320x256, up to 2 images per batch.
    Shared: read it, or copy it before changing anything."""
    return engine_cache.shared("tiny-torch")


@pytest.fixture(scope="session")
def tiny_torch_parsed(tiny_torch_engines: Path) -> Iterator[Path]:
    """``tiny_torch_engines``, with a pipeline over them held loaded and unchanged for the session: every later load
    of these files in this process reuses its parsed programs (sdxl_trt/engine_dir/torch_program.py: parsing is
    most of a load, about 15 s of CPU for the tiny UNet against 1 s for a module made from the parsed program) and
    gets weights of its own copied from the files', so it is a fresh load all the same. The files that read it
    run on one xdist worker (:data:`SAME_WORKER`), so the suite parses each program once."""
    from sdxl_trt.runtime.pipeline import Pipeline

    held = Pipeline.load(tiny_torch_engines, device="cpu")
    yield tiny_torch_engines
    del held


@pytest.fixture(scope="session")
def tiny_deepcache_engines() -> Path:
    """ONNX Runtime fp32 engines of tiny (no refiner) built with ``--deepcache 0,1,3``: the 256x256 bucket, up to 2
    images per batch. Shared: read it, or copy it before changing anything."""
    return engine_cache.shared("tiny-deepcache")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_engines: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_engines, device="cpu")


@pytest.fixture(scope="session")
def tiny_controlnet_files() -> dict[str, Path]:
    """tiny-controlnet-small written as a diffusers-format directory (the build reads it like a user's). Shared."""
    return {"depth": engine_cache.shared(engine_cache.CONTROLNET_SOURCE)}


@pytest.fixture(scope="session")
def tiny_controlnet_engines(tiny_controlnet_files: dict[str, Path]) -> Path:
    """ONNX Runtime fp32 engines of tiny (no refiner) with ControlNets ``edges`` (preset tiny-controlnet) and
    ``depth`` (tiny-controlnet-small from a diffusers directory), all tiny buckets, up to 2 images per batch.
    Shared: read it, or copy it before changing anything."""
    return engine_cache.shared("tiny-controlnet")


@pytest.fixture(scope="session")
def graph_test_engines(tiny_models, tiny_engines: Path, tiny_controlnet_engines: Path,
                       tiny_controlnet_files: dict[str, Path]):
    """torch engines (fp32, CPU) of the tiny components, in memory, over the manifests of ``tiny_controlnet_engines``
    and ``tiny_engines`` (tests/support/torch_engines.py says why not exported) at the buckets of
    ``support.torch_engines.TINY_TORCH_BUCKETS``: what the emulated CUDA-graph tests run on."""
    from support.controlnet_files import load_tiny_controlnet
    from support.torch_engines import TINY_TORCH_BUCKETS, EngineSet, TinyTorchEngines

    from sdxl_trt.export.wrappers import wrap_components

    base, refiner = tiny_models
    controlnets = {"controlnet.edges": load_tiny_controlnet("tiny-controlnet"),
                   "controlnet.depth": load_tiny_controlnet(tiny_controlnet_files["depth"])}
    return TinyTorchEngines(
        controlnet=EngineSet.in_memory(tiny_controlnet_engines, wrap_components(base, controlnets=controlnets),
                                       TINY_TORCH_BUCKETS),
        refiner=EngineSet.in_memory(tiny_engines, wrap_components(base, refiner), TINY_TORCH_BUCKETS))

