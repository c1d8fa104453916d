"""ONNX Runtime engines: the verified ONNX files plus session settings.

Building copies (hard-links where possible) each ONNX file and its external data into the engine
directory, so the engine directory is self-contained. The execution providers are chosen at load time
from what is installed (``sdxl_trt.engine_dir.layout.preferred_providers``); the choice is logged.
:class:`OnnxRuntimeBuilder` is this backend's :class:`~.builder.Builder`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.engine_dir.layout import engine_file_name
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.errors import BuildError

from .builder import BuiltEngine, OnnxFiles


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_onnxruntime_engine(onnx_path: Path, out_path: Path) -> dict[str, Any]:
    """Place ``onnx_path`` (and its ``.data`` file) at ``out_path``; returns build info for the manifest."""
    _link_or_copy(onnx_path, out_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    info: dict[str, Any] = {"external_data": None}
    if data.exists():
        # The graph names its data file relatively; keep the same base name beside the copy.
        if out_path.name != onnx_path.name:
            raise BuildError(f"an ONNX file with external data must keep its name: {onnx_path.name} -> {out_path.name}")
        _link_or_copy(data, out_path.with_name(data.name))
        info["external_data"] = data.name
    return info


@dataclass(frozen=True)
class OnnxRuntimeBuilder:
    """The engine is the ONNX file itself (an INT8 UNet: its Q/DQ file); shapes are dynamic, profiles unused."""

    source: OnnxFiles

    def build(self, component: str, *, precision: str, spec: ComponentSpec, profiles: Sequence[Profile],
              out: Path) -> BuiltEngine:
        src, info = self.source.onnx_for(component, precision)
        dst = out / engine_file_name(component, "onnxruntime", precision)
        return BuiltEngine(dst.name, {**info, **build_onnxruntime_engine(src, dst)})
