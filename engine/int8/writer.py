"""Write the Q/DQ UNet from measured ranges, one weight at a time: no calibrator, no whole model in memory.

Given the activation ranges (:mod:`.ranges`) and the nodes to quantize (:mod:`.qdq`'s placement), this
inserts exactly what ONNX Runtime's ``quantize_static`` produces in the TensorRT configuration of :mod:`.ort`:

* per activation tensor, one ``QuantizeLinear -> DequantizeLinear`` pair (INT8, zero-point 0, scale
  ``amax / 127``), read only by the nodes to quantize (other consumers keep the float tensor);
* per weight, an INT8 initializer ``round(w / s)`` with one scale per output channel (``s = max|w_c| / 127``,
  Conv axis 0, MatMul axis 1, Gemm by ``transB``) and a ``DequantizeLinear`` in front of the node; bias stays float.

The FP32 graph is read without its weights; each weight is read on its own (memory-mapped from the external data
file when there is one), quantized and written out. Large models (the full-size UNet) are written straight into
``<out>.onnx.data`` tensor by tensor, so peak memory is the graph plus one weight, not the model.

FP8 (``fmt="fp8"``, TensorRT's FP8 recipe as NVIDIA ModelOpt writes it for SDXL): E4M3 (``float8e4m3fn``)
Q/DQ, activations per tensor with scale ``amax / 448`` from the same ranges, weights **per tensor**
(``max|w| / 448``: TensorRT's FP8 convolutions and GEMMs take one weight scale), zero points FP8 zero.

FP8 attention (``attention``: the attention MatMuls' node names): both inputs of each Q.K^T and softmax.V MatMul
get an activation pair too, per tensor ``amax / 448`` (no weight: both are activations), so TensorRT can run the
attention's two GEMMs in FP8; their scales take the input tensor's float type.

The same ranges are written into either graph: the fp32 UNet (verified on the CPU, where ONNX Runtime runs the
Q/DQ pairs intact) or the fp16 UNet (the typed file TensorRT builds: the quantized layers INT8/FP8, the rest
fp16; its scales are fp16, which needs opset 19 as ``float8e4m3fn`` does, so such files are converted to 19).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from sdxl_trt.errors import BuildError
from sdxl_trt.files import atomic_path

from .qdq import (
    QUANTIZED_OP_TYPES,
    attention_matmuls,
    check_tensorrt_qdq,
    initializer_names,
    quantized_counts,
    weight_axis,
)
from .report import QuantizationReport, measure_error

log = logging.getLogger(__name__)

QMAX = 127
"""Symmetric INT8: values in [-127, 127], what TensorRT's explicit quantization takes."""
FP8_MAX = 448.0
"""The largest finite E4M3 (``float8e4m3fn``) value: FP8 scales are ``amax / 448``."""
QDQ_OPSET = 19
"""Opset of FP8 and fp16-typed Q/DQ files: ``float8e4m3fn`` and fp16 scales in Q/DQ are opset 19."""
QMAX_OF = {"int8": float(QMAX), "fp8": FP8_MAX}

_EXTERNAL_MIN_BYTES = 1024
"""Tensors under this size stay inside the graph file (as ``save_onnx`` does)."""


def symmetric_scale(amax: np.ndarray | float, qmax: float = QMAX) -> np.ndarray:
    """``amax / qmax`` (127 INT8, 448 FP8) as float32, 1.0 where the range is empty (ONNX Runtime's
    ``compute_scale_zp`` rule)."""
    a = np.asarray(amax, dtype=np.float64)
    scale = (2.0 * a / (2 * qmax)).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


