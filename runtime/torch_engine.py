"""torch backend, run side: a ``torch.export`` program behind the :class:`~sdxl_trt.runtime.engine.Engine` protocol.

Rules of this module (it is on the denoising loop's hot path):

* It imports torch and the contracts only: never export/, diffusers or transformers. A saved program is
  an ATen graph plus weights, so a service that only runs engines needs none of them.
* ``infer_shapes`` validates; ``run`` only calls the module on the caller's stream and copies the results
  into the caller's buffers. No synchronisation, no host-device copies, no Python work proportional to the
  model. The module's intermediates come from torch's caching allocator (a torch graph has no
  user-visible workspace to bind), so after the first call of a shape nothing new is reserved.
* ``compile=True`` wraps the program in ``torch.compile`` with static shapes (``dynamic=False``): each
  (bucket, batch) shape compiles once on its first call. A dynamic compile of the full UNet did not finish
  in 9 minutes (SDXL_FACTS.md), a static one takes about 135-160 s on the H100, and 21 s when the build's
  portable cache (``cache_artifacts``) is loaded first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.errors import InvalidRequestError, ManifestError

from .engine import Shape, check_input_shapes

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256
"""Static shapes one compiled engine may hold (torch's default, 8, would silently fall back to eager after
8 (bucket, batch) shapes: 9 SDXL buckets times 4 batch sizes is 36)."""


class TorchEngine:
    """One component saved with ``torch.export``, optionally compiled with Inductor."""

    backend = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ComponentSpec,
        profiles: Sequence[Any],
        *,
        device: torch.device,
        input_dtypes: Mapping[str, torch.dtype],
        output_dtypes: Mapping[str, torch.dtype],
        compiled: bool,
    ) -> None:
        self.spec = spec
        self.profiles = list(profiles)
        self.device = device
        self.input_dtypes = dict(input_dtypes)
        self.output_dtypes = dict(output_dtypes)
        self.compiled = compiled
        self._module = module
        self._input_names = tuple(spec.input_names)
        self._output_names = tuple(spec.output_names)

    @classmethod
    def load(
        cls,
        path: str | Path,
        spec: ComponentSpec,
        profiles: Sequence[Any],
        *,
        device: str | torch.device,
        compile: bool = False,
        cache_artifacts: str | Path | None = None,
    ) -> TorchEngine:
        """Load a ``.pt2`` engine onto ``device``; with ``compile``, wrap it in ``torch.compile``.

        ``cache_artifacts`` (the build's ``*.inductor-cache.bin``) is loaded into torch's compile caches
        first, so the shapes compiled at build time are cache hits here. It only pays with ``compile``.
        """
        path = Path(path)
        device = torch.device(device)
        if not path.is_file():
            raise ManifestError(f"{spec.name}: torch engine {path} does not exist; rebuild with --backend torch")
        t0 = time.perf_counter()
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or foreign archive
            raise ManifestError(
                f"{spec.name}: {path} is not a loadable torch.export archive with torch {torch.__version__} "
                f"({type(e).__name__}: {e}); rebuild the engine with this torch"
            ) from e
        program = _on_device(program, device)
        input_dtypes, output_dtypes = _signature_dtypes(program, spec, path)
        module: torch.nn.Module = program.module()
        if compile:
            if cache_artifacts is not None:
                _load_cache_artifacts(Path(cache_artifacts), spec)
            _raise_recompile_limit(RECOMPILE_LIMIT)
            module = torch.compile(module, dynamic=False)
        elif cache_artifacts is not None:
            log.warning("%s: cache_artifacts %s ignored: compile=False", spec.name, cache_artifacts)
        log.info("loaded torch engine %s from %s in %.2f s (compile=%s)", spec.name, path,
                 time.perf_counter() - t0, compile)
        return cls(module, spec, profiles, device=device, input_dtypes=input_dtypes,
                   output_dtypes=output_dtypes, compiled=compile)

    def infer_shapes(self, input_shapes: Mapping[str, Shape], profile: int) -> dict[str, Shape]:
        """Output shapes for these input shapes; raises :class:`InvalidRequestError` outside the profile."""
        return check_input_shapes(self.spec, self.profiles, input_shapes, profile)

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        *,
        profile: int,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Enqueue the component on ``stream`` (CUDA) and copy its results into ``outputs``; no sync.

        Shapes are the caller's to check with :meth:`infer_shapes` first (as with TensorRT); ``profile``
        selects nothing here, since one torch program serves every profile.
        """
        try:
            args = [inputs[n] for n in self._input_names]
            outs = [outputs[n] for n in self._output_names]
        except KeyError as e:
            raise InvalidRequestError(
                f"{self.spec.name}: missing tensor {e.args[0]!r}; inputs are {list(self._input_names)}, "
                f"outputs {list(self._output_names)}"
            ) from None
        for name, x in zip(self._input_names, args, strict=True):
            if x.dtype != self.input_dtypes[name] or x.device.type != self.device.type:
                raise InvalidRequestError(
                    f"{self.spec.name}.{name}: got {x.dtype} on {x.device}, "
                    f"engine takes {self.input_dtypes[name]} on {self.device}"
                )
        use_stream = stream is not None and self.device.type == "cuda"
        with torch.cuda.stream(stream) if use_stream else contextlib.nullcontext(), torch.inference_mode():
            result = self._module(*args)
            results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            for name, out, r in zip(self._output_names, outs, results, strict=True):
                if out.shape != r.shape:
                    raise InvalidRequestError(
                        f"{self.spec.name}.{name}: output buffer is {tuple(out.shape)}, result is {tuple(r.shape)}; "
                        "size the buffer with infer_shapes"
                    )
                out.copy_(r)


def _on_device(program: torch.export.ExportedProgram, device: torch.device) -> torch.export.ExportedProgram:
    """Move a program built on another device (weights and device constants in the graph) to ``device``."""
    tensors = [*program.state_dict.values(), *(v for v in program.constants.values() if isinstance(v, torch.Tensor))]
    if not tensors or all(t.device == device or (t.device.type == device.type and device.index is None)
                          for t in tensors):
        return program
    from torch.export.passes import move_to_device_pass

    log.info("moving torch engine from %s to %s", tensors[0].device, device)
    return move_to_device_pass(program, device)


def _signature_dtypes(
    program: torch.export.ExportedProgram, spec: ComponentSpec, path: Path
) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """Check the program's user inputs and outputs against the contract; return their dtypes."""
    sig = program.graph_signature
    names = list(sig.user_inputs)
    if names != spec.input_names or len(sig.user_outputs) != len(spec.outputs):
        raise ManifestError(
            f"{spec.name}: {path} takes {names} and returns {len(sig.user_outputs)} tensors, but the contract "
            f"takes {spec.input_names} and returns {spec.output_names}; rebuild the engine"
        )
    nodes = {n.name: n for n in program.graph.nodes}
    input_dtypes = {name: nodes[name].meta["val"].dtype for name in names}
    output_node = next(n for n in reversed(program.graph.nodes) if n.op == "output")
    flat_outputs = output_node.args[0]
    user_outputs = flat_outputs[len(flat_outputs) - len(sig.user_outputs):]
    output_dtypes = {name: node.meta["val"].dtype for name, node in zip(spec.output_names, user_outputs, strict=True)}
    return input_dtypes, output_dtypes


def _load_cache_artifacts(path: Path, spec: ComponentSpec) -> None:
    if not path.is_file():
        raise ManifestError(f"{spec.name}: compile cache {path} does not exist; rebuild with compile shapes or omit it")
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    if info is None:
        log.warning("%s: %s holds no usable compile artifacts (another torch version?); compiling from scratch",
                    spec.name, path)
    else:
        log.info("%s: loaded compile cache %s (%s)", spec.name, path,
                 {kind: len(keys) for kind, keys in info.artifacts.items()})


def _raise_recompile_limit(limit: int) -> None:
    """Let one compiled module hold ``limit`` static shapes (only ever raises torch's process-wide limit)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * limit:
        cfg.accumulated_recompile_limit = 4 * limit
