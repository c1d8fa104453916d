"""Atomic file writes: the one way this project replaces a file that another process may be reading; and the
process's scratch folders, removed when it exits.

Every manifest, map, plan and cache is written to a temporary file in the same directory, flushed to disk
(``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and Windows), so a reader sees the
old file or the new one, never half of either, and a crash mid-write leaves the old file in place. The
temporary name is unique per writer (two builds writing one cache never share it) and is removed if the write
fails.

Scratch folders (:func:`process_temp_dir`) hold what a load writes for itself (a preset's weightless configs, a
summary's assets): under one temporary root per process, removed at exit, so a service or a script that loads
models over and over leaves nothing behind in the temporary directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller (or a library: ``torch.export.save``, ``onnx.save``) to
    write; on a clean exit it is synced and renamed to ``path``, on an error removed.

    ``suffix``: what the temporary name ends in, for writers that insist on an extension (``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: str | bytes | memoryview) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def replace_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` a copy of the directory ``src`` (what was at ``dst`` before is removed first)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


_scratch_root: Path | None = None
_scratch_lock = threading.Lock()


def process_temp_dir(name: str) -> Path:
    """A new empty folder ``<root>/<name>-XXXXXXXX``, where ``<root>`` is this process's temporary root
    (``sdxl-trt-<pid>-...`` in the system's temporary directory), removed with all it holds when the process
    exits normally (atexit: also after SIGTERM where the process handles it, as the service does; not after
    SIGKILL). A child forked from this process inherits the exit hook but never runs it: only the process that
    made the root removes it."""
    global _scratch_root
    with _scratch_lock:
        if _scratch_root is None or not _scratch_root.is_dir():
            root = Path(tempfile.mkdtemp(prefix=f"sdxl-trt-{os.getpid()}-"))
            atexit.register(_remove_scratch_root, root, os.getpid())
            _scratch_root = root
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_scratch_root))


def _remove_scratch_root(root: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(root, ignore_errors=True)
