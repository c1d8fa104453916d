"""CUDA-graph semantics on CPU tensors, so that the captured-step path runs where there is no GPU (tests, CI).

A CUDA graph records kernels once and replays them: tensors are bound by address, every host-side value
(a Python int, a shape, a scalar argument) is frozen as it was at capture, and work that is no kernel on the
capturing stream (ONNX Runtime on its own stream, numpy, Python arithmetic, a host counter) is simply not
in the graph. :class:`EmulatedGraph` gives CPU tensors the same semantics, with the interface the runtime
uses from ``torch.cuda.CUDAGraph`` (:func:`graph` is the capture context, like ``torch.cuda.graph``):

* Capture runs the work eagerly under a ``TorchDispatchMode`` that records every aten call: tensor
  arguments bound by identity, everything else frozen.
* ``replay()`` re-runs the recorded calls in order. An in-place or ``out=`` call writes its bound tensors
  again; an out-of-place call's new result is copied into the tensor the capture produced, so later calls
  that hold that tensor read the new values, as kernels read fixed addresses. A view is not re-run: it is
  a view of its base, which the replay updates. An allocation (``empty``) allocates nothing.

Refused at capture, as a CUDA capture refuses or gets wrong (:class:`GraphCaptureError`, naming the
operator and the first frame of the project's code that issued it):

* a host synchronisation: ``.item()``, ``float()``/``bool()`` of a tensor, ``.tolist()``, ``.numpy()``,
  ``.cpu()``, and every operator whose output shape depends on the data (``nonzero``, ``masked_select``,
  ``unique``, boolean indexing, ...);
* a random draw from a generator the graph does not own (``register_generator_state``): the default
  generator or a foreign one. An owned generator draws anew at each replay, advancing;
* an escaping allocation: a tensor whose memory the capture allocated and that is still alive once the
  captured work has returned (stored on an object, returned, cached). On a GPU it lives in the graph's
  pool and every replay (of this graph or, through the shared pool, another) overwrites it: the captured
  work must leave its results in tensors that existed before the capture (the arena);
* an operator that changes a tensor's shape or strides in place (``resize_``, ``squeeze_``, ``set_``):
  kernels see no host metadata, so a replay could not repeat it.

Not emulated: streams, memory pools (no bytes are reported), timing, device kernels' own numerics.
A replay costs more than the eager work (one copy per out-of-place operator): for tests, never for users.
"""

from __future__ import annotations

import gc
import itertools
import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

aten = torch.ops.aten


class GraphCaptureError(RuntimeError):
    """Work that a CUDA graph cannot capture (or would replay wrongly) met during an emulated capture."""


_HOST_SYNC = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal}
"""Operators that return a host value read from the data (``.item()``, ``bool(t)``, ``torch.equal``)."""

_DATA_DEPENDENT_SHAPE = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                         aten.argwhere, aten.bincount}
"""Their output shape depends on the data (the tags say so for the functional overloads, not the ``out=`` ones)."""

_ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                aten.empty_permuted}
"""Uninitialised allocations: no kernel in a graph, so nothing to replay."""

_METADATA_MUTATIONS = {aten.resize_, aten.resize_as_, aten.set_}

_HOST_READS = {torch.Tensor.tolist: ".tolist()", torch.Tensor.numpy: ".numpy()", torch.Tensor.cpu: ".cpu()",
               torch.Tensor.__array__: "numpy.asarray()"}
"""Tensor methods that read the data on the host without an aten operator on the CPU (a device-to-host copy
on a GPU, which a capture refuses)."""

_OWN_FILES = (str(Path(__file__)), str(Path(torch.__file__).parent))
_PROJECT = "sdxl_trt"


def issuing_frame() -> str:
    """``path:line in function`` of the innermost frame of the project's code (modules ``sdxl_trt.*``, this one
    excluded) on the stack; else the innermost frame outside torch and this module."""
    frame = sys._getframe(1)
    fallback = None
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        filename = frame.f_code.co_filename
        if name.startswith(_PROJECT + ".") and name != __name__:
            return _where(frame)
        if fallback is None and not filename.startswith(_OWN_FILES) and "<" not in filename:
            fallback = frame
        frame = frame.f_back  # type: ignore[assignment]
    return _where(fallback) if fallback is not None else "an unknown frame"


