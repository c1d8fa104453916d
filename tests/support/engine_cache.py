"""The tiny engine directories, built once and shared by every pytest process (xdist workers, later runs).

Most test files read ``tiny_engines`` or ``tiny_controlnet_engines``. Built per process, every xdist worker and
every ``pytest tests/test_x.py`` exported and built them again (about a minute each on 2 cores). Here the first
process to need a directory builds it under a file lock, in a cache outside the checkout, and every other process
(on this run or a later one) reads the finished directory.

The key says when a cached directory is still what a build would produce now. It is the SHA-256 of

* the build's code: every file under ``export/``, ``engine/`` and the ground floor ``sdxl_trt/`` (contracts,
  presets and their package data, buckets, engine_dir, lora, identity, errors, ...) except ``sdxl_trt/cli/`` and
  ``sdxl_trt/bench/``, the entry points above the stages. ``runtime/`` and ``serve/`` are out too: the build
  reaches none of these (``tests/test_suite_support.py`` walks every import the build's modules make, lazy
  ones included, and fails if one leads outside this set), so a change there cannot change a built byte and
  rebuilding for it would only cost time;
* the test code that writes a build's inputs: this module and ``tests/support/controlnet_files.py``;
* the versions of Python and of the libraries whose output is in the files (:data:`LIBRARIES`);
* the build recipes themselves (:data:`RECIPES`).

Proof is kept by checking, not trusting: the build records every file's SHA-256; a hand-out re-hashes the
directory (a copy changed by an earlier run is rebuilt, with a warning); the conftest compares size and mtime
after every test and all hashes at session end, so a test that writes into a shared directory fails, by name.
Tests that change an engine directory copy it first (``shutil.copytree`` into ``tmp_path``).

Location: ``$SDXL_TRT_TEST_CACHE``, else ``~/.cache/sdxl-trt-tests``. Each key has its own folder; the
:data:`KEEP` most recently used stay and older ones unused for :data:`STALE_S` are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger("sdxl_trt.tests.engine_cache")

ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "SDXL_TRT_TEST_CACHE"
SOURCE_DIRS = ("export", "engine", "sdxl_trt")
EXCLUDED_DIRS = ("sdxl_trt/cli", "sdxl_trt/bench")
TEST_INPUTS = ("tests/support/engine_cache.py", "tests/support/controlnet_files.py")
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "diffusers", "transformers", "numpy", "safetensors",
             "polygraphy", "onnx-graphsurgeon")
KEEP = 4
STALE_S = 6 * 3600
LOCK_TIMEOUT_S = 1800  # a cold build under a busy machine takes minutes; an hour's wait means a stuck holder

CONTROLNET_SOURCE = "tiny-controlnet-small"
"""The ControlNet preset written as a diffusers directory for ``tiny-controlnet``'s ``depth`` (the build reads it
as it reads a user's)."""

RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {"model": "tiny", "refiner": "tiny-refiner", "backend": "onnxruntime", "precision": "fp32",
             "max_batch": 2},
    "tiny-controlnet": {"model": "tiny", "backend": "onnxruntime", "precision": "fp32", "max_batch": 2,
                        "controlnets": ("tiny-controlnet:edges", "{controlnet_source}:depth")},
    "tiny-torch": {"model": "tiny", "backend": "torch", "precision": "fp32", "buckets": "256x256,320x256",
                   "max_batch": 2},
    "tiny-deepcache": {"model": "tiny", "backend": "onnxruntime", "precision": "fp32", "buckets": "256x256",
                       "max_batch": 2, "deepcache": (0, 1, 3)},
}
"""BuildOptions fields of each shared directory (``out`` is the cache's). ``tiny``: base + refiner, all five tiny
buckets, up to 2 images per batch. ``tiny-controlnet``: the base alone with ControlNets ``edges`` (a preset) and
``depth`` (:data:`CONTROLNET_SOURCE` from a diffusers directory). ``tiny-torch``: the base as torch.export
programs, two buckets, up to 2 images per batch (the costliest build: torch.export of every component; one
program serves every bucket and batch, so the ranges cost nothing; tests/test_torch_backend.py reads it). ``tiny-deepcache``: the base with
step caching at branches 0, 1 and 3 (shallow UNets ``unet_shallow.K``), one bucket, up to 2 images per batch."""


# ------------------------------------------------------------------------------------------------ the key
def source_files() -> list[Path]:
    """The files whose contents decide what a build writes (see the module docstring for why these)."""
    files = [ROOT / p for p in TEST_INPUTS]
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if (path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
                    and not any(rel == d or rel.startswith(d + "/") for d in EXCLUDED_DIRS)):
                files.append(path)
    return files


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cache_key() -> str:
    h = hashlib.sha256()
    for path in source_files():
        h.update(f"{path.relative_to(ROOT).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(json.dumps({"versions": library_versions(), "recipes": RECIPES}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdxl-trt-tests").expanduser()


