"""ONNX Runtime implementation of the Engine protocol: I/O binding on the caller's preallocated buffers.

ONNX Runtime writes outputs straight into the arena's views (``bind_output`` with the buffer's
address), so a call allocates no tensors of its own beyond what ORT uses internally.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.engine_dir.layout import preferred_providers

from .engine import Shape, check_input_shapes

log = logging.getLogger(__name__)

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


class OnnxRuntimeEngine:
    backend = "onnxruntime"
    graph_safe = False  # ONNX Runtime launches on its own stream: a capture would record none of it

    def __init__(self, path: Path, spec: ComponentSpec, profiles: Sequence[Any], *, device: torch.device,
                 providers: Sequence[str] | None = None, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.spec = spec
        self.profiles = profiles
        self.device = device
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        chosen = list(providers) if providers else preferred_providers(device.type)
        self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        self.providers = self.session.get_providers()
        log.info("%s: ONNX Runtime providers %s", spec.name, self.providers)
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def infer_shapes(self, input_shapes: Mapping[str, Shape], profile: int) -> dict[str, Shape]:
        return check_input_shapes(self.spec, self.profiles, input_shapes, profile)

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], *, profile: int,
            stream: torch.cuda.Stream | None = None) -> None:
        binding = self.session.io_binding()
        for name, t in inputs.items():
            self._bind(binding.bind_input, name, t)
        for name, t in outputs.items():
            self._bind(binding.bind_output, name, t)
        self.session.run_with_iobinding(binding)

    def _bind(self, bind: Any, name: str, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError(f"{self.spec.name}.{name}: buffer must be contiguous")
        bind(name, self._ort_device, self._device_id, _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
