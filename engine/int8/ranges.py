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

FP8 attention (``--fp8-attention``) also quantizes the attention's two activation MatMuls, whose inputs are no
module's forward input: the exporter decomposes ``scaled_dot_product_attention`` into (Q * sqrt(s)) @ (K^T *
sqrt(s)), softmax, @ V (s = 1/sqrt(head_dim)). :func:`attention_plan` maps each attention module to those four
ONNX tensors, and while calibrating, ``F.scaled_dot_product_attention`` is wrapped so that, inside a hooked
attention module at a picked call, it folds max|Q|*sqrt(s), max|K|*sqrt(s), max|V| and the softmax's max into the
same running scalars (the softmax row by row in chunks of at most 2^22 scores (16 MiB in fp32), so memory stays one step's).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx

from sdxl_trt.errors import BuildError

from .calibration import Sampling, run_calibration_prompts
from .qdq import attention_matmuls

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


ATTENTION_TENSORS = ("q", "k", "p", "v")
"""The attention MatMuls' inputs: ``qk`` reads (q, k), ``pv`` reads (p, v); p is the softmax output."""
_SCORES_PER_CHUNK = 1 << 22


def attention_plan(graph: onnx.ModelProto, root: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Attention module path (in ``root``) -> its MatMul inputs' ONNX tensor names by :data:`ATTENTION_TENSORS`.
    Raises naming the node when its module is missing or is not an attention (no ``to_q``)."""
    plan: dict[str, dict[str, str]] = {}
    roles = attention_matmuls(graph)
    for node in graph.graph.node:
        role = roles.get(node.name)
        if role is None:
            continue
        path = module_path(node.name)
        try:
            module = root.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "to_q"):
            raise BuildError(f"attention MatMul {node.name!r} maps to {path!r}, which is not an attention module of "
                             "the loaded UNet: is the ONNX file from another model? Re-export it")
        names = ("q", "k") if role == "qk" else ("p", "v")
        plan.setdefault(path, {}).update(dict(zip(names, node.input, strict=True)))
    incomplete = {p: sorted(t) for p, t in plan.items() if set(t) != set(ATTENTION_TENSORS)}
    if incomplete:
        raise BuildError(f"attentions without both Q.K^T and softmax.V MatMuls: {list(incomplete)[:3]}; re-export")
    return plan


class AmaxObserver:
    """Running ``max(|x|)`` per ONNX tensor, fed by forward pre-hooks on the modules of an :func:`observation_plan`.

    The hooks act only while :attr:`active` is set (the picked UNet calls). Each keeps a 0-d float32 tensor on the
    module's device and folds every call in with ``torch.maximum``: no host copy, no sync, O(1) memory."""

    def __init__(self, root: torch.nn.Module, plan: Mapping[str, Sequence[str]],
                 attention: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.active = False
        attention = attention or {}
        tensors = [*plan, *(t for names in attention.values() for t in names.values())]
        self._amax: dict[str, torch.Tensor | None] = {t: None for t in tensors}
        self._calls: dict[str, int] = dict.fromkeys(tensors, 0)
        self._handles: list[Any] = []
        self._attention = attention
        self._in_attention: str | None = None
        for tensor, paths in plan.items():
            for path in paths:
                hook = self._hook(tensor)
                self._handles.append(root.get_submodule(path).register_forward_pre_hook(hook))
        for path in attention:
            module = root.get_submodule(path)
            self._handles.append(module.register_forward_pre_hook(self._enter(path)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _fold(self, tensor: str, a: torch.Tensor) -> None:
        import torch

        prev = self._amax[tensor]
        self._amax[tensor] = a if prev is None else torch.maximum(prev, a)
        self._calls[tensor] += 1

    def _enter(self, path: str) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
            self._in_attention = path

        return hook

    def _leave(self, _module: torch.nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
        self._in_attention = None

    @contextlib.contextmanager
    def observing_attention(self) -> Iterator[None]:
        """``F.scaled_dot_product_attention`` wrapped (diffusers' attention processors look it up per call) to fold
        the attention MatMuls' input ranges of the hooked attention it runs in; a no-op without attention plan."""
        if not self._attention:
            yield
            return
        from torch.nn import functional

        original = functional.scaled_dot_product_attention

        def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.active and self._in_attention is not None:
                self._observe_attention(self._attention[self._in_attention], query, key, value, attn_mask,
                                        kwargs.get("scale"))
            return original(query, key, value, attn_mask, *args, **kwargs)

        functional.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
        try:
            yield
        finally:
            functional.scaled_dot_product_attention = original

    def _observe_attention(self, names: Mapping[str, str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, scale: float | None) -> None:
        """The exported graph's tensors: Q and K each times sqrt(s), V, and softmax(Q K^T s + mask)."""
        import torch

        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        with torch.no_grad():
            self._fold(names["q"], q.detach().abs().amax().float() * math.sqrt(s))
            self._fold(names["k"], k.detach().abs().amax().float() * math.sqrt(s))
            self._fold(names["v"], v.detach().abs().amax().float())
            rows = q.shape[-2]
            chunk = max(1, _SCORES_PER_CHUNK // max(1, q[..., :1, :1].numel() * k.shape[-2]))
            p_max: torch.Tensor | None = None
            for i in range(0, rows, chunk):
                scores = (q[..., i:i + chunk, :].float() * s) @ k.float().transpose(-1, -2)
                if mask is not None:
                    m = mask[..., i:i + chunk, :] if mask.shape[-2] == rows else mask
                    scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
                top = torch.softmax(scores, dim=-1).amax()
                p_max = top if p_max is None else torch.maximum(p_max, top)
            assert p_max is not None
            self._fold(names["p"], p_max)

    def _hook(self, tensor: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active:
                return
            self._fold(tensor, args[0].detach().abs().amax().float())

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
    attention: bool = False,
) -> tuple[dict[str, float], int]:
    """Max-abs ranges of the activations feeding ``nodes`` (of ``graph``), measured at the same picked UNet calls
    :func:`.calibration.collect_calibration_inputs` would record. ``attention``: also the inputs of every
    attention's two MatMuls (:func:`attention_plan`). Returns (ranges by tensor name, samples)."""
    plan = observation_plan(graph, nodes, model.unet)
    attn = attention_plan(graph, model.unet) if attention else {}
    observer = AmaxObserver(model.unet, plan, attn)
    log.info("calibration: observing %d activations through %d module hooks%s", len(plan),
             sum(len(p) for p in plan.values()), f" and {len(attn)} attentions' MatMul inputs" if attn else "")

    def on_call(picked: bool, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
        observer.active = picked

    try:
        sampling = Sampling(steps, width, height, max_samples, guidance_scale, seed)
        with observer.observing_attention():
            samples = run_calibration_prompts(model, prompts, on_call, sampling, what="calibration",
                                              embeddings=embeddings)
    finally:
        observer.remove()
    return observer.ranges(), samples
