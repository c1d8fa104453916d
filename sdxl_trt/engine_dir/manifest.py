"""``manifest.json``: what makes an engine directory self-describing, and the checks made when it loads.

The manifest names the model (identity and hash), every component's file and its SHA-256, the backend,
precision and optimization profiles, the component contract's version, the library versions and the GPU the
engines were built on, the ONNX each engine came from and the export error figures. :func:`check_engine_dir`
refuses, with the rebuild command, an engine directory that does not fit this machine or this sdxl-trt's
contracts, or whose files changed.

engine/ writes it and runtime/ reads it; neither imports the other, both import this. It imports neither
TensorRT nor torch at import time: the runtime reads it on the hot start path.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdxl_trt.contracts import CONTRACT_VERSION
from sdxl_trt.errors import ManifestError
from sdxl_trt.files import write_atomic

from .environment import current_device, library_versions, sha256_file
from .layout import REQUIRED_COMPONENTS

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ComponentEntry:
    """One built component: its file, what it was built from, and how it was built."""

    file: str
    sha256: str
    size_bytes: int
    precision: str
    profiles: list[dict[str, Any]]
    source_hash: str  # ONNX file hash (onnxruntime/tensorrt) or model identity (torch)
    build_seconds: float
    export_error: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    backend: str
    precision: str
    model: dict[str, Any]  # name, kind, source, identity_hash
    model_dims: dict[str, Any]
    buckets: list[str]
    max_batch: int
    max_prompt_chunks: int
    profile_mode: str
    pipeline: dict[str, Any]  # vae_scaling_factor, force_zeros_for_empty_prompt, scheduler config, ...
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    refiner: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=library_versions)
    device: dict[str, Any] = field(default_factory=current_device)
    build_command: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format_version: int = FORMAT_VERSION
    contract_version: int | None = CONTRACT_VERSION
    """The component contracts the engines were built to; None: a manifest from before it was recorded
    (:func:`effective_contract_version` tells what such engines take)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["contract_version"] is None:  # an old manifest reads back as it was written
            del out["contract_version"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        d = dict(data)
        d["components"] = {k: ComponentEntry(**v) for k, v in d.get("components", {}).items()}
        d.setdefault("contract_version", None)
        return cls(**d)

    def save(self, directory: Path) -> Path:
        """Write atomically: a crash mid-write never leaves a half manifest that looks valid."""
        return write_atomic(directory / MANIFEST_NAME, json.dumps(self.to_json(), indent=2, sort_keys=False))

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not Path(directory).is_dir():
            raise ManifestError(f"engine directory {directory} does not exist; build it with `sdxl-trt build --out {directory}`")
        if not path.exists():
            raise ManifestError(
                f"{directory} has no {MANIFEST_NAME}: it is not an engine directory (or its build did not finish); "
                f"build it with `sdxl-trt build --model MODEL --out {directory}`"
            )
        try:
            data = json.loads(path.read_text())
            manifest = cls.from_json(data)
        except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is corrupt ({e}); rebuild the engines with `sdxl-trt build --out {directory}`") from e
        if manifest.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format version {manifest.format_version}, this sdxl-trt reads {FORMAT_VERSION}; "
                f"rebuild: {manifest.rebuild_hint(directory)}"
            )
        return manifest

    def rebuild_hint(self, directory: Path) -> str:
        return self.build_command or f"sdxl-trt build --model {self.model.get('name', 'MODEL')} --out {directory}"


