"""Trace one wrapped component to ONNX, clean the graph, and check it against PyTorch with ONNX Runtime.

Names and dynamic axes come from the component's :class:`~sdxl_trt.contracts.ComponentSpec`. Files over
2 GB (the full-size UNets) are saved with their weights in one external-data file beside the graph.
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
    relative_error: dict[str, float]  # ||onnx - torch||_2 / ||torch||_2
    max_abs_error: dict[str, float]

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
) -> Verification:
    """Run the same random inputs through PyTorch and ONNX Runtime (CPU) and compare."""
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
    return Verification(dict(dims), rel, mx)
