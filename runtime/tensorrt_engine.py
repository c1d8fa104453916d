"""TensorRT implementation of the Engine protocol: one deserialized plan, one context per profile.

What may happen where:

* Load (``TensorRTEngine.load``): deserialize, check the plan against the contract, create one execution
  context per optimization profile (user-managed device memory) and bind it to its profile, attach the
  contexts to a :class:`SharedDeviceMemory`. Allocation and synchronisation are allowed here.
* ``run`` (the hot path, also inside CUDA-graph capture): ``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3`` on the caller's stream. No synchronisation, no allocation, no shape arithmetic;
  shapes were checked by ``infer_shapes``.

runtime/ never imports export/ or diffusers; TensorRT is imported only when an engine is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.errors import BackendUnavailableError, InvalidRequestError, ManifestError
from sdxl_trt.tensorrt_support import INSTALL_HINT, logger_bridge

from .engine import Shape, check_input_shapes

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)



class SharedDeviceMemory:
    """One device byte block that every TensorRT execution context uses as its scratch memory.

    SDXL's stages (text encoders, UNet, VAE) run one after another on one stream, so they never need
    scratch memory at the same time: a single block sized for the largest engine serves them all (the
    TensorRT demo's ``activate_engines``). Engines that share a block must be enqueued on one stream.
    Load every engine (each :meth:`attach`-es), then :meth:`allocate` once.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self._block: torch.Tensor | None = None
        self._users: list[tuple[int, Callable[[int, int], None]]] = []

    @property
    def nbytes(self) -> int:
        return 0 if self._block is None else self._block.numel()

    @property
    def address(self) -> int:
        return 0 if self._block is None else self._block.data_ptr()

    @property
    def required(self) -> int:
        """The largest size any attached user needs."""
        return max((n for n, _ in self._users), default=0)

    def attach(self, nbytes: int, bind: Callable[[int, int], None]) -> None:
        """Register a user that needs ``nbytes``; ``bind(address, size)`` is called once the block exists
        and again whenever it grows. Attaching after :meth:`allocate` binds at once (growing if needed)."""
        self._users.append((nbytes, bind))
        if self._block is None:
            return
        if nbytes > self.nbytes:
            self.allocate()
        else:
            bind(self.address, self.nbytes)

    def allocate(self) -> None:
        """Allocate (or grow) the block to the largest attached need and bind every user. Load time only."""
        if self._block is not None and self.nbytes >= self.required:
            return
        if self._block is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # enqueued work may still use the old block
            self._block = None
        self._block = torch.empty(self.required, dtype=torch.uint8, device=self.device)  # 256-byte aligned
        log.info("TensorRT shared device memory: %.1f MiB for %d engine(s)", self.nbytes / 2**20, len(self._users))
        for _, bind in self._users:
            bind(self.address, self.nbytes)


class TensorRTEngine:
    """A TensorRT plan behind the Engine protocol (``infer_shapes``, ``run``). Build one with :meth:`load`."""

    backend = "tensorrt"
    graph_safe = True  # execute_async_v3 enqueues on the caller's stream

    def __init__(
        self,
        engine: trt.ICudaEngine,
        spec: ComponentSpec,
        profiles: Sequence[Any],
        *,
        device_memory: SharedDeviceMemory,
        device: torch.device | str = "cuda",
        name: str = "",
        rebuild: str = "rebuild the engines on this machine",
        keep_alive: tuple[object, ...] = (),
    ) -> None:
        """Check ``engine`` against the contract, create one context per profile, attach to ``device_memory``."""
        import tensorrt as trt

        self.spec = spec
        self.profiles = profiles
        self.device = torch.device(device)
        self.name = name or spec.name
        self._engine = engine
        self._keep_alive = keep_alive  # TensorRT needs its runtime and logger to outlive the engine
        self._check_against_contract(engine, rebuild)
        # The dtype of each bound tensor, for the caller's buffer arena.
        self.tensor_dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in spec.input_names + spec.output_names}

        stream = torch.cuda.current_stream(self.device)
        self._contexts: list[trt.IExecutionContext] = []
        for i in range(engine.num_optimization_profiles):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise ManifestError(f"{spec.name}: TensorRT could not create an execution context for {self.name}")
            if not context.set_optimization_profile_async(i, stream.cuda_stream):
                raise ManifestError(f"{spec.name}: TensorRT could not select profile {i} of {self.name}")
            self._contexts.append(context)
        stream.synchronize()  # load time: the profile switches are done before any run
        self.scratch_bytes = max([engine.device_memory_size_v2]
                                 + [engine.get_device_memory_size_for_profile_v2(i) for i in range(len(self._contexts))])
        self._memory_bound = False
        self.device_memory = device_memory
        device_memory.attach(self.scratch_bytes, self._bind_device_memory)

    @classmethod
    def load(
        cls,
        path: str | Path,
        spec: ComponentSpec,
        profiles: Sequence[Any],
        *,
        device_memory: SharedDeviceMemory | None = None,
        device: torch.device | str = "cuda",
        rebuild_hint: str | None = None,
        weight_streaming_budget: int | None = None,
    ) -> TensorRTEngine:
        """Deserialize the plan at ``path``. Without ``device_memory`` the engine gets a block of its own;
        with one, call ``device_memory.allocate()`` after loading every engine that shares it."""
        _require_tensorrt()
        import tensorrt as trt

        path = Path(path)
        rebuild = f"rebuild it: {rebuild_hint}" if rebuild_hint else "rebuild the engines on this machine"
        if not path.is_file():
            raise ManifestError(f"{spec.name}: TensorRT plan {path} is missing; {rebuild}")
        logger = logger_bridge(log)
        runtime = trt.Runtime(logger)
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ManifestError(
                f"{spec.name}: TensorRT {trt.__version__} could not deserialize {path} on "
                f"{torch.cuda.get_device_name(device)}. A plan loads only with the TensorRT version and GPU model "
                f"it was built with, so it was most likely built with another TensorRT version or for another "
                f"GPU; {rebuild}"
            )
        if weight_streaming_budget is not None:
            engine.weight_streaming_budget_v2 = weight_streaming_budget  # before device memory is sized
        own_memory = device_memory is None
        memory = SharedDeviceMemory(device) if device_memory is None else device_memory
        loaded = cls(engine, spec, profiles, device_memory=memory, device=device, name=str(path), rebuild=rebuild,
                     keep_alive=(runtime, logger))
        if own_memory:
            memory.allocate()
        log.info("%s: loaded %s (%d profile(s), %.1f MiB scratch)", spec.name, path, len(loaded._contexts),
                 loaded.scratch_bytes / 2**20)
        return loaded

    def infer_shapes(self, input_shapes: Mapping[str, Shape], profile: int) -> dict[str, Shape]:
        return check_input_shapes(self.spec, self.profiles, input_shapes, profile)

    @property
    def refittable(self) -> bool:
        return bool(self._engine.refittable)

    def set_weights(self, values: Mapping[str, np.ndarray], *, rebuild: str = "rebuild with --refittable") -> None:
        """Refit the named weights (ONNX initializer names) with ``values``; engines, contexts, device memory
        and CUDA graphs stay as they are. The caller passes base + deltas for every weight a switch touches
        (weights it omits keep their current values), so switches never drift (no delta on delta)."""
        import tensorrt as trt

        if not self._engine.refittable:
            raise InvalidRequestError(f"{self.spec.name}: {self.name} was built without refit, so it cannot take a "
                                      f"LoRA at run time; {rebuild} (or fuse the LoRA at build with --lora)",
                                      param="loras")
        refitter = trt.Refitter(self._engine, logger_bridge(log))
        keep = []  # the arrays must stay alive until refit_cuda_engine returns
        for name, value in values.items():
            array = np.ascontiguousarray(value)
            keep.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise InvalidRequestError(f"{self.spec.name}: TensorRT has no refittable weight {name!r} in "
                                          f"{self.name}; {rebuild}", param="loras")
        torch.cuda.current_stream(self.device).synchronize()  # no enqueued work may read the old weights
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise InvalidRequestError(f"{self.spec.name}: TensorRT refit of {self.name} failed (missing weights: "
                                      f"{missing[:5]}); {rebuild}", param="loras")

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        *,
        profile: int,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Bind the caller's buffers to the profile's context and enqueue; returns before the GPU finishes."""
        if not self._memory_bound:
            raise RuntimeError(f"{self.spec.name}: call allocate() on the SharedDeviceMemory after loading the engines")
        context = self._contexts[profile]
        try:
            for name in self.spec.input_names:
                tensor = inputs[name]
                if not context.set_input_shape(name, tensor.shape):
                    raise InvalidRequestError(
                        f"{self.spec.name}.{name}: TensorRT refused shape {tuple(tensor.shape)} for profile {profile}"
                    )
                context.set_tensor_address(name, tensor.data_ptr())
            for name in self.spec.output_names:
                context.set_tensor_address(name, outputs[name].data_ptr())
        except KeyError as e:
            raise InvalidRequestError(f"{self.spec.name}: no buffer given for tensor {e.args[0]!r}") from None
        handle = (stream if stream is not None else torch.cuda.current_stream(self.device)).cuda_stream
        if not context.execute_async_v3(handle):
            raise RuntimeError(f"{self.spec.name}: TensorRT failed to enqueue profile {profile}; its error is logged "
                               f"above (logger {__name__})")

    def _bind_device_memory(self, address: int, size: int) -> None:
        for context in self._contexts:
            context.set_device_memory(address, size)
        self._memory_bound = True

    def _check_against_contract(self, engine: trt.ICudaEngine, rebuild: str) -> None:
        """The plan's tensors and profiles must be the contract's and the manifest's, or buffers would mismatch."""
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(names) - inputs
        if inputs != set(self.spec.input_names) or outputs != set(self.spec.output_names):
            raise ManifestError(
                f"{self.spec.name}: {self.name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, but the "
                f"contract says {self.spec.input_names} and {self.spec.output_names}; {rebuild}"
            )
        if engine.num_optimization_profiles != len(self.profiles):
            raise ManifestError(
                f"{self.spec.name}: {self.name} has {engine.num_optimization_profiles} optimization profile(s) but "
                f"the manifest lists {len(self.profiles)}; {rebuild}"
            )


def _require_tensorrt() -> None:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise BackendUnavailableError(f"these engines need TensorRT, which cannot be imported ({e}); {INSTALL_HINT}") from e
    if not hasattr(trt, "Runtime"):  # tensorrt-stubs alone imports as an empty namespace package
        raise BackendUnavailableError(f"'tensorrt' holds only type stubs, not the TensorRT library; {INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("these engines need a CUDA GPU and none is visible (torch.cuda.is_available() "
                                      "is False); load an onnxruntime or torch engine directory instead")


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise ManifestError(f"TensorRT tensor dtype {dtype} has no torch equivalent here")
    return table[dtype]