def _where(frame: Any) -> str:
    path = Path(frame.f_code.co_filename)
    parts = path.parts
    # Project files read as the repository has them (runtime/denoise.py), others by their name.
    for anchor in ("runtime", "engine", "export", "serve", "sdxl_trt", "tests"):
        if anchor in parts:
            path = Path(*parts[len(parts) - parts[::-1].index(anchor) - 1:])
            break
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


_POOLS = itertools.count(1)


def graph_pool_handle() -> tuple[str, int]:
    """A token naming a memory pool, as ``torch.cuda.graph_pool_handle`` returns (emulated graphs hold their
    own memory; the token only lets the pool rule be checked)."""
    return ("emulated-pool", next(_POOLS))


@dataclass
class _Created:
    """A tensor whose memory the capture allocated: held by its storage (so that a tensor still alive after the
    capture can be told from one the capture merely recorded) and rebuilt when the capture ends."""

    storage: torch.UntypedStorage
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    ref: weakref.ref
    op: str
    frame: str

    def rebuild(self) -> torch.Tensor:
        t = torch.empty((0,), dtype=self.dtype, device=self.storage.device)
        return t.set_(self.storage, self.offset, self.size, self.stride)


class _Slot:
    """A tensor argument or result of a recorded call, by its index in the graph's table of tensors."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


@dataclass
class _Call:
    func: Any  # an OpOverload
    spec: Any  # the pytree spec of (args, kwargs)
    leaves: list[Any]  # frozen values and _Slots
    outputs: list[int | None]  # per flattened result: the slot to copy a replay's result into, or None


class EmulatedGraph:
    """The part of ``torch.cuda.CUDAGraph`` the runtime uses, for CPU tensors (see the module doc)."""

    def __init__(self) -> None:
        self._program: list[tuple[Any, tuple, dict, list[torch.Tensor | None]]] = []
        self._recorder: _Recorder | None = None
        self._generators: list[torch.Generator] = []
        self._pool: Any = None
        self.captured = False
        self.calls_recorded = 0

    def register_generator_state(self, generator: torch.Generator) -> None:
        """Let captured work draw from ``generator``: each replay draws anew from it, advancing it."""
        self._generators.append(generator)

    def capture_begin(self, pool: Any = None) -> None:
        if _Recorder.active is not None:
            raise GraphCaptureError("a capture is already under way: captures cannot nest (one at a time, as on CUDA)")
        if self.captured:
            raise GraphCaptureError("this graph was captured already; make a new EmulatedGraph")
        self._pool = pool if pool is not None else graph_pool_handle()
        self._recorder = _Recorder(self._generators)
        self._recorder.start()

    def capture_end(self) -> None:
        recorder = self._recorder
        assert recorder is not None, "capture_end without capture_begin"
        self._recorder = None
        recorder.stop()
        self._program = recorder.finish()
        self.calls_recorded = len(self._program)
        self.captured = True

    def _abort(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None

    def pool(self) -> Any:
        return self._pool

    def replay(self) -> None:
        """Re-run the recorded operators in order, writing each result where the capture left it."""
        if not self.captured:
            raise GraphCaptureError("replay() before the capture ended")
        with torch.inference_mode():
            for func, args, kwargs, targets in self._program:
                result = func(*args, **kwargs)
                if targets:
                    flat = (result,) if isinstance(result, torch.Tensor) else tree_flatten(result)[0]
                    for target, value in zip(targets, flat, strict=True):
                        if target is not None:
                            target.copy_(value)

    def reset(self) -> None:
        self._program = []
        self.captured = False


@contextmanager
def graph(cuda_graph: EmulatedGraph, pool: Any = None, stream: Any = None) -> Iterator[None]:
    """Capture the block's work into ``cuda_graph``, as ``torch.cuda.graph`` (``stream`` is accepted and
    ignored: there are no streams on the CPU)."""
    cuda_graph.capture_begin(pool=pool)
    try:
        yield
    except BaseException:
        cuda_graph._abort()
        raise
    cuda_graph.capture_end()


class _Recorder(TorchDispatchMode):
    """Records aten calls for one capture; refuses what a capture cannot hold."""

    active: _Recorder | None = None

    def __init__(self, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.generators = generators
        self.calls: list[_Call] = []
        self.slots: list[torch.Tensor | _Created] = []  # external tensors (held) or memory the capture allocated
        self._slot_of: dict[int, tuple[int, weakref.ref | None]] = {}
        self._created_storages: dict[int, torch.UntypedStorage] = {}
        self._host_reads = _HostReads()

    def start(self) -> None:
        _Recorder.active = self
        self._host_reads.__enter__()
        self.__enter__()

    def stop(self) -> None:
        if _Recorder.active is self:
            _Recorder.active = None
            self.__exit__(None, None, None)
            self._host_reads.__exit__(None, None, None)

    # ------------------------------------------------------------------ recording
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self._refuse(func, args, kwargs)
        result = func(*args, **kwargs)
        if func.overloadpacket in _ALLOCATIONS:
            self._note_outputs(func, result, inputs=())
            return result
        leaves, spec = tree_flatten((args, kwargs))
        inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        flat_out = tree_flatten(result)[0]
        input_storages = {_storage_key(t) for t in inputs}
        aliased = [isinstance(o, torch.Tensor) and _storage_key(o) in input_storages for o in flat_out]
        out_tensors = [o for o in flat_out if isinstance(o, torch.Tensor)]
        if out_tensors and all(a for a, o in zip(aliased, flat_out, strict=True) if isinstance(o, torch.Tensor)) \
                and not writes:
            self._note_outputs(func, result, inputs=inputs)  # a view: it follows its base, nothing to re-run
            return result
        frozen = [_Slot(self._slot(x)) if isinstance(x, torch.Tensor) else x for x in leaves]
        self._note_outputs(func, result, inputs=inputs)
        outputs = [None if (not isinstance(o, torch.Tensor) or a) else self._slot(o)
                   for o, a in zip(flat_out, aliased, strict=True)]
        self.calls.append(_Call(func, spec, frozen, outputs))
        return result

    def _refuse(self, func: Any, args: tuple, kwargs: dict) -> None:
        packet = func.overloadpacket
        tags = set(func.tags)
        reason = None
        if packet in _HOST_SYNC or torch.Tag.data_dependent_output in tags:
            reason = "reads a tensor's value on the host (a device synchronisation)"
        elif packet is aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in _flat(args[1:])):
            reason = "indexes with a boolean mask: the output's shape depends on the data"
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
                and kwargs.get("output_size") is None:
            reason = "repeats by a tensor without output_size: the output's shape depends on the data"
        elif packet in _DATA_DEPENDENT_SHAPE or (torch.Tag.dynamic_output_shape in tags and packet is not aten.index
                                                 and packet is not aten.repeat_interleave):
            reason = "has an output shape that depends on the data (a device synchronisation)"
        elif packet in _METADATA_MUTATIONS or torch.Tag.inplace_view in tags:
            reason = "changes a tensor's shape or strides in place, which a replay cannot repeat"
        elif torch.Tag.nondeterministic_seeded in tags and _draws(func, args, kwargs):
            gens = [x for x in _flat((args, kwargs)) if isinstance(x, torch.Generator)]
            if not gens:
                reason = ("draws random numbers from the default generator, which the graph does not own "
                          "(pass a generator registered with register_generator_state, or draw before the loop)")
            elif not all(g._cdata in {own._cdata for own in self.generators} for g in gens):  # wrappers are remade
                reason = "draws random numbers from a generator the graph does not own (register_generator_state)"
        if reason is not None:
            raise GraphCaptureError(f"{func} {reason}; issued at {issuing_frame()}")

    def _slot(self, t: torch.Tensor) -> int:
        """The slot of a tensor argument: known by identity, else an external tensor, bound as it is."""
        known = self._slot_of.get(id(t))
        if known is not None:
            index, ref = known
            if ref is None or ref() is t:
                return index
        index = len(self.slots)
        if _storage_key(t) in self._created_storages:  # memory the capture allocated, met through a new object
            self._add_created(t, "an operator", issuing_frame())
        else:
            self.slots.append(t)
            self._slot_of[id(t)] = (index, None)
        return index

    def _add_created(self, t: torch.Tensor, op: str, frame: str) -> None:
        storage = self._created_storages.setdefault(_storage_key(t), t.untyped_storage())
        created = _Created(storage, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), weakref.ref(t),
                           op, frame)
        self._slot_of[id(t)] = (len(self.slots), created.ref)
        self.slots.append(created)

    def _note_outputs(self, func: Any, result: Any, *, inputs: list[torch.Tensor] | tuple) -> None:
        """Give each tensor result a slot: memory the capture allocated (held by storage, watched by weak
        reference), or a view of an external tensor (held)."""
        for out in tree_flatten(result)[0]:
            if not isinstance(out, torch.Tensor):
                continue
            known = self._slot_of.get(id(out))
            if known is not None and (known[1] is None or known[1]() is out):
                continue  # an in-place result: the tensor it wrote
            key = _storage_key(out)
            if key in self._created_storages or not any(_storage_key(t) == key for t in inputs):
                self._add_created(out, str(func), issuing_frame())
            else:
                self._slot_of[id(out)] = (len(self.slots), None)
                self.slots.append(out)  # a view of a tensor that existed before the capture

    # ------------------------------------------------------------------ the end of a capture
    def finish(self) -> list[tuple[Any, tuple, dict, list[torch.Tensor | None]]]:
        """Check that nothing the capture allocated escaped, then bind every call to its tensors for replay."""
        escaped = self._escaped()
        if escaped:
            gc.collect()  # a reference cycle is no escape
            escaped = self._escaped()
        if escaped:
            shown = "; ".join(f"{tuple(c.size)} {c.dtype} made by {c.op} at {c.frame}" for c in escaped[:3])
            more = f" (and {len(escaped) - 3} more)" if len(escaped) > 3 else ""
            raise GraphCaptureError(
                f"{len(escaped)} tensor(s) allocated during the capture are still alive after it: {shown}{more}. "
                "A graph's replays overwrite the memory they live in; write results into tensors that existed "
                "before the capture (copy_ into an arena view) instead of keeping new ones")
        with torch.inference_mode():
            tensors = [s.rebuild() if isinstance(s, _Created) else s for s in self.slots]
        program = []
        for call in self.calls:
            args, kwargs = tree_unflatten([tensors[x.index] if isinstance(x, _Slot) else x for x in call.leaves],
                                          call.spec)
            targets = [None if k is None else tensors[k] for k in call.outputs]
            program.append((call.func, tuple(args), dict(kwargs), targets if any(t is not None for t in targets)
                            else []))
        return program

    def _escaped(self) -> list[_Created]:
        return [s for s in self.slots if isinstance(s, _Created) and s.ref() is not None]


class _HostReads(TorchFunctionMode):
    """Refuses the tensor methods that read data on the host without an aten operator (see ``_HOST_READS``)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        what = _HOST_READS.get(func)
        if what is not None:
            raise GraphCaptureError(f"{what} reads a tensor on the host (a device-to-host copy and synchronisation) "
                                    f"during a capture; issued at {issuing_frame()}")
        return func(*args, **(kwargs or {}))


def _draws(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a seeded operator draws in this call: attention and dropout draw only with dropout on."""
    for k, a in enumerate(func._schema.arguments):
        if a.name in ("dropout_p", "train"):
            value = args[k] if k < len(args) else kwargs.get(a.name, a.default_value)
            return bool(value)
    return True


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _flat(x: Any) -> list[Any]:
    return tree_flatten(x)[0]
