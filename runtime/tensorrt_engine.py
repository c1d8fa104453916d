"""TensorRT implementation of the Engine protocol: one deserialized plan, one context per shape it runs.

What may happen where:

* Load (``TensorRTEngine.load``): deserialize, check the plan against the contract (tensor names, profile count,
  and every tensor's dtype against the buffer the arena gives it), create the first execution context of each
  optimization profile (user-managed device memory) and bind it to its profile, attach the contexts to a
  :class:`SharedDeviceMemory`. Allocation and synchronisation are allowed here.
* ``run`` (the hot path, also inside CUDA-graph capture): ``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3`` on the caller's stream. No synchronisation, no shape arithmetic; shapes were checked
  by ``infer_shapes``.

One context per (profile, input shapes), not per profile: every captured graph (images per batch, guidance
on/off, prompt chunks, buckets sharing a profile) is a distinct shape set, and a context holds the shapes and
the state TensorRT set up for them, so two graphs sharing a context would replay with the other's state. A
context is created the first time its shapes run (the eager warm-up before capture, never inside it); with
user-managed device memory it costs no scratch memory of its own, as every context shares the one block.

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
        expected_dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        """Check ``engine`` against the contract (and its tensors' dtypes against ``expected_dtypes``: the buffers
        the caller will bind), create one context per profile, attach to ``device_memory``."""
        self.spec = spec
        self.profiles = profiles
        self.device = torch.device(device)
        self.name = name or spec.name
        self._engine = engine
        self._keep_alive = keep_alive  # TensorRT needs its runtime and logger to outlive the engine
        self._check_against_contract(engine, rebuild)
        # The dtype of each bound tensor, as the plan has it (strongly typed: the ONNX's).
        self.tensor_dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in spec.input_names + spec.output_names}
        if expected_dtypes is not None:
            self._check_dtypes(expected_dtypes, rebuild)

        stream = torch.cuda.current_stream(self.device)
        self._contexts: dict[tuple[int, tuple[Shape, ...]], trt.IExecutionContext] = {}
        self._first: list[trt.IExecutionContext] = [self._new_context(i, stream.cuda_stream)
                                                    for i in range(engine.num_optimization_profiles)]
        stream.synchronize()  # load time: the profile switches are done before any run
        self.scratch_bytes = max([engine.device_memory_size_v2]
                                 + [engine.get_device_memory_size_for_profile_v2(i) for i in range(len(self._first))])
        self._memory: tuple[int, int] | None = None
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
        expected_dtypes: Mapping[str, torch.dtype] | None = None,
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
                     keep_alive=(runtime, logger), expected_dtypes=expected_dtypes)
        if own_memory:
            memory.allocate()
        log.info("%s: loaded %s (%d profile(s), %.1f MiB scratch)", spec.name, path, len(loaded._first),
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
            # A strongly typed plan stores each weight in its ONNX dtype (fp16 for an fp16 file): the refit array
            # must be that dtype (the weight map records it; TensorRT rejects another).
            want = np.dtype(trt.nptype(refitter.get_weights_prototype(name).dtype))
            if array.dtype != want:
                raise InvalidRequestError(f"{self.spec.name}: weight {name!r} of {self.name} is {want} in the plan, "
                                          f"but the refit array is {array.dtype}: the weight map belongs to another "
                                          f"export; {rebuild}", param="loras")
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
        if self._memory is None:
            raise RuntimeError(f"{self.spec.name}: call allocate() on the SharedDeviceMemory after loading the engines")
        handle = (stream if stream is not None else torch.cuda.current_stream(self.device)).cuda_stream
        context = self._context(profile, tuple(tuple(inputs[n].shape) for n in self.spec.input_names
                                                if n in inputs), handle)
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
        if not context.execute_async_v3(handle):
            raise RuntimeError(f"{self.spec.name}: TensorRT failed to enqueue profile {profile}; its error is logged "
                               f"above (logger {__name__})")

    @property
    def num_contexts(self) -> int:
        """Execution contexts made so far: one per profile at load, then one per further shape set run."""
        return len({id(c) for c in (*self._first, *self._contexts.values())})

    def _new_context(self, profile: int, stream: int) -> trt.IExecutionContext:
        import tensorrt as trt

        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise ManifestError(f"{self.spec.name}: TensorRT could not create an execution context for {self.name}")
        if not context.set_optimization_profile_async(profile, stream):
            raise ManifestError(f"{self.spec.name}: TensorRT could not select profile {profile} of {self.name}")
        return context

    def _context(self, profile: int, shapes: tuple[Shape, ...], stream: int) -> trt.IExecutionContext:
        """The context of ``profile`` at these input shapes: the profile's first context for the first shape set
        it runs, a new one (on the shared device block, profile selected on ``stream``) for each other."""
        key = (profile, shapes)
        context = self._contexts.get(key)
        if context is not None:
            return context
        if not any(k[0] == profile for k in self._contexts):
            context = self._first[profile]
        else:
            context = self._new_context(profile, stream)
            if self._memory is not None:
                context.set_device_memory(*self._memory)
            log.debug("%s: execution context %d (profile %d, shapes %s)", self.spec.name, self.num_contexts + 1,
                      profile, shapes)
        self._contexts[key] = context
        return context

    def _bind_device_memory(self, address: int, size: int) -> None:
        for context in {id(c): c for c in (*self._first, *self._contexts.values())}.values():
            context.set_device_memory(address, size)
        self._memory = (address, size)

    def _check_dtypes(self, expected: Mapping[str, torch.dtype], rebuild: str) -> None:
        """Each tensor's plan dtype must be its buffer's: a float32 tensor bound to a float16 buffer reads garbage
        and writes twice the buffer's bytes (an INT8 build's fp32 text encoders once got fp16 buffers)."""
        wrong = {n: (str(self.tensor_dtypes[n]), str(d)) for n, d in expected.items()
                 if n in self.tensor_dtypes and self.tensor_dtypes[n] != d}
        if wrong:
            detail = ", ".join(f"{n}: plan {p.removeprefix('torch.')}, buffer {b.removeprefix('torch.')}"
                               for n, (p, b) in wrong.items())
            raise ManifestError(f"{self.spec.name}: {self.name} has tensor dtypes that differ from the manifest's "
                                f"precision ({detail}): it was built from another ONNX than the manifest says; {rebuild}")

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


