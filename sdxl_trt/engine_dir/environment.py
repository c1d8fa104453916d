"""Where an engine directory was built and where it is loaded: library versions and the device identity.

Both sides record or compare these facts: export/ and engine/ write them into their manifests, the
runtime's load checks (:func:`~sdxl_trt.engine_dir.manifest.check_engine_dir`) compare them with this
machine. Nothing here imports torch at module import time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

TRACKED_LIBRARIES = ("sdxl-trt", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "diffusers")


def sha256_file(path: Path, *, chunk: int = 1 << 24) -> str:
    """SHA-256 of every byte of ``path`` (no cache: an engine file's check must read what is on disk)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the libraries an engine depends on (absent ones are left out)."""
    out = {}
    for n in (*TRACKED_LIBRARIES, *names):
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def current_device() -> dict[str, Any]:
    """The GPU this process would build for (name, compute capability), or the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            idx = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(idx)
            return {"type": "cuda", "name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "compute_capability": None}