def check_engine_dir(
    directory: Path,
    manifest: Manifest,
    *,
    verify_hashes: bool = True,
    device: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    check_model_source: bool = True,
) -> None:
    """Refuse an engine directory that this machine must not load, naming what changed and the fix.

    Checks: every component file is present with the recorded size and SHA-256 (a truncated or
    corrupt file), TensorRT engines match this GPU, compute capability and TensorRT major version,
    and (when the model's local source still exists) that the model was not changed since the build.
    """
    directory = Path(directory)
    hint = manifest.rebuild_hint(directory)
    if manifest.contract_version is not None and manifest.contract_version != CONTRACT_VERSION:
        raise ManifestError(
            f"engines in {directory} were built to component contract version {manifest.contract_version}, this "
            f"sdxl-trt runs version {CONTRACT_VERSION}: their inputs and outputs differ. Rebuild: {hint}"
        )
    for name, entry in manifest.components.items():
        path = directory / entry.file
        if not path.exists():
            raise ManifestError(f"{name}: engine file {path} is missing; rebuild: {hint}")
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise ManifestError(
                f"{name}: {path} is {size} bytes but was built as {entry.size_bytes} (truncated or replaced); rebuild: {hint}"
            )
        if verify_hashes and sha256_file(path) != entry.sha256:
            raise ManifestError(f"{name}: {path} does not match its recorded SHA-256 (corrupt or modified); rebuild: {hint}")

    if manifest.backend == "tensorrt":
        here = dict(device) if device is not None else current_device()
        built = manifest.device
        if here.get("type") != "cuda":
            raise ManifestError(f"TensorRT engines in {directory} need a CUDA GPU; this machine has none. "
                                f"Use an onnxruntime or torch engine directory here ({hint.replace('tensorrt', 'onnxruntime')})")
        for key, label in (("name", "GPU"), ("compute_capability", "compute capability")):
            if here.get(key) != built.get(key):
                raise ManifestError(
                    f"TensorRT engines in {directory} were built for {label} {built.get(key)!r}, this machine has "
                    f"{here.get(key)!r}; TensorRT plans only run on the GPU they were built for. Rebuild here: {hint}"
                )
        have = dict(versions) if versions is not None else library_versions()
        built_trt, here_trt = manifest.versions.get("tensorrt"), have.get("tensorrt")
        if here_trt is None:
            raise ManifestError(f"{directory} holds TensorRT engines but TensorRT is not installed: "
                                "pip install 'sdxl-trt[tensorrt]'")
        if built_trt and built_trt.split(".")[0] != here_trt.split(".")[0]:
            raise ManifestError(
                f"TensorRT engines in {directory} were built with TensorRT {built_trt}, this machine has {here_trt}: "
                f"plans do not load across major versions. Rebuild: {hint}"
            )

    if check_model_source:
        src = manifest.model.get("source", {})
        if src.get("type") in ("diffusers", "single_file") and Path(src.get("path", "")).exists():
            from sdxl_trt.identity import model_identity_hash

            now = model_identity_hash(src["path"])
            if now != manifest.model.get("identity_hash"):
                raise ManifestError(
                    f"the model at {src['path']} changed since these engines were built (hash "
                    f"{manifest.model.get('identity_hash', '')[:12]} -> {now[:12]}); rebuild: {hint}"
                )


def open_engine_dir(directory: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """The manifest of an engine directory that this machine can run, or a ManifestError naming the fix."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    check_engine_dir(directory, manifest, verify_hashes=verify_hashes)
    missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
    if missing:
        raise ManifestError(f"{directory} lacks engines for {missing}; rebuild: {manifest.rebuild_hint(directory)}")
    return manifest


def effective_contract_version(manifest: Manifest) -> int:
    """The contract version the engines were built to: the recorded one, else read off what an older build
    wrote (version 2 added ``unet_time_cond_dim`` to the model's widths)."""
    if manifest.contract_version is not None:
        return manifest.contract_version
    return 2 if "unet_time_cond_dim" in manifest.model_dims else 1


def unpassed_guidance_embedding(manifest: Manifest) -> int:
    """The time_cond_proj_dim of the model's UNet when its engines lack the ``timestep_cond`` input (built to
    contract version 1, before it existed); 0 otherwise.

    Only a guidance-distilled model is affected, so a version-1 directory of any other model still runs. The
    model's UNet config is read where it can still be seen: a preset, or the local diffusers directory the
    engines were built from. Elsewhere the old engines cannot be told apart and run as built.
    """
    if effective_contract_version(manifest) >= 2:
        return 0
    src = manifest.model.get("source") or {}
    config: dict[str, Any] = {}
    if src.get("type") == "preset":
        from sdxl_trt.presets import PRESETS

        preset = PRESETS.get(str(src.get("name")))
        config = preset.unet if preset is not None else {}
    elif src.get("type") == "diffusers":
        path = Path(str(src.get("path", ""))) / "unet" / "config.json"
        with contextlib.suppress(OSError, ValueError):
            config = json.loads(path.read_text())
    return int(config.get("time_cond_proj_dim") or 0)
