"""Record where each LoRA-able PyTorch weight lives in the exported engines (the format: ``sdxl_trt.lora.weight_map``).

ONNX: torch.onnx renames weights (``onnx::MatMul_5438``) and stores Linear weights transposed for MatMul
(``[in, out]``) but as they are for Gemm and Conv. So the map is found by content, not by names: every
initializer is hashed as stored, every PyTorch weight as it is and transposed, and equal bytes (and shape
and dtype) locate it. An initializer holding two weights (the exporter deduplicates equal tensors) or a
weight found nowhere is either unused (no output depends on it, checked with autograd: the exporter pruned
it, as it prunes text_encoder's last layer) or folded into another constant; both are recorded with
``onnx: null``, the first as ``unused``, so a runtime refuses LoRAs only where they would be lost.

torch: the ``torch.export`` program of a wrapper keeps the wrapper's parameter names
(``unet.down_blocks...``), found here by object identity.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sdxl_trt.lora import LORA_COMPONENTS, lora_weight_shapes
from sdxl_trt.lora.weight_map import ComponentWeights, WeightLocation

from .loading import LoadedModel

log = logging.getLogger(__name__)


def lora_modules(model: LoadedModel) -> dict[str, torch.nn.Module]:
    """The PyTorch modules a LoRA can change, under the engine component names."""
    assert model.text_encoder is not None
    return {"unet": model.unet, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}


def torch_weight_map(component_module: torch.nn.Module, wrapper: torch.nn.Module) -> ComponentWeights:
    """Each LoRA-able weight's parameter name in the wrapper (= in its ``torch.export`` program)."""
    in_wrapper = {id(p): n for n, p in wrapper.named_parameters(remove_duplicate=False)}
    params = dict(component_module.named_parameters())
    shapes = lora_weight_shapes({"c": component_module})["c"]
    return ComponentWeights(weights={
        name: WeightLocation(shape=shape, torch=in_wrapper[id(params[name])]) for name, shape in shapes.items()})


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def unused_parameters(wrapper: torch.nn.Module, inputs: Sequence[torch.Tensor], params: Mapping[str, torch.nn.Parameter],
                      ) -> set[str]:
    """Which of ``params`` no output of ``wrapper`` depends on (autograd reaches none of them)."""
    names = list(params)
    old = [params[n].requires_grad for n in names]
    try:
        for n in names:
            params[n].requires_grad_(True)
        with torch.enable_grad():
            out = wrapper(*inputs)
            outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            total = sum(o.float().sum() for o in outs)
            if not isinstance(total, torch.Tensor) or not total.requires_grad:  # none of them is reached
                return set(names)
            grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    finally:
        for n, r in zip(names, old, strict=True):
            params[n].requires_grad_(r)
    return {n for n, g in zip(names, grads, strict=True) if g is None}


def onnx_weight_map(component_module: torch.nn.Module, wrapper: torch.nn.Module, onnx_path: Path,
                    *, onnx_sha256: str, sample: Sequence[torch.Tensor] = ()) -> ComponentWeights:
    """:func:`torch_weight_map` plus each weight's ONNX initializer in ``onnx_path``, found by content. The
    module must hold the weights exactly as exported (same dtype)."""
    import onnx
    from onnx import helper, numpy_helper

    cw = torch_weight_map(component_module, wrapper)
    cw.onnx_sha256 = onnx_sha256
    graph = onnx.load(str(onnx_path), load_external_data=True).graph
    by_content: dict[tuple[str, tuple[int, ...], str], list[str]] = defaultdict(list)
    for init in graph.initializer:
        if len(init.dims) not in (2, 4):
            continue
        arr = numpy_helper.to_array(init)
        by_content[(arr.dtype.str, arr.shape, _digest(arr))].append(init.name)
    params = dict(component_module.named_parameters())
    claimed: dict[str, list[str]] = defaultdict(list)
    found: dict[str, tuple[str, bool]] = {}
    dtypes = {init.name: str(helper.tensor_dtype_to_np_dtype(init.data_type)) for init in graph.initializer}
    for name, loc in cw.weights.items():
        w = params[name].detach().cpu().numpy()
        layouts = [(w, False), (w.T, True)] if w.ndim == 2 else [(w, False)]
        for arr, transposed in layouts:
            names = by_content.get((arr.dtype.str, arr.shape, _digest(arr)), [])
            if names:
                pick = loc.torch if loc.torch in names else sorted(names)[0]
                found[name] = (pick, transposed)
                claimed[pick].append(name)
                break
    shared = {n for names in claimed.values() if len(names) > 1 for n in names}
    for name, (init_name, transposed) in found.items():
        if name not in shared:
            loc = cw.weights[name]
            cw.weights[name] = WeightLocation(shape=loc.shape, torch=loc.torch, onnx=init_name, onnx_transposed=transposed,
                                              onnx_dtype=dtypes[init_name])
    not_found = [n for n in cw.weights if n not in found]
    if not_found and sample:
        for name in unused_parameters(wrapper, sample, {n: params[n] for n in not_found}):
            loc = cw.weights[name]
            cw.weights[name] = WeightLocation(shape=loc.shape, torch=loc.torch, unused=True)
    missing = cw.unmapped_onnx()
    if missing:
        log.warning("%s: %d of %d LoRA-able weights have no initializer of their own (%s%s); runtime LoRAs "
                    "touching them will be refused for ONNX-based engines", onnx_path.name, len(missing),
                    len(cw.weights), ", ".join(missing[:3]), " ..." if len(missing) > 3 else "")
    return cw


def component_weight_maps(model: LoadedModel, wrappers: Mapping[str, torch.nn.Module]) -> dict[str, ComponentWeights]:
    """torch names only, for every LoRA component (the torch backend: no ONNX)."""
    mods = lora_modules(model)
    return {c: torch_weight_map(mods[c], wrappers[c]) for c in LORA_COMPONENTS if c in wrappers}
