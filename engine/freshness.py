"""When a component is not built again: the previous manifest's entry still describes what would be built.

A component is rebuilt only when its source (ONNX hash, or the model identity for torch), precision, profiles,
backend or the contract version changed, or its file no longer matches the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trt.contracts import CONTRACT_VERSION, CONTROLNET, contract_of
from sdxl_trt.engine_dir.environment import sha256_file
from sdxl_trt.engine_dir.manifest import Manifest, effective_contract_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildKey:
    """What an engine depends on, beside its backend and the contract version."""

    source_hash: str
    precision: str
    profiles: list[dict[str, Any]]  # Profile.to_json() of each


def previous_manifest(out: Path) -> Manifest | None:
    try:
        return Manifest.load(out)
    except Exception:  # noqa: BLE001 - any unreadable manifest means: rebuild everything
        return None


def is_fresh(prev: Manifest | None, out: Path, name: str, key: BuildKey, backend: str) -> bool:
    if prev is None or prev.backend != backend or effective_contract_version(prev) != CONTRACT_VERSION:
        return False
    if name not in prev.components:
        return False
    e = prev.components[name]
    if (e.source_hash, e.precision, e.profiles) != (key.source_hash, key.precision, key.profiles):
        return False
    path = out / e.file
    return path.exists() and path.stat().st_size == e.size_bytes and sha256_file(path) == e.sha256


def drop_old_controlnets(prev: Manifest | None, manifest: Manifest, out: Path) -> None:
    """A rebuild without a ControlNet the directory had: its engine file goes with its manifest entry."""
    for name, entry in (prev.components.items() if prev else []):
        if contract_of(name) == CONTROLNET and name not in manifest.components:
            log.info("%s: no longer built; removing %s", name, entry.file)
            (out / entry.file).unlink(missing_ok=True)