def quantize_weight_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor E4M3 of a float weight: (``float8e4m3fn`` values, a scalar float32 scale ``max|w| / 448``)."""
    import ml_dtypes

    w = np.asarray(w, dtype=np.float32)
    scale = symmetric_scale(np.abs(w).max(initial=0.0), FP8_MAX)
    q = np.clip(w / scale, -FP8_MAX, FP8_MAX)  # ml_dtypes does not saturate (500 -> nan)
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def _zero(fmt: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    if fmt == "fp8":
        import ml_dtypes

        return np.zeros(shape, ml_dtypes.float8_e4m3fn)
    return np.zeros(shape, np.int8)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric INT8 of a float weight: (int8 values, float32 scales along ``axis``)."""
    w = np.asarray(w, dtype=np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = symmetric_scale(amax)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.round(w / scale.reshape(shape))
    np.clip(q, -QMAX, QMAX, out=q)
    return q.astype(np.int8), scale


class _WeightReader:
    """Initializer values of the FP32 file, each read on demand (external data memory-mapped, not loaded)."""

    def __init__(self, model_dir: Path) -> None:
        self._dir = model_dir

    def array(self, t: TensorProto) -> np.ndarray:
        if not uses_external_data(t):
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims)) if t.dims else 1
        path = self._dir / info["location"]
        try:
            data = np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=(count,))
        except (OSError, ValueError) as e:
            raise BuildError(f"cannot read weight {t.name!r} from {path}: {e}; is the FP32 ONNX export complete?") from e
        return data.reshape(tuple(t.dims))

    def raw_chunks(self, t: TensorProto, chunk: int = 64 << 20) -> list[memoryview] | None:
        """The external bytes of ``t`` as memory-mapped slices (None for tensors stored inside the graph)."""
        if not uses_external_data(t):
            return None
        arr = np.ascontiguousarray(self.array(t)).reshape(-1).view(np.uint8)  # a memmap view: no copy
        return [memoryview(arr[i:i + chunk].data) for i in range(0, arr.size, chunk)]


