"""The ONNX source of the tensorrt and onnxruntime backends: the verified export in ``DIR/onnx/``, exported
(or found up to date) first, and the INT8 Q/DQ UNet calibrated from it when a build asks for int8."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxl_trt.buckets import SDXL_BUCKETS, Bucket, parse_buckets
from sdxl_trt.contracts import QDQ_PRECISIONS, onnx_precision
from sdxl_trt.engine_dir.layout import ONNX_DIR_NAME, WEIGHT_MAP_NAME, onnx_file_name
from sdxl_trt.export.result import ExportResult
from sdxl_trt.lora import LoraSpec

from .models import load_base
from .options import BuildOptions

log = logging.getLogger(__name__)


@dataclass
class OnnxExport:
    """:class:`~.builder.BuildSource` and :class:`~.builder.OnnxFiles` over an ONNX export directory."""

    opts: BuildOptions
    onnx_dir: Path
    export: ExportResult
    loras: list[LoraSpec] = field(default_factory=list)
    _int8: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def run(cls, opts: BuildOptions, out: Path, precision: str, *, loras: list[LoraSpec],
            controlnets: list[Any], backend: str | None = None) -> OnnxExport:
        """Export what is missing or stale into ``out/onnx`` for engines of ``precision`` on ``backend`` (TensorRT:
        the typed files, fp16 for fp16/int8/fp8)."""
        from sdxl_trt.export.exporter import export_model

        onnx_dir = out / ONNX_DIR_NAME
        export_precision = onnx_precision(precision, backend)
        log.info("export: %s -> %s (%s)", opts.model, onnx_dir, export_precision)
        export = export_model(opts.model, out=onnx_dir, refiner=opts.refiner, precision=export_precision,
                              device=opts.device, model_config=opts.model_config, loras=loras,
                              controlnets=controlnets, deepcache=opts.deepcache)
        return cls(opts, onnx_dir, export, loras=list(loras))

    def source_hash(self, component: str, precision: str) -> str:
        """The exported file's SHA-256 (the precision is in the file; INT8 follows from the fp32 UNet). An FP8
        build with ``fp8_attention`` parses another Q/DQ file from the same export, so its key says so: a rebuild
        that turns the option on or off is not "up to date"."""
        sha = self.export.components[component].sha256
        return f"{sha}+fp8-attention" if precision == "fp8" and self.opts.fp8_attention else sha

    def onnx_for(self, component: str, precision: str) -> tuple[Path, dict[str, Any]]:
        if precision not in QDQ_PRECISIONS:
            return self.onnx_dir / onnx_file_name(component), {}
        if (component, precision) not in self._int8:
            self._int8[(component, precision)] = self._quantize(component, precision)
        return self._int8[(component, precision)]

    def _quantize(self, component: str, precision: str) -> tuple[Path, dict[str, Any]]:
        """Explicit INT8 / FP8 (Q/DQ) UNet from calibration on the shipped prompt set (engine/int8/__init__.py).

        On an fp16 export (TensorRT: strongly typed) the Q/DQ nodes go into the fp16 UNet, the file returned; the
        ranges are measured on the fp32 model and the error on an fp32 twin (an fp32 UNet exported beside,
        ``onnx/fp32/``), which ONNX Runtime runs on the CPU with the Q/DQ pairs intact. The model is loaded inside
        the step and dropped before the Q/DQ files are written, so the build's peak host memory is the larger of
        the two, not their sum."""
        from .int8 import build_int8_unet

        opts = self.opts
        fp32_unet = self.onnx_dir / onnx_file_name(component)
        typed: tuple[Path, Path] | None = None
        if self.export.precision == "fp16":
            from sdxl_trt.export.exporter import export_model

            fp32_dir = self.onnx_dir / "fp32"
            export_model(opts.model, out=fp32_dir, precision="fp32", device=opts.device, components=[component],
                         model_config=opts.model_config, loras=self.loras)
            typed = (fp32_unet, self.onnx_dir / onnx_file_name(component, precision))
            fp32_unet = fp32_dir / onnx_file_name(component)
        out = self.onnx_dir / onnx_file_name(component, precision)
        if typed is not None:
            out = self.onnx_dir / "fp32" / onnx_file_name(component, precision)
        native = [Bucket.parse(b) for b in self.export.native_buckets or []] or [SDXL_BUCKETS[0]]
        b = parse_buckets(opts.buckets, default=native)[0]
        log.info("%s: calibrating the UNet on %d prompts x %d steps at %s (%s ranges)", precision,
                 opts.calibration_prompts, opts.calibration_steps, b, opts.calibration_backend)
        report = build_int8_unet(lambda: load_base(opts), fp32_unet, out, num_prompts=opts.calibration_prompts,
                                 steps=opts.calibration_steps, width=b.width, height=b.height,
                                 backend=opts.calibration_backend,  # type: ignore[arg-type]
                                 fmt=precision, typed=typed,  # type: ignore[arg-type]
                                 attention=precision == "fp8" and opts.fp8_attention)
        log.info("%s", report.summary())
        return (typed[1] if typed else out), {"int8": report.to_json()}

    def save_weight_map(self, out: Path) -> None:
        """The export's map (ONNX and torch names of every LoRA-able weight) goes beside the engines."""
        if (self.onnx_dir / WEIGHT_MAP_NAME).exists():
            shutil.copyfile(self.onnx_dir / WEIGHT_MAP_NAME, out / WEIGHT_MAP_NAME)
