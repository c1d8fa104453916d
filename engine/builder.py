"""The seam between ``build_engines`` and the backends: one protocol each backend implements.

A build has a *source*, what its engines are made from (the verified ONNX export for tensorrt and
onnxruntime; the PyTorch modules, described by a model summary, for torch), and a *builder* that turns one
component of it into one engine file. ``build_engines`` drives any pair the same way: for each component, the
source's hash decides freshness, then ``build`` writes the engine; at the end the source writes the weight map.

This module imports no backend library and no export code, so the TensorRT backend's type check stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.engine_dir.profiles import Profile

if TYPE_CHECKING:
    from sdxl_trt.export.result import ExportResult


@dataclass(frozen=True)
class BuiltEngine:
    """One engine a builder wrote."""

    file: str  # its name inside the engine directory
    info: dict[str, Any] = field(default_factory=dict)  # the backend's build facts: the manifest entry's ``extra``
    export_error: dict[str, float] | None = None  # measured by the builder itself (torch); None: the export's


class Builder(Protocol):
    """Turns one component into one engine file in ``out``, in ``precision`` (the component's own, from
    ``contracts.component_precision``), accepting every shape ``profiles`` allow."""

    def build(self, component: str, *, precision: str, spec: ComponentSpec, profiles: Sequence[Profile],
              out: Path) -> BuiltEngine: ...


class BuildSource(Protocol):
    """What the engines are built from."""

    @property
    def export(self) -> ExportResult:
        """The model's description (and, for ONNX sources, its verified files)."""
        ...

    def source_hash(self, component: str, precision: str) -> str:
        """Changes whenever the engine built from this source would (the freshness key's source part)."""
        ...

    def save_weight_map(self, out: Path) -> None:
        """Write ``weight_map.json`` for the engines in ``out`` (LoRA switching reads it)."""
        ...


class OnnxFiles(Protocol):
    """An ONNX source as the ONNX-based builders (tensorrt, onnxruntime) read it."""

    @property
    def export(self) -> ExportResult: ...

    def onnx_for(self, component: str, precision: str) -> tuple[Path, dict[str, Any]]:
        """The ONNX file to build ``component`` in ``precision`` from (for INT8: the Q/DQ UNet, calibrated on
        first use) and facts about it for the manifest (the INT8 report)."""
        ...