class _Sink:
    """Where initializers go: kept in the graph (small models) or appended to ``<out>.data`` (large ones)."""

    def __init__(self, out_onnx: Path, external: bool) -> None:
        self.external = external
        self.location = out_onnx.name + ".data"
        self._file: BinaryIO | None = open(out_onnx.with_name(self.location), "wb") if external else None
        self._offset = 0

    def put_array(self, name: str, arr: np.ndarray) -> TensorProto:
        t = numpy_helper.from_array(np.asarray(arr, order="C"), name)  # 0-d stays 0-d: per-tensor scales are scalars
        if self._file is not None and len(t.raw_data) >= _EXTERNAL_MIN_BYTES:
            data = t.raw_data
            t.ClearField("raw_data")
            self._write(t, [memoryview(data)])
        return t

    def put_copy(self, t: TensorProto, chunks: list[memoryview] | None) -> TensorProto:
        """``t`` unchanged in value; its external bytes copied chunk by chunk into this sink."""
        out = TensorProto()
        out.CopyFrom(t)
        if chunks is None:
            return out
        del out.external_data[:]
        out.data_location = TensorProto.DEFAULT
        if self._file is None:
            out.raw_data = b"".join(bytes(c) for c in chunks)
        else:
            self._write(out, chunks)
        return out

    def _write(self, t: TensorProto, chunks: list[memoryview]) -> None:
        assert self._file is not None
        pad = (-self._offset) % 64  # aligned offsets let readers memory-map each tensor
        self._file.write(b"\0" * pad)
        self._offset += pad
        length = 0
        for c in chunks:
            self._file.write(c)
            length += len(c)
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self._offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._offset += length

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_qdq_model(
    fp32_onnx: Path,
    out_onnx: Path,
    *,
    ranges: Mapping[str, float],
    quantize: Collection[str],
    fmt: str = "int8",
    attention: Collection[str] = (),
) -> onnx.ModelProto:
    """Write ``out_onnx``: the UNet (fp32 or fp16) with Q/DQ in front of ``quantize`` (node names), scales from
    ``ranges`` (max-abs by activation tensor name), INT8 or FP8 (``fmt``); ``attention``: attention MatMuls (node
    names) whose two activation inputs get FP8 Q/DQ too. Returns the written graph (initializers of large models
    external)."""
    if fmt not in QMAX_OF:
        raise BuildError(f"Q/DQ format must be one of {list(QMAX_OF)}, got {fmt!r}")
    if attention and fmt != "fp8":
        raise BuildError(f"attention MatMuls are quantized in FP8 only (--fp8-attention), not {fmt!r}")
    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    if fmt == "fp8" or any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        # Before any Q/DQ is added: the converter re-infers types with each op's rules at the new opset.
        model = _to_opset(model, QDQ_OPSET)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.name in set(quantize)}
    if len(nodes) != len(set(quantize)):
        missing = sorted(set(quantize) - set(nodes))
        raise BuildError(f"{len(missing)} nodes to quantize are not in {fp32_onnx}, e.g. {missing[:3]}")
    attn_nodes = {n.name: n for n in graph.node if n.name in set(attention)}
    if len(attn_nodes) != len(set(attention)):
        raise BuildError(f"attention MatMuls not in {fp32_onnx}: {sorted(set(attention) - set(attn_nodes))[:3]}")
    no_range = sorted(({n.input[0] for n in nodes.values()} | {i for n in attn_nodes.values() for i in n.input})
                      - set(ranges))
    if no_range:
        raise BuildError(f"no calibration range for {len(no_range)} activations, e.g. {no_range[:3]}; calibrate again")
    bad = {t: a for t, a in ranges.items() if not np.isfinite(a)}
    if bad:
        raise BuildError(f"non-finite calibration ranges for {len(bad)} activations, e.g. {list(bad.items())[:3]}: "
                         "the FP32 UNet overflowed on the calibration inputs")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    quantized_weights = {n.input[1] for n in nodes.values()}
    for w in quantized_weights:
        if w not in inits:
            raise BuildError(f"weight {w!r} of a node to quantize is not a constant initializer in {fp32_onnx}")
        if any(c.name not in nodes for c in consumers[w]):
            raise BuildError(f"weight {w!r} is shared with a node that stays high precision; not supported")

    reader = _WeightReader(fp32_onnx.parent)
    external = any(uses_external_data(t) for t in graph.initializer)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out_onnx, external)
    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    activation_dq: dict[str, str] = {}
    zero = _zero(fmt)
    qmax = QMAX_OF[fmt]
    def scale_dtype(node: onnx.NodeProto) -> type:
        """Q/DQ scales take the node's float type (DQ outputs it): its weight's (fp16 in the typed file)."""
        return np.float16 if inits[node.input[1]].data_type == TensorProto.FLOAT16 else np.float32

    def activation_pair(act: str, dtype: type) -> str:
        """The DQ output of ``act``'s one Q/DQ pair (made on first use), per tensor from its range."""
        if act not in activation_dq:
            scale = symmetric_scale(ranges[act], qmax).astype(dtype)
            new_inits.extend([sink.put_array(f"{act}_scale", scale), sink.put_array(f"{act}_zero_point", zero)])
            new_nodes.extend([
                helper.make_node("QuantizeLinear", [act, f"{act}_scale", f"{act}_zero_point"],
                                 [f"{act}_QuantizeLinear_Output"], name=f"{act}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{act}_QuantizeLinear_Output", f"{act}_scale",
                                                      f"{act}_zero_point"],
                                 [f"{act}_DequantizeLinear_Output"], name=f"{act}_DequantizeLinear"),
            ])
            activation_dq[act] = f"{act}_DequantizeLinear_Output"
        return activation_dq[act]

    float_types = _float_types(model, {i for n in attn_nodes.values() for i in n.input})
    try:
        for t in graph.initializer:  # the float weights that stay, in the file's order
            if t.name not in quantized_weights:
                new_inits.append(sink.put_copy(t, reader.raw_chunks(t)))
        for original in graph.node:
            n = onnx.NodeProto()
            n.CopyFrom(original)
            if n.name in attn_nodes:
                for i, act in enumerate(list(n.input)):
                    n.input[i] = activation_pair(act, float_types[act])
            if n.name in nodes:
                act = n.input[0]
                activation_pair(act, scale_dtype(n))
                w = n.input[1]
                axis = weight_axis(n)
                if fmt == "fp8":  # per tensor: no axis
                    q, scale = quantize_weight_fp8(reader.array(inits[w]))
                    dq_attrs: dict[str, int] = {}
                else:
                    q, scale = quantize_weight(reader.array(inits[w]), axis)
                    dq_attrs = {"axis": axis}
                new_inits += [
                    sink.put_array(f"{w}_quantized", q),
                    sink.put_array(f"{w}_scale", scale.astype(scale_dtype(n))),
                    sink.put_array(f"{w}_zero_point", _zero(fmt, scale.shape)),
                ]
                del q
                new_nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"],
                    [f"{w}_DequantizeLinear_Output"], name=f"{w}_DequantizeLinear", **dq_attrs,
                ))
                n.input[0] = activation_dq[act]
                n.input[1] = f"{w}_DequantizeLinear_Output"
            new_nodes.append(n)
    finally:
        sink.close()
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Shape-inferred value_info of the float graph stays valid: Q/DQ outputs are new names.
    with atomic_path(out_onnx) as tmp:
        onnx.save_model(model, str(tmp))
    if not external:
        stale = out_onnx.with_name(out_onnx.name + ".data")
        if stale.exists():
            stale.unlink()
    log.info("wrote %s: %d activations and %d weights quantized%s", out_onnx, len(activation_dq),
             len(quantized_weights), f" (weights in {sink.location})" if external else "")
    return model


