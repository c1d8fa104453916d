"""ONNX Runtime implementation of the Engine protocol: I/O binding on the caller's preallocated buffers.

ONNX Runtime writes outputs straight into the arena's views (``bind_output`` with the buffer's
address), so a call allocates no tensors of its own beyond what ORT uses internally. On CUDA it runs on a
stream of its own, so ``run`` first waits for the caller's torch stream (the one exception to the Engine
protocol's no-synchronisation rule; such an engine is never captured in a graph anyway).

Runtime LoRAs replace initializers: a session is created with ``add_initializer`` overrides holding the
merged weights (always base + deltas, never delta on delta), and the last few sessions are kept, keyed by
their LoRA set, so switching back and forth between a service's styles builds no session twice.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.engine_dir.layout import preferred_providers

from .engine import Shape, check_input_shapes

log = logging.getLogger(__name__)

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when set: the one thread knob torch reads, so that a CPU process sized with it (a
    container's share, a test worker's) sizes ONNX Runtime's pool alike instead of one thread per core. Measured:
    the tiny pipeline beside a busy core took 1.83 s of CPU with 2 threads, 1.42 s with 1."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class OnnxRuntimeEngine:
    backend = "onnxruntime"
    graph_safe = False  # ONNX Runtime launches on its own stream: a capture would record none of it

    def __init__(self, path: Path, spec: ComponentSpec, profiles: Sequence[Any], *, device: torch.device,
                 providers: Sequence[str] | None = None, intra_op_threads: int | None = None) -> None:
        self.spec = spec
        self.profiles = profiles
        self.device = device
        self.path = Path(path)
        self._intra_op_threads = intra_op_threads or _omp_threads()
        self._providers = list(providers) if providers else preferred_providers(device.type)
        self.session = self._new_session({})
        self.providers = self.session.get_providers()
        log.info("%s: ONNX Runtime providers %s", spec.name, self.providers)
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0
        self._sessions: OrderedDict[Hashable, tuple[Any, Mapping[str, np.ndarray]]] = OrderedDict()
        self._sessions[()] = (self.session, {})

    SESSIONS_KEPT = 3
    """Sessions kept per engine (the base weights' and the last LoRA sets'): each holds a copy of the weights."""

    def _new_session(self, overrides: Mapping[str, np.ndarray]) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT_ENABLE_ALL's layout transforms (NCHWc) pre-pack Conv weights from the model file and ignore
        # add_initializer overrides for them (measured: zeroing conv_in changed nothing), so a session with
        # overrides stops at the EXTENDED level.
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if overrides
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if self._intra_op_threads:
            opts.intra_op_num_threads = self._intra_op_threads
        # A pipeline alternates sessions (ControlNet, UNet, ControlNet...): a finished session's pool threads
        # must not spin on the cores the next session needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in overrides.values()]
        for name, value in zip(overrides, values, strict=True):
            opts.add_initializer(name, value)  # replaces the model's initializer of that name
        session = ort.InferenceSession(str(self.path), opts, providers=self._providers)
        session._sdxl_trt_overrides = values  # ORT reads the OrtValues in place: they live as long as the session
        return session

    def has_weights(self, key: Hashable) -> bool:
        """Whether a kept session already holds the weight set ``key``."""
        return key in self._sessions

    def set_weights(self, key: Hashable, overrides: Mapping[str, np.ndarray]) -> None:
        """Run with these initializer values (ONNX names; ``{}`` with key ``()``: the file's own) from now on.

        ``key`` names the weight set (the LoRA set) so that a recent set's session is reused."""
        cached = self._sessions.get(key)
        if cached is None:
            # The arrays must outlive the session: ORT reads them in place.
            cached = (self._new_session(overrides), dict(overrides))
            self._sessions[key] = cached
            while len(self._sessions) > self.SESSIONS_KEPT:
                oldest = next(k for k in self._sessions if k != ())  # the base session is always kept
                del self._sessions[oldest]
        self._sessions.move_to_end(key)
        self.session = cached[0]

    def infer_shapes(self, input_shapes: Mapping[str, Shape], profile: int) -> dict[str, Shape]:
        return check_input_shapes(self.spec, self.profiles, input_shapes, profile)

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], *, profile: int,
            stream: torch.cuda.Stream | None = None) -> None:
        binding = self.session.io_binding()
        for name, t in inputs.items():
            self._bind(binding.bind_input, name, t)
        for name, t in outputs.items():
            self._bind(binding.bind_output, name, t)
        if self._ort_device == "cuda":
            # torch fills the bound inputs on its stream and ONNX Runtime reads them from its own: without this
            # wait it can read them before torch has written them. (ORT synchronises its own stream at the end
            # of a run, so torch's later work reads finished outputs.)
            (stream if stream is not None else torch.cuda.current_stream(self.device)).synchronize()
        self.session.run_with_iobinding(binding)

    def _bind(self, bind: Any, name: str, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError(f"{self.spec.name}.{name}: buffer must be contiguous")
        bind(name, self._ort_device, self._device_id, _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
