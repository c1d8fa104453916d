"""Where Q/DQ goes in the SDXL UNet graph, and whether TensorRT will build it as intended.

The placement rules, independent of how ranges were measured: which weighted nodes (Conv, MatMul/Gemm with a
constant weight) are quantized and which stay high precision and why (:func:`plan_exclusions`), how to keep a
shared Q/DQ pair off the consumers meant to stay high precision (:func:`restrict_dq_to`), and the checks that the
result is TensorRT's explicit quantization (:func:`check_tensorrt_qdq`: symmetric INT8, per-channel weights on the
output-channel axis, float bias, DQ only in front of INT8 ops). Both writers (ONNX Runtime's calibrator path and
the range-based writer) use these, so both quantize the same layers.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Mapping

import numpy as np
import onnx

from sdxl_trt.errors import BuildError

log = logging.getLogger(__name__)

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
"""Weighted ops whose inputs get Q/DQ. TensorRT runs these as INT8 kernels; everything else stays high precision."""

EXCLUDED_NAME_PATTERNS: dict[str, str] = {
    "time_embedding": "timestep MLP: negligible compute, and every ResNet block's conditioning flows through it",
    "add_embedding": "pooled-text + micro-conditioning MLP: negligible compute, conditions the whole network",
    "time_emb_proj": "per-ResNet projection of the time embedding: a bias for a whole feature map, tiny compute",
    "conv_in": "first conv: reads the raw latent, whose range swings with the noise level across the schedule",
    "conv_out": "last conv: writes noise_pred itself, so its error reaches the sampler unattenuated",
    "conv_shortcut": "1x1 residual-path conv: carries the skip signal's full range; excluded in NVIDIA's SDXL recipe",
}
"""Node-name substrings (module paths in the exported graph) kept in high precision, with the reason.

These are the layers NVIDIA's SDXL INT8 recipe (TensorRT demo/Diffusion with ModelOpt) leaves unquantized:
they cost almost nothing and quantizing them costs the most accuracy."""


_ATTENTION_QKV = re.compile(r"(to_q|to_k|to_v)\b")
_FEED_FORWARD = re.compile(r"ff[./]net")


ATTENTION_ROLES = ("qk", "pv")
"""The attention's two activation-by-activation MatMuls, as the exporter decomposes ``scaled_dot_product_attention``:
``qk`` = (Q * sqrt(s)) @ (K^T * sqrt(s)), s = 1/sqrt(head_dim), and ``pv`` = softmax(qk) @ V."""


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/MatMul/Gemm nodes whose second input (the weight) is a constant initializer."""
    inits = initializer_names(model)
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and n.input[1] in inits]


