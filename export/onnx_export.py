"""Trace one wrapped component to ONNX, clean the graph, and check it against PyTorch with ONNX Runtime.

Names and dynamic axes come from the component's :class:`~sdxl_trt.contracts.ComponentSpec`. Files over
2 GB (the full-size UNets) are saved with their weights in one external-data file beside the graph.

fp16 files are traced from the fp16 model (what NVIDIA's demo/Diffusion does on TensorRT 11), not converted
from the fp32 ONNX with ModelOpt's AutoCast: the traced graph already carries PyTorch's own mixed precision
(softmax in fp32 where the model asks for it, LayerNormalization and GroupNorm statistics in fp32 through
``stash_type``/InstanceNormalization), needs no new dependency, and is verified against the same PyTorch
modules. The one fix it needs is :func:`unify_float16`: the tracer leaves a few float32 tensors (CLIP's
attention mask promotes the first layer's residual to fp32) meeting fp16 ones in one op, which ONNX Runtime
and TensorRT refuse ("LayerNormalization bound to different types"). Measured against PyTorch fp32 (relative L2):
whole tiny components 7.8e-4 (text encoders) and 8.5e-4 (UNet) (``sdxl-trt export --model tiny --precision
fp16``); single layers at full-size shapes 3.0e-4..4.0e-4 (time MLP, ResNet 640->1280, transformer block 1280 with
2048-wide context at 1024 tokens, CLIP-bigG layer: benchmarks/results/fp16-layers-full-size.md). The traced
graph computes the timestep sinusoid and the attention scale in fp32 and takes the timestep as a float32 input;
nothing more is kept in fp32, since fp16 costs no more than that.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from sdxl_trt.contracts import TOKENS_PER_CHUNK, ComponentSpec
from sdxl_trt.errors import ExportError

log = logging.getLogger(__name__)

ONNX_OPSET = 17
TWO_GB = 2**31 - 1
TRACE_DIMS = {"B": 2, "S": TOKENS_PER_CHUNK, "h": 32, "w": 40}
"""Shape used for tracing: distinct values per named dimension so no two are confused or specialised."""


def sample_inputs(
    spec: ComponentSpec, dims: Mapping[str, int], precision: torch.dtype, *, seed: int = 0,
    device: str | torch.device = "cpu", vocab_size: int = 49408,
) -> dict[str, torch.Tensor]:
    """Seeded random inputs in each tensor's domain (token ids, timesteps in [0, 1000), control images in [0, 1],
    ControlNet scales in [0.25, 1.25), normals)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = t.shape(dims)
        dtype = t.torch_dtype(precision)
        if t.name == "input_ids":
            x = torch.randint(0, vocab_size, shape, generator=g, dtype=dtype)
        elif t.name == "timestep":
            x = torch.rand(shape, generator=g) * 999
        elif t.name == "time_ids":
            x = torch.randint(0, 1024, shape, generator=g).float()
        elif t.name == "images":
            x = torch.rand(shape, generator=g) * 2 - 1
        elif t.name == "controlnet_cond":  # a control image, in [0, 1]
            x = torch.rand(shape, generator=g)
        elif t.name == "conditioning_scale":  # distinct per row and residual, so a mixed-up column shows
            x = 0.25 + torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x.to(device=device, dtype=dtype)
    return out


@dataclass
class Verification:
    """How far ONNX Runtime's outputs are from PyTorch's, per output tensor."""

    dims: dict[str, int]
    relative_error: dict[str, float]  # ||onnx - torch||_2 / ||torch||_2, torch in the file's precision
    max_abs_error: dict[str, float]
    fp32_relative_error: dict[str, float] | None = None  # the same file against PyTorch in fp32 (fp16 files)

    @property
    def worst_relative_error(self) -> float:
        return max(self.relative_error.values())


