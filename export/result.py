"""What the export stage hands the build: :class:`ExportResult`, saved as the ONNX directory's ``manifest.json``.

``export_model`` returns one after exporting (and saves it); ``model_summary`` returns one with no components
for the torch backend, which builds from the PyTorch modules instead of ONNX. The build reads only these fields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdxl_trt.contracts import CONTRACT_VERSION, ModelDims, contract_of, controlnet_names
from sdxl_trt.files import write_atomic

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "manifest.json"

RESIDUAL_INPUTS = "controlnet-residuals"
"""Marks the identity of a UNet exported with residual inputs: never reused for a plain build, nor the reverse."""


def component_identity(component: str, *, base: str, refiner: str | None = None,
                       controlnets: Mapping[str, str] | None = None, residual_unet: bool = False,
                       deepcache: Sequence[int] = ()) -> str:
    """What one component's export (or torch engine) depends on besides its precision: its model's identity
    (``base`` with any LoRAs fused), a ControlNet's own (``controlnets``: NAME -> identity), and for a UNet that
    takes ControlNet residuals or returns step-caching features (``deepcache``: the built branches), a mark that
    it is another program."""
    if contract_of(component) == "controlnet":
        return (controlnets or {})[controlnet_names([component])[0]]
    if component == "refiner":
        if refiner is None:
            raise ValueError("the refiner's identity is needed but the export has no refiner")
        return refiner
    if component == "unet" and deepcache:
        return f"{base}+deepcache-{','.join(map(str, sorted(set(deepcache))))}"
    return f"{base}+{RESIDUAL_INPUTS}" if component == "unet" and residual_unet else base


def settings_key(component: str, precision: str, identity: str) -> str:
    """What an exported file depends on: the model, the component, its precision, the contract."""
    return f"{identity}:{component}:{precision}:contract-v{CONTRACT_VERSION}"


@dataclass(frozen=True)
class ExportedComponent:
    """One verified ONNX file of the export."""

    file: str
    sha256: str
    size_bytes: int
    precision: str
    settings: str  # settings_key(): a file whose key differs is exported again
    relative_error: dict[str, float]  # per output, against PyTorch through ONNX Runtime
    max_abs_error: dict[str, float] = field(default_factory=dict)
    fp32_relative_error: dict[str, float] | None = None  # an fp16 file against PyTorch fp32 (None: fp32 file)
    external_data: str | None = None
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    verify_dims: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportedComponent:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ExportResult:
    """The model an export (or a torch build's summary) describes, and its verified files."""

    model: dict[str, Any]  # name, kind, source, identity_hash (+ loras, fused_identity when LoRAs are fused)
    model_dims: ModelDims
    pipeline: dict[str, Any]  # vae_scaling_factor, force_zeros_for_empty_prompt, ... (the engine manifest's)
    refiner: dict[str, Any] | None = None
    native_buckets: list[str] | None = None  # a preset's buckets; None: SDXL's
    components: dict[str, ExportedComponent] = field(default_factory=dict)  # empty for a summary
    controlnets: dict[str, dict[str, Any]] = field(default_factory=dict)  # NAME -> source, identity_hash, config
    precision: str | None = None  # the ONNX precision asked for; None: a summary, nothing exported
    vae_precision: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    weight_map: str | None = None  # file name of the export's weight map, beside the manifest
    assets_dir: Path | None = None  # where tokenizers and scheduler configs are (not saved: it is the directory)

    def identity(self, component: str) -> str:
        """:func:`component_identity` of ``component`` in this export."""
        return component_identity(
            component, base=self.model.get("fused_identity") or self.model["identity_hash"],
            refiner=(self.refiner or {}).get("identity_hash"),
            controlnets={n: e["identity_hash"] for n, e in self.controlnets.items()},
            residual_unet=bool(self.controlnets), deepcache=[k for k, _, _ in self.model_dims.deepcache_features])

    def relative_error(self, component: str) -> dict[str, float]:
        """The component's export error against PyTorch ({} when it was not exported to ONNX)."""
        entry = self.components.get(component)
        return dict(entry.relative_error) if entry else {}

    def to_json(self) -> dict[str, Any]:
        """The export manifest, in the order it has always been written."""
        return {
            "stage": "export", "model": self.model, "refiner": self.refiner, "precision": self.precision,
            "vae_precision": self.vae_precision, "model_dims": self.model_dims.to_json(),
            "native_buckets": self.native_buckets, "pipeline": self.pipeline, "versions": self.versions,
            "device": self.device, "components": {k: v.to_json() for k, v in self.components.items()},
            "controlnets": self.controlnets, "weight_map": self.weight_map,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, assets_dir: Path | None = None) -> ExportResult:
        return cls(
            model=dict(data["model"]), model_dims=ModelDims.from_json(data["model_dims"]),
            pipeline=dict(data["pipeline"]), refiner=data.get("refiner"), native_buckets=data.get("native_buckets"),
            components={k: ExportedComponent.from_json(v) for k, v in (data.get("components") or {}).items()},
            controlnets=dict(data.get("controlnets") or {}), precision=data.get("precision"),
            vae_precision=data.get("vae_precision"), versions=dict(data.get("versions") or {}),
            device=dict(data.get("device") or {}), weight_map=data.get("weight_map"), assets_dir=assets_dir,
        )

    def save(self, directory: Path) -> Path:
        return write_atomic(Path(directory) / EXPORT_MANIFEST, json.dumps(self.to_json(), indent=2))


def read_export_manifest(directory: Path) -> ExportResult | None:
    """The export saved in ``directory``, or None when there is none or it cannot be read (export again)."""
    path = Path(directory) / EXPORT_MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("stage") != "export":
            return None
        return ExportResult.from_json(data, assets_dir=Path(directory))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("%s is corrupt; exporting everything again", path)
        return None