def _float_types(model: onnx.ModelProto, names: Collection[str]) -> dict[str, type]:
    """numpy float type (float32 / float16) of each tensor in ``names``, from the graph's value_info (the exporter
    stores it), shape inference filling any gap. Raises naming a tensor that is not float32 or float16."""
    want = set(names)
    if not want:
        return {}
    graph = model.graph

    def known(g: onnx.GraphProto) -> dict[str, int]:
        return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}

    types = known(graph)
    if not want <= set(types):
        types.update(known(onnx.shape_inference.infer_shapes(model).graph))
    np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    bad = sorted(n for n in want if types.get(n) not in np_type)
    if bad:
        raise BuildError(f"attention MatMul inputs {bad[:3]} are not float32/float16 tensors (types "
                         f"{[types.get(n) for n in bad[:3]]}): cannot place FP8 Q/DQ on them")
    return {n: np_type[types[n]] for n in want}


def attention_ranges(fp32_onnx: Path, other_onnx: Path, ranges: Mapping[str, float]) -> dict[str, float]:
    """The attention MatMul inputs' ranges (keyed by the fp32 graph's tensor names) keyed by ``other_onnx``'s,
    matched by attention module and role (Q.K^T / softmax.V) and input position."""
    from .ranges import module_path

    def by_role(path: Path) -> dict[tuple[str, str], list[str]]:
        model = onnx.load(str(path), load_external_data=False)
        roles = attention_matmuls(model)
        return {(module_path(n.name), roles[n.name]): list(n.input) for n in model.graph.node if n.name in roles}

    ours = by_role(fp32_onnx)
    out: dict[str, float] = {}
    for key, inputs in by_role(other_onnx).items():
        if key not in ours:
            continue  # no range: write_qdq_model names the tensor
        for theirs, mine in zip(inputs, ours[key], strict=True):
            if mine in ranges:
                out[theirs] = float(ranges[mine])
    return out


def ranges_for_graph(fp32_onnx: Path, other_onnx: Path, ranges: Mapping[str, float],
                     quantize: Collection[str]) -> dict[str, float]:
    """``ranges`` (keyed by the fp32 graph's activation names) keyed by ``other_onnx``'s instead, matched through
    the quantized nodes, which both graphs name alike (traced from the same modules). The fp16 graph's tensor names
    differ where its dtype differs (the attention output is a Cast there); the range is the module's input's."""
    names = set(quantize)
    act32 = {n.name: n.input[0] for n in onnx.load(str(fp32_onnx), load_external_data=False).graph.node if n.name in names}
    out: dict[str, float] = {}
    for n in onnx.load(str(other_onnx), load_external_data=False).graph.node:
        if n.name in names and act32.get(n.name) in ranges:
            out[n.input[0]] = max(out.get(n.input[0], 0.0), float(ranges[act32[n.name]]))
    return out


def _to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at ``opset`` of the default domain (ONNX's version converter: e.g. ReduceMean's axes become an
    input at 18). The weights stay where they are (external ones are only referenced)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # noqa: BLE001 - name the step that failed
        raise BuildError(f"converting the Q/DQ UNet from opset {current} to {opset} (needed for float8e4m3fn and "
                         f"fp16 scales) failed: {e}") from e


