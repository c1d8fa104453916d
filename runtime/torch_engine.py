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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.engine_dir.torch_program import load_program
from sdxl_trt.errors import InvalidRequestError

from .engine import Shape, check_input_shapes


class TorchEngine:
    """One component saved with ``torch.export``, optionally compiled with Inductor."""

    backend = "torch"
    graph_safe = True  # runs on the caller's stream

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
        self.profiles: Sequence[Any] = list(profiles)
        self.device = device
        self.input_dtypes = dict(input_dtypes)
        self.output_dtypes = dict(output_dtypes)
        self.compiled = compiled
        self._module = module
        self._weights: dict[str, torch.Tensor] = {}
        self._before_weights_change: Callable[[], None] = lambda: None
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
        """Load a ``.pt2`` engine onto ``device`` (see :func:`~sdxl_trt.engine_dir.torch_program.load_program`)."""
        device = torch.device(device)
        program = load_program(path, spec, device=device, compile=compile, cache_artifacts=cache_artifacts)
        engine = cls(program.module, spec, profiles, device=device, input_dtypes=program.input_dtypes,
                     output_dtypes=program.output_dtypes, compiled=program.compiled)
        engine._weights = program.weights
        engine._before_weights_change = program.before_weights_change
        return engine

    def weights(self) -> dict[str, torch.Tensor]:
        """The program's parameters and buffers by name (the weight map's ``torch`` names)."""
        return dict(self._weights)

    def set_weights(self, values: Mapping[str, torch.Tensor]) -> None:
        """Overwrite weights in place: same addresses, so CUDA graphs and compiled code stay valid (Inductor
        compiles without weight freezing, reading parameters at run time)."""
        self._before_weights_change()
        with torch.no_grad():
            for name, value in values.items():
                self._weights[name].copy_(value)

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