def export_onnx(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: Path,
    *,
    precision: torch.dtype,
    device: str | torch.device = "cpu",
    external_data_threshold: int = TWO_GB,
) -> Path:
    """Trace ``module`` with the TorchScript exporter (fast and reliable for the 2.6 B UNet) and save it.

    Graphs of ``external_data_threshold`` bytes or more (protobuf's 2 GB limit) keep their weights in one
    ``<name>.onnx.data`` file beside the graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = sample_inputs(spec, TRACE_DIMS, precision, device=device)
    dynamic_axes = {t.name: t.dynamic_axes() for t in spec.tensors if t.dynamic_axes()}
    raw_dir = path.parent / f".{path.stem}.raw"
    raw_dir.mkdir(exist_ok=True)
    raw = raw_dir / "model.onnx"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                tuple(inputs[n] for n in spec.input_names),
                str(raw),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:  # noqa: BLE001 - report which component failed and why
            raise ExportError(f"torch.onnx.export failed for {spec.name}: {e}") from e
    model = onnx.load(str(raw), load_external_data=True)
    model = restore_unused_inputs(clean_graph(model), spec, precision)
    if precision == torch.float16:
        cast = unify_float16(model)
        cast += type_float_outputs(model, spec, onnx.TensorProto.FLOAT16)
        if cast:
            log.info("%s: %d fp32 tensor(s) cast to fp16 (the tracer's type promotion)", spec.name, cast)
    save_onnx(model, path, external_data_threshold=external_data_threshold)
    for f in raw_dir.iterdir():
        f.unlink()
    raw_dir.rmdir()
    return path


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes, infer shapes (onnx-graphsurgeon; shape inference for < 2 GB)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    try:
        graph.fold_constants(error_ok=True)
    except Exception as e:  # noqa: BLE001 - folding is an optimisation; keep the unfolded graph
        log.warning("constant folding skipped: %s", e)
    graph.cleanup()
    cleaned = gs.export_onnx(graph)
    if cleaned.ByteSize() < TWO_GB:
        cleaned = onnx.shape_inference.infer_shapes(cleaned)
    return cleaned


MIXED_TYPE_OPS = frozenset({"Cast", "CastLike", "Resize", "Upsample", "Pow", "QuantizeLinear", "DequantizeLinear",
                            "Shape", "Size", "ConstantOfShape", "Range"})
"""Ops whose float inputs may legitimately differ in type (Resize's scales are float32 by the spec, Pow's
exponent has its own type, a Cast changes type): :func:`unify_float16` leaves them alone."""


def unify_float16(model: onnx.ModelProto, *, max_rounds: int = 8) -> int:
    """Cast every float32 input of an op that also reads float16 (one type parameter bound to two types) to
    float16, in place; returns how many inputs were cast. Types come from ONNX shape inference, repeated until
    no op mixes them (a cast can make a later op consistent or not)."""
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    total = 0
    made: dict[str, str] = {}  # float32 tensor -> its fp16 cast (one per tensor, across rounds)
    del model.graph.value_info[:]  # the tracer's types, which the graph's ops may contradict: inferred from the ops
    for _ in range(max_rounds):
        inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < TWO_GB else model
        g = inferred.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
        types.update({i.name: i.data_type for i in g.initializer})
        for n in g.node:  # Constant outputs are not always in value_info
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        types[n.output[0]] = a.t.data_type
        changed = 0
        new_nodes = []
        inits = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type not in MIXED_TYPE_OPS and n.domain in ("", "ai.onnx"):
                seen = {types.get(i) for i in n.input if i}
                if FLOAT in seen and HALF in seen:
                    for k, name in enumerate(n.input):
                        if name and types.get(name) == FLOAT:
                            if name not in made:
                                made[name] = f"{name}__to_fp16"
                                if name in inits:  # a weight the tracer folded in fp32: store it in fp16
                                    value = numpy_helper.to_array(inits[name]).astype(np.float16)
                                    model.graph.initializer.append(numpy_helper.from_array(value, made[name]))
                                else:
                                    new_nodes.append(helper.make_node("Cast", [name], [made[name]], to=HALF,
                                                                      name=f"{name}__Cast_fp16"))
                            n.input[k] = made[name]
                            changed += 1
            new_nodes.append(n)
        total += changed
        if not changed:
            break
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        del model.graph.value_info[:]  # stale types; inferred again
    if total:
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]  # fp32 weights now read as fp16 only
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        if model.ByteSize() < TWO_GB:
            model.CopyFrom(onnx.shape_inference.infer_shapes(model))
    return total


def type_float_outputs(model: onnx.ModelProto, spec: ComponentSpec, elem_type: int) -> int:
    """Make every ``float`` output of the contract ``elem_type`` (its engine precision's), casting the ones the
    graph computes in another float type; returns how many were cast. The contract says an fp16 engine's float
    tensors are fp16, whatever the tracer promoted on the way."""
    from onnx import helper

    floats = {t.name for t in spec.outputs if t.dtype == "float"}
    inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < TWO_GB else model
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    producers = {o: n for n in model.graph.node for o in n.output}
    cast = 0
    for out in model.graph.output:
        if out.name not in floats:
            continue
        computed = types.get(out.name, out.type.tensor_type.elem_type)
        producer = producers.get(out.name)
        if computed != elem_type and producer is not None:
            inner = f"{out.name}__computed"
            producer.output[list(producer.output).index(out.name)] = inner
            for n in model.graph.node:
                n.input[:] = [inner if i == out.name else i for i in n.input]
            model.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=elem_type,
                                                     name=f"{out.name}__Cast"))
            cast += 1
        out.type.tensor_type.elem_type = elem_type
    return cast


def restore_unused_inputs(model: onnx.ModelProto, spec: ComponentSpec, precision: torch.dtype) -> onnx.ModelProto:
    """Give back the contract's inputs that no output depends on, in the contract's order (the tracer drops them:
    e.g. a step-caching shallow UNet whose layers have no cross-attention never reads ``encoder_hidden_states``),
    so every engine of a family takes the same named inputs. ONNX Runtime and TensorRT accept unused inputs."""
    present = {i.name: i for i in model.graph.input}
    missing = [t for t in spec.inputs if t.name not in present]
    if not missing:
        return model
    elem = {"float": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(precision).removeprefix("torch."))),
            "float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}
    made = {t.name: onnx.helper.make_tensor_value_info(t.name, elem[t.dtype], [
        d if isinstance(d, int) else str(d) for d in t.dims]) for t in missing}
    ordered = [present.get(t.name) or made[t.name] for t in spec.inputs]
    extra = [i for i in model.graph.input if i.name not in {t.name for t in spec.inputs}]
    del model.graph.input[:]
    model.graph.input.extend([*ordered, *extra])
    log.info("%s: inputs %s are unused; kept as graph inputs", spec.name, [t.name for t in missing])
    return model


def save_onnx(model: onnx.ModelProto, path: Path, *, external_data_threshold: int = TWO_GB) -> None:
    """Save ``model``; over the threshold (2 GB), all weights go to one ``<name>.onnx.data`` file beside it."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    large = model.ByteSize() >= external_data_threshold
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def check_onnx(path: Path) -> None:
    """``onnx.checker`` on the file (by path, so external data is fine)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path} fails onnx.checker: {e}") from e


def verify_onnx(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: Path,
    *,
    dims: Mapping[str, int],
    precision: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 1,
    fp32_expected: dict[str, torch.Tensor] | None = None,
) -> Verification:
    """Run the same random inputs through PyTorch and ONNX Runtime (CPU) and compare; with ``fp32_expected``
    (:func:`fp32_outputs` on the same dims and seed) also against PyTorch in fp32: what fp16 costs. ONNX
    Runtime's CPU provider runs an fp16 file by casting around the kernels it lacks in fp16 (slowly)."""
    import onnxruntime as ort

    inputs = sample_inputs(spec, dims, precision, device=device, seed=seed)
    with torch.inference_mode():
        expected = module(*(inputs[n] for n in spec.input_names))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(spec.output_names, {k: v.cpu().numpy() for k, v in inputs.items()})
    rel, mx = {}, {}
    for name, e, g in zip(spec.output_names, expected, got, strict=True):
        e64 = e.detach().cpu().double().numpy()
        g64 = np.asarray(g, dtype=np.float64)
        if e64.shape != g64.shape:
            raise ExportError(f"{spec.name}.{name}: ONNX shape {g64.shape} != PyTorch shape {e64.shape} at {dict(dims)}")
        diff = g64 - e64
        rel[name] = float(np.linalg.norm(diff) / max(np.linalg.norm(e64), 1e-30))
        mx[name] = float(np.abs(diff).max())
    rel32 = None
    if fp32_expected is not None:
        rel32 = {name: relative_l2(np.asarray(g, dtype=np.float64), fp32_expected[name].double().cpu().numpy())
                 for name, g in zip(spec.output_names, got, strict=True)}
    return Verification(dict(dims), rel, mx, rel32)


def relative_l2(got: np.ndarray, expected: np.ndarray) -> float:
    """||got - expected||_2 / ||expected||_2 (float64)."""
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - e) / max(np.linalg.norm(e), 1e-30))


def fp32_outputs(module: torch.nn.Module, spec: ComponentSpec, *, dims: Mapping[str, int],
                 device: str | torch.device = "cpu", seed: int = 1) -> dict[str, torch.Tensor]:
    """``module``'s outputs in fp32 on :func:`verify_onnx`'s inputs (same dims and seed, drawn in fp32 and
    rounded to fp16 first, so both see the same values): the reference an fp16 file is measured against."""
    inputs = sample_inputs(spec, dims, torch.float16, device=device, seed=seed)
    inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.inference_mode():
        out = module.float()(*(inputs[n] for n in spec.input_names))
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    return {n: o.detach().float().cpu() for n, o in zip(spec.output_names, out, strict=True)}
