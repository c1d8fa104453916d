"""INT8 activation ranges measured in PyTorch while the calibration prompts are denoised: bounded memory.

Each quantized ONNX node (a Conv or a MatMul/Gemm with a constant weight) was traced from one PyTorch module,
and the TorchScript exporter names the node after that module's path (``/unet/down_blocks.1/attentions.0/
proj_in/MatMul`` comes from ``unet.down_blocks.1.attentions.0.proj_in``). So the range of the activation a node
quantizes is the range of its module's forward input. :func:`observation_plan` maps every activation tensor
that feeds a quantized node to the modules that read it, and :func:`collect_activation_ranges` puts a forward
pre-hook on each: at the picked UNet calls it folds ``max(|x|)`` into one running scalar per tensor, on the
model's device, without a host sync. Nothing is kept per sample, so memory is the model plus one step's
activations whatever the number of samples (ONNX Runtime's calibrator, :mod:`.ort`, holds a whole forward
pass's augmented outputs on the host instead).

The statistic is the symmetric max-abs range, what ``minmax`` calibration computes (ONNX Runtime's MinMax with
``CalibTensorRangeSymmetric``): merged incrementally it is exact, and it is the recipe's measured default.
Histogram-based methods (percentile, entropy) remain on the ONNX Runtime path.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx

from sdxl_trt.errors import BuildError

from .calibration import Sampling, run_calibration_prompts

if TYPE_CHECKING:
    import torch

    from sdxl_trt.export.loading import LoadedModel

log = logging.getLogger(__name__)

EXPORT_SCOPE = "unet"
"""The attribute under which export's ``UNetWrapper`` holds the UNet: the first scope of every node name."""


def module_path(node_name: str, *, scope: str = EXPORT_SCOPE) -> str:
    """The PyTorch module path (``down_blocks.1.resnets.0.conv1``) of a node the exporter named after it
    (``/unet/down_blocks.1/resnets.0/conv1/Conv``): scopes joined with dots, without the wrapper and the op."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or parts[0] != scope:
        raise BuildError(
            f"ONNX node {node_name!r} is not named after a module under {scope!r} (expected "
            f"'/{scope}/<module path>/<Op>'); export the UNet with sdxl-trt's exporter, or calibrate with "
            "--calibration-backend onnxruntime, which needs no module names"
        )
    return ".".join(parts[1:-1])


def observation_plan(graph: onnx.ModelProto, nodes: Collection[str], root: torch.nn.Module) -> dict[str, list[str]]:
    """ONNX activation tensor -> paths (in ``root``, the UNet) of the modules whose forward input it is.

    ``nodes`` are the names of the nodes to quantize; their first input is the activation. Several nodes may read
    one tensor (Q, K and V read the same norm output): they share one range, as they share one Q/DQ pair. Raises
    naming the node when its module is missing or is not the Conv/Linear the node came from."""
    from torch import nn

    wanted = set(nodes)
    plan: dict[str, list[str]] = {}
    for n in graph.graph.node:
        if n.name not in wanted:
            continue
        path = module_path(n.name)
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise BuildError(
                f"ONNX node {n.name!r} names module {path!r}, which the loaded UNet does not have: is the ONNX file "
                "from another model? Re-export it, or calibrate with --calibration-backend onnxruntime"
            ) from None
        expected = nn.Conv2d if n.op_type == "Conv" else nn.Linear
        if not isinstance(module, expected):
            raise BuildError(
                f"ONNX node {n.name!r} ({n.op_type}) maps to {path!r}, a {type(module).__name__}, not a "
                f"{expected.__name__}: its input range cannot be read there; calibrate with --calibration-backend "
                "onnxruntime"
            )
        plan.setdefault(n.input[0], []).append(path)
        wanted.discard(n.name)
    if wanted:
        raise BuildError(f"{len(wanted)} nodes to quantize are not in the graph, e.g. {sorted(wanted)[:3]}")
    return plan


class AmaxObserver:
    """Running ``max(|x|)`` per ONNX tensor, fed by forward pre-hooks on the modules of an :func:`observation_plan`.

    The hooks act only while :attr:`active` is set (the picked UNet calls). Each keeps a 0-d float32 tensor on the
    module's device and folds every call in with ``torch.maximum``: no host copy, no sync, O(1) memory."""

    def __init__(self, root: torch.nn.Module, plan: Mapping[str, Sequence[str]]) -> None:
        self.active = False
        self._amax: dict[str, torch.Tensor | None] = {t: None for t in plan}
        self._calls: dict[str, int] = dict.fromkeys(plan, 0)
        self._handles: list[Any] = []
        for tensor, paths in plan.items():
            for path in paths:
                hook = self._hook(tensor)
                self._handles.append(root.get_submodule(path).register_forward_pre_hook(hook))

    def _hook(self, tensor: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active:
                return
            import torch

            a = args[0].detach().abs().amax().float()
            prev = self._amax[tensor]
            self._amax[tensor] = a if prev is None else torch.maximum(prev, a)
            self._calls[tensor] += 1

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def ranges(self) -> dict[str, float]:
        """Max-abs per tensor on the host; raises naming the tensors no observed call reached."""
        missing = [t for t, v in self._amax.items() if v is None]
        if missing:
            raise BuildError(
                f"{len(missing)} activations were never seen during calibration, e.g. {missing[:3]}: their modules "
                "did not run at the picked UNet calls; calibrate with more steps or --calibration-backend onnxruntime"
            )
        return {t: float(v) for t, v in self._amax.items() if v is not None}


def collect_activation_ranges(
    model: LoadedModel,
    graph: onnx.ModelProto,
    nodes: Collection[str],
    prompts: Sequence[str],
    *,
    steps: int,
    width: int,
    height: int,
    max_samples: int,
    guidance_scale: float = 5.0,
    seed: int = 0,
    embeddings: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[dict[str, float], int]:
    """Max-abs ranges of the activations feeding ``nodes`` (of ``graph``), measured at the same picked UNet calls
    :func:`.calibration.collect_calibration_inputs` would record. Returns (ranges by tensor name, samples)."""
    plan = observation_plan(graph, nodes, model.unet)
    observer = AmaxObserver(model.unet, plan)
    log.info("calibration: observing %d activations through %d module hooks", len(plan),
             sum(len(p) for p in plan.values()))

    def on_call(picked: bool, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
        observer.active = picked

    try:
        sampling = Sampling(steps, width, height, max_samples, guidance_scale, seed)
        samples = run_calibration_prompts(model, prompts, on_call, sampling, what="calibration", embeddings=embeddings)
    finally:
        observer.remove()
    return observer.ranges(), samples