# ------------------------------------------------------------------------------------------ the snapshots
def tree_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path``, by relative name."""
    return {f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def tree_stats(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under ``path``: cheap enough to take after every test."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        out[p.relative_to(path).as_posix() + ("/" if p.is_dir() else "")] = (st.st_size if p.is_file() else 0,
                                                                             st.st_mtime_ns)
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two snapshots: ``+added``, ``-removed``, ``~changed``."""
    return ([f"+{k}" for k in sorted(after.keys() - before.keys())]
            + [f"-{k}" for k in sorted(before.keys() - after.keys())]
            + [f"~{k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]])


@dataclass
class SharedDir:
    """A cached directory handed to tests: its recorded hashes and the stats it had after the last check."""

    name: str
    path: Path
    hashes: dict[str, str]
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = tree_stats(self.path)

    def changed_since_last_check(self) -> list[str]:
        """What changed (by size or mtime) since the last call; the next call compares with now."""
        now = tree_stats(self.path) if self.path.exists() else {}
        diff = differences(self.stats, now)
        self.stats = now
        return diff

    def changed_contents(self) -> list[str]:
        return differences(self.hashes, tree_hashes(self.path) if self.path.exists() else {})


_handed_out: dict[str, SharedDir] = {}


def handed_out() -> Iterator[SharedDir]:
    return iter(list(_handed_out.values()))


# ------------------------------------------------------------------------------------------------ building
def _build_engines(name: str, out: Path, key_dir: Path) -> None:
    from sdxl_trt.engine.build import BuildOptions, build_engines

    recipe = dict(RECIPES[name])
    if "controlnets" in recipe:
        source = shared(CONTROLNET_SOURCE, key_dir=key_dir)
        recipe["controlnets"] = tuple(c.format(controlnet_source=source) for c in recipe["controlnets"])
    build_engines(BuildOptions(out=out, **recipe))


def _write_controlnet_source(out: Path) -> None:
    from support.controlnet_files import write_controlnet_dir

    write_controlnet_dir(CONTROLNET_SOURCE, out)


def _builder(name: str, key_dir: Path) -> Callable[[Path], None]:
    if name == CONTROLNET_SOURCE:
        return _write_controlnet_source
    if name in RECIPES:
        return lambda out: _build_engines(name, out, key_dir)
    raise KeyError(f"no shared test directory {name!r}; known: {', '.join([*RECIPES, CONTROLNET_SOURCE])}")


def shared(name: str, *, key_dir: Path | None = None) -> Path:
    """The cached directory ``name`` (a :data:`RECIPES` key or :data:`CONTROLNET_SOURCE`), built if missing,
    stale or changed. Safe to call from many processes at once: one builds, the others wait for it."""
    if name in _handed_out:
        return _handed_out[name].path
    key_dir = key_dir or cache_root() / cache_key()
    key_dir.mkdir(parents=True, exist_ok=True)
    out, record = key_dir / name, key_dir / f"{name}.files.json"
    lock = FileLock(str(key_dir / f"{name}.lock"))
    try:
        lock.acquire(timeout=5)
    except Timeout:
        log.warning("waiting for another pytest process to build the shared test directory %s", out)
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    try:
        hashes = json.loads(record.read_text()) if record.exists() and out.exists() else None
        if hashes is not None and tree_hashes(out) != hashes:
            log.warning("the shared test directory %s no longer matches what its build wrote (%s): a test wrote "
                        "into it; rebuilding", out, ", ".join(differences(hashes, tree_hashes(out))[:5]))
            hashes = None
        if hashes is None:
            record.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            logging.getLogger("sdxl_trt").setLevel(logging.WARNING)
            _builder(name, key_dir)(out)
            hashes = tree_hashes(out)
            tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(hashes, indent=1))
            os.replace(tmp, record)
            log.info("built the shared test directory %s in %.0f s", out, time.perf_counter() - start)
    finally:
        lock.release()
    (key_dir / ".used").touch()
    _prune(key_dir)
    _handed_out[name] = SharedDir(name, out, hashes)
    return out


def _prune(keep: Path) -> None:
    """Remove the cache folders of other keys beyond the :data:`KEEP` most recently used, once unused for
    :data:`STALE_S` (an older checkout's tests may still be reading theirs)."""
    def last_use(d: Path) -> float:
        used = d / ".used"
        return used.stat().st_mtime if used.exists() else d.stat().st_mtime

    others = sorted((d for d in keep.parent.iterdir() if d.is_dir() and d != keep), key=last_use, reverse=True)
    for d in others[KEEP - 1:]:
        if time.time() - last_use(d) > STALE_S:
            log.info("removing the stale test cache %s", d)
            shutil.rmtree(d, ignore_errors=True)