def attention_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """The attention MatMuls (both inputs activations) by node name -> role, ``qk`` or ``pv`` (:data:`ATTENTION_ROLES`).

    Found structurally, not by name: a MatMul with no constant input whose output reaches a Softmax is ``qk``; one
    whose first input comes from a Softmax is ``pv`` (through Casts and Q/DQ either way: the fp16 file keeps the
    softmax in fp32, and a quantized file has a Q/DQ pair between the softmax and ``pv``). Each attention gives one of each; a MatMul of two activations that is neither is not listed."""
    inits = initializer_names(model) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    passthrough = ("Cast", "QuantizeLinear", "DequantizeLinear")

    def through_casts_up(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type in passthrough:
            node = producer.get(node.input[0])
        return node

    def reaches_softmax(name: str) -> bool:
        for c in consumers.get(name, []):
            if c.op_type == "Softmax" or (c.op_type in passthrough and reaches_softmax(c.output[0])):
                return True
        return False

    out: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or any(i in inits for i in n.input):
            continue
        first = through_casts_up(n.input[0])
        if first is not None and first.op_type == "Softmax":
            out[n.name] = "pv"
        elif reaches_softmax(n.output[0]):
            out[n.name] = "qk"
    return out


def plan_exclusions(
    model: onnx.ModelProto,
    *,
    quant_level: float = 3.0,
    patterns: Mapping[str, str] = EXCLUDED_NAME_PATTERNS,
) -> dict[str, str]:
    """Weighted nodes that stay high precision, with the reason; every other weighted node is quantized.

    ``quant_level`` follows NVIDIA's SDXL recipe: 3 quantizes every Conv and Linear; 2.5 keeps the attention output
    and projection-in/out linears high precision (only Q/K/V and feed-forward linears INT8); 2 quantizes only the
    feed-forward linears of the transformer blocks. Convolutions are quantized at every level. Besides the name
    patterns, the Conv reading a graph input and any node writing a graph output are excluded structurally, so the
    rule holds for graphs whose node names are not module paths.
    """
    if quant_level not in (2.0, 2.5, 3.0):
        raise BuildError(f"quant_level must be 2, 2.5 or 3 (NVIDIA's SDXL levels), got {quant_level}")
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    compiled = [(re.compile(p), p, why) for p, why in patterns.items()]
    out: dict[str, str] = {}
    matched_any = False
    for n in weighted_nodes(model):
        reason = None
        for rx, p, why in compiled:
            if rx.search(n.name):
                reason, matched_any = f"{p}: {why}", True
                break
        if reason is None and n.input[0] in graph_inputs and n.op_type == "Conv":
            reason = "conv_in: " + EXCLUDED_NAME_PATTERNS["conv_in"].split(": ", 1)[-1]
        elif reason is None and any(o in graph_outputs for o in n.output):
            label = "conv_out" if n.op_type == "Conv" else "output layer"
            reason = f"{label}: " + EXCLUDED_NAME_PATTERNS["conv_out"].split(": ", 1)[-1]
        elif reason is None and n.op_type in ("MatMul", "Gemm") and quant_level < 3.0:
            keep = bool(_FEED_FORWARD.search(n.name)) or (quant_level >= 2.5 and bool(_ATTENTION_QKV.search(n.name)))
            if not keep:
                reason = f"quant_level {quant_level}: only {'Q/K/V and ' if quant_level >= 2.5 else ''}feed-forward linears are INT8"
        if reason is not None:
            out[n.name] = reason
    if patterns and not matched_any:
        log.warning(
            "no node name matched the exclusion patterns %s: the graph's node names are not module paths, so only "
            "conv_in/conv_out were found structurally and the time-embedding layers will be quantized",
            list(patterns),
        )
    return out


def restrict_dq_to(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Rewire every consumer of an activation's DQ output that is not in ``quantized`` back to the float tensor.

    ONNX Runtime gives a tensor one shared Q/DQ pair and points *all* its consumers at the DQ output (its
    ``DedicatedQDQPair`` only applies when two or more consumers are quantized), so a ResNet output that feeds both
    a quantized downsampling conv and the skip-connection Concat would reach the Concat, and through it the up
    path's GroupNorm, quantized. TensorRT honours Q/DQ exactly where they are, so only the ops meant to run in INT8
    may read a DQ output. Returns how many inputs were rewired; Q/DQ nodes left without consumers are removed."""
    q_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_of = {
        n.output[0]: q_source[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in q_source
    }
    rewired = 0
    for n in model.graph.node:
        if n.name in quantized:
            continue
        for i, name in enumerate(n.input):
            if name in float_of:
                n.input[i] = float_of[name]
                rewired += 1
    graph_outputs = {o.name for o in model.graph.output}
    while True:  # drop DQ then Q nodes that nothing reads any more
        used = {name for n in model.graph.node for name in n.input} | graph_outputs
        dead = [
            n for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    return rewired


def weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a weighted node's constant weight: what per-channel scales must run along."""
    if node.op_type == "Conv":
        return 0  # [Cout, Cin, kh, kw]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul B is [K, N]: N output channels


def check_tensorrt_qdq(model: onnx.ModelProto, *, high_precision: Collection[str] = (), base_dir: str = "",
                       attention: bool = False) -> list[str]:
    """Problems that would stop TensorRT from building this Q/DQ graph as intended (empty list: none).

    TensorRT's explicit quantization is symmetric: INT8 with zero-point 0, activations per tensor, weights per
    output channel in [-127, 127], float bias (no INT32 bias DQ), and DQ only on the inputs of the ops that should
    run in INT8 (Conv/MatMul/Gemm not named in ``high_precision``). ``base_dir``: where a graph loaded without its
    external data finds it (the weights are then read one at a time).

    ``attention``: whether the attention MatMuls are quantized (FP8 ``--fp8-attention``): then each must read a DQ
    on *both* inputs, each a per-tensor FP8 activation pair (one side alone would leave TensorRT a mixed-precision
    GEMM in float); without it none may read a DQ output."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    high_precision = set(high_precision)
    problems: list[str] = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if zp_name:
            zp = inits.get(zp_name)
            if zp is None or zp.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN):
                problems.append(f"{n.name}: zero point {zp_name!r} is not a constant INT8 or FP8 E4M3 tensor")
            elif np.any(numpy_helper.to_array(zp, base_dir).astype(np.float32) != 0):
                problems.append(f"{n.name}: zero point is not 0 (asymmetric)")
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale {n.input[1]!r} is not a constant")
        else:
            s = numpy_helper.to_array(scale, base_dir)
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                problems.append(f"{n.name}: scale has non-positive or non-finite values")
        if n.op_type != "DequantizeLinear":
            continue
        src = inits.get(n.input[0])
        if src is not None and src.data_type == onnx.TensorProto.INT32:
            problems.append(f"{n.name}: INT32 (bias) dequantization; TensorRT wants float bias")
        for c in consumers.get(n.output[0], []):
            if c.op_type not in QUANTIZED_OP_TYPES or c.name in high_precision:
                problems.append(f"{n.name}: feeds {c.op_type} {c.name!r}, which should stay high precision")
            elif src is not None:
                w = numpy_helper.to_array(src, base_dir)
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if scale is not None and scale.dims and int(np.prod(scale.dims)) > 1 and axis != weight_axis(c):
                    problems.append(f"{n.name}: per-channel axis {axis} is not {c.op_type}'s output-channel axis {weight_axis(c)}")
                if w.dtype == np.int8 and int(w.min(initial=0)) < -127:
                    problems.append(f"{n.name}: weight uses -128; TensorRT's INT8 weights are in [-127, 127]")
    dq_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name, role in attention_matmuls(model).items():
        node = next(n for n in model.graph.node if n.name == name)
        dqs = [dq_by_output.get(i) for i in node.input]
        if not attention:
            if any(dqs):
                problems.append(f"attention MatMul {name!r} ({role}) reads a DQ output but attention is not quantized")
            continue
        for i, dq in zip(node.input, dqs, strict=True):
            if dq is None:
                problems.append(f"attention MatMul {name!r} ({role}): input {i!r} has no Q/DQ (both inputs need one)")
            elif dq.input[0] in inits:
                problems.append(f"attention MatMul {name!r} ({role}): input {i!r} is a constant, not an activation")
            else:
                zp = inits.get(dq.input[2]) if len(dq.input) > 2 else None
                sc = inits.get(dq.input[1])
                if zp is None or zp.data_type != onnx.TensorProto.FLOAT8E4M3FN:
                    problems.append(f"attention MatMul {name!r} ({role}): input {i!r} is not FP8 E4M3 Q/DQ")
                if sc is not None and int(np.prod(sc.dims)) != 1:
                    problems.append(f"attention MatMul {name!r} ({role}): input {i!r} scale is not per tensor")
    return problems


def quantized_counts(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = Counter(
        n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.input and n.input[0] in dq_out
    )
    qdq = Counter(n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return dict(quantized), dict(qdq)


def quantized_node_names(model: onnx.ModelProto) -> set[str]:
    """Names of the weighted nodes that run in INT8: those whose activation input is a DequantizeLinear output."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.input and n.input[0] in dq_out}