def quantize_unet_from_ranges(
    fp32_onnx: Path,
    out_onnx: Path,
    *,
    ranges: Mapping[str, float],
    samples: int,
    excluded: Mapping[str, str],
    quantize: Collection[str],
    quant_level: float,
    exclude_patterns: Mapping[str, str],
    eval_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    providers: Sequence[str] | None = None,
    fmt: str = "int8",
    typed: tuple[Path, Path] | None = None,
    attention: bool = False,
) -> QuantizationReport:
    """Write the Q/DQ UNet from measured ranges, check it as TensorRT will read it, and report (with the error on
    ``eval_inputs`` when given): the range-based counterpart of :func:`.ort.quantize_unet`. ``fmt``: int8 or
    fp8. ``typed``: (fp16 UNet, out): also write the same Q/DQ into the fp16 UNet, the file a strongly typed
    TensorRT build parses; its error against the fp32 file is measured too (``error_typed``). ``attention``: FP8
    Q/DQ on both inputs of every attention MatMul as well (``ranges`` must hold them: :mod:`.ranges` with
    ``attention=True``)."""
    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if fp32_onnx.resolve() == out_onnx.resolve():
        raise BuildError(f"out_onnx {out_onnx} would overwrite the FP32 input; choose another path")
    t0 = time.perf_counter()

    def attention_nodes(path: Path) -> list[str]:
        return sorted(attention_matmuls(onnx.load(str(path), load_external_data=False))) if attention else []

    attn = attention_nodes(fp32_onnx)
    model = write_qdq_model(fp32_onnx, out_onnx, ranges=ranges, quantize=quantize, fmt=fmt, attention=attn)
    problems = check_tensorrt_qdq(model, high_precision=set(excluded), base_dir=str(out_onnx.parent),
                                  attention=attention)
    if problems:
        raise BuildError(f"the quantized UNet is not TensorRT-compatible ({len(problems)} problems), first: {problems[:3]}")
    quantized, qdq = quantized_counts(model)
    inits = initializer_names(model)
    unquantized_attention = sum(1 for n in model.graph.node if n.op_type == "MatMul"
                                and not any(i in inits for i in n.input)
                                and not any(i.endswith("_DequantizeLinear_Output") for i in n.input))
    del model
    try:
        onnx.checker.check_model(str(out_onnx))
    except onnx.checker.ValidationError as e:
        raise BuildError(f"the quantized UNet {out_onnx} fails onnx.checker: {e}") from e
    report = QuantizationReport(
        fp32_onnx=str(fp32_onnx),
        int8_onnx=str(out_onnx),
        tool=f"sdxl-trt range calibration (PyTorch forward hooks) + Q/DQ writer, onnx {onnx.__version__}",
        format=fmt,
        calibrate_method="minmax",
        quant_level=float(quant_level),
        calibration_samples=samples,
        seconds=0.0,
        quantized_nodes=quantized,
        excluded_nodes=dict(excluded),
        qdq_nodes=qdq,
        settings={
            "calibration_backend": "torch",
            "quant_format": "QDQ",
            "activation_type": ("FP8 E4M3 per tensor (amax / 448)" + (", attention MatMul inputs too" if attn else "")
                                if fmt == "fp8"
                                else "QInt8 symmetric per tensor (amax / 127)"),
            "weight_type": "FP8 E4M3 per tensor (max|w| / 448)" if fmt == "fp8" else "QInt8 symmetric per output channel",
            "per_channel": fmt != "fp8",
            "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
            "exclude_patterns": dict(exclude_patterns),
            "not_quantized": "every op but Conv/MatMul/Gemm (norms, softmax, activations, adds, concats, resizes)",
            "attention_matmuls_not_quantized": unquantized_attention,
            "attention_matmuls_quantized": len(attn),
        },
        attention_matmuls=len(attn),
    )
    if typed is not None:
        fp16_onnx, typed_out = typed
        typed_ranges = ranges_for_graph(fp32_onnx, fp16_onnx, ranges, quantize)
        if attention:
            typed_ranges.update(attention_ranges(fp32_onnx, fp16_onnx, ranges))
        typed_model = write_qdq_model(fp16_onnx, typed_out, ranges=typed_ranges, quantize=quantize, fmt=fmt,
                                      attention=attention_nodes(fp16_onnx))
        problems = check_tensorrt_qdq(typed_model, high_precision=set(excluded), base_dir=str(typed_out.parent),
                                      attention=attention)
        if problems:
            raise BuildError(f"the fp16 Q/DQ UNet is not TensorRT-compatible ({len(problems)} problems), first: "
                             f"{problems[:3]}")
        del typed_model
        report.typed_onnx = str(typed_out)
    report.seconds = round(time.perf_counter() - t0, 3)
    if eval_inputs:
        report.error = measure_error(fp32_onnx, out_onnx, eval_inputs, providers=providers)
        if typed is not None:
            report.error_typed = measure_error(fp32_onnx, typed[1], eval_inputs, providers=providers)
    log.info("%s", report.summary())
    return report
