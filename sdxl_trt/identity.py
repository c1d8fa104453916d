"""Model identity hashes, computable without loading (or importing) any model library.

Used to decide whether exported ONNX and built engines are stale, and to refuse engines whose
model changed since they were built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ModelLoadError
from .presets import PRESETS, Preset


def preset_identity_hash(preset: Preset) -> str:
    """Configs plus seed fully determine a preset's random weights."""
    payload = {"preset": preset.name, "seed": preset.seed, "init_scheme": 2, "unet": preset.unet, "vae": preset.vae,
               "te": preset.text_encoder, "te2": preset.text_encoder_2}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def hash_model_files(path: Path, *, sample_bytes: int = 1 << 22) -> str:
    """A content hash of a model directory or file: all small files in full, large weight files by size
    plus their first and last 4 MiB. Reading every byte of a 7 GB model at each build is too slow for
    staleness checks; changed weights virtually always change the sampled bytes too."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        size = f.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 2 * sample_bytes:
                h.update(fh.read())
            else:
                h.update(fh.read(sample_bytes))
                fh.seek(size - sample_bytes)
                h.update(fh.read(sample_bytes))
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
