"""Atomic file writes: the one way this project replaces a file that another process may be reading.

Every manifest, map, plan and cache is written to a temporary file in the same directory, flushed to disk
(``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and Windows), so a reader sees the
old file or the new one, never half of either, and a crash mid-write leaves the old file in place. The
temporary name is unique per writer (two builds writing one cache never share it) and is removed if the write
fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
