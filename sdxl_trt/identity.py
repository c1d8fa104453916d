"""Model identity hashes, computable without loading (or importing) any model library.

Used to decide whether exported ONNX and built engines are stale, and to refuse engines whose
model changed since they were built.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .engine_dir.environment import sha256_file
from .errors import ModelLoadError
from .files import write_atomic
from .presets import PRESETS, Preset


def preset_identity_hash(preset: Preset) -> str:
    """Configs plus seed fully determine a preset's random weights."""
    payload = {"preset": preset.name, "seed": preset.seed, "init_scheme": 2, "unet": preset.unet, "vae": preset.vae,
               "te": preset.text_encoder, "te2": preset.text_encoder_2}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


CACHE_ENV = "SDXL_TRT_CACHE_DIR"
_CACHE_ENTRIES = 4096
_RACY_NS = 2_000_000_000
"""A file modified less than this before it was hashed is not cached: a second write within the same
timestamp tick would keep size and mtime and could pass for the first (git's "racy" rule)."""


def _hash_cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sdxl-trt")
    return Path(root) / "file-hashes.json"


def _read_hash_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    """SHA-256 of every byte of ``path``, remembered per (path, size, mtime, inode) so a 7 GB checkpoint is read
    once, not at every build and load. A merged LoRA changes bytes in the middle of a file: sampling the
    ends would miss it, so nothing short of the full hash is trusted."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = _hash_cache_path()
    cache = _read_hash_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        cache[key] = digest
        try:
            write_atomic(cache_file, json.dumps(dict(list(cache.items())[-_CACHE_ENTRIES:])))
        except OSError:  # a read-only home only costs the next hash its speed
            pass
    return digest


def hash_model_files(path: Path) -> str:
    """A content hash of a model directory (every file, by relative name) or of one file."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        h.update(f"{rel}:{f.stat().st_size}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_identity_hash(source: str | Path) -> str:
    """The identity hash of a preset name or a local model path."""
    text = str(source)
    if text in PRESETS:
        return preset_identity_hash(PRESETS[text])
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return hash_model_files(path)
