"""INT8 explicit quantization of the tiny UNet: real calibration inputs, TensorRT-shaped Q/DQ, error against FP32.

Everything heavy (export, calibration through diffusers' pipeline, quantization, the error measurement) runs once
in module-scoped fixtures, one per calibration backend (``built``: the default, ranges from PyTorch hooks;
``built_ort``: ONNX Runtime's calibrator on recorded inputs); the tests then read their results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sdxl_trt.contracts import ModelDims, component_specs
from sdxl_trt.engine import int8
from sdxl_trt.engine.int8 import calibration as int8_calibration
from sdxl_trt.engine.int8 import qdq as int8_qdq
from sdxl_trt.engine.int8 import ranges as int8_ranges
from sdxl_trt.engine.int8 import writer as int8_writer
from sdxl_trt.errors import BuildError
from sdxl_trt.export.loading import load_model, model_dims
from sdxl_trt.export.onnx_export import export_onnx, sample_inputs
from sdxl_trt.export.wrappers import wrap_components

STEPS = 6
SIZE = 256  # tiny's native bucket: latent 32x32
CALIB_PROMPTS = 4
CALIB_SAMPLES = 8
EVAL_PROMPTS = 2  # held out: the next prompts of the file, another seed; 2 samples each

# Measured on the tiny preset with these fixtures (8 MinMax samples from 4 prompts x 6 steps; held out: 4 samples
# of the next 2 prompts, another seed): noise_pred relative L2 error 0.042 mean / 0.101 worst, cosine >= 0.9949,
# the same to three digits for both backends (their scales agree to 1.3e-6 and their INT8 weights exactly). With
# older preset weights the recipe gave 0.025 / 0.053; without the name-based exclusions 0.046 / 0.094; ModelOpt's
# generic ONNX INT8 recipe (16 samples) 0.097 / 0.235 on 8. The bounds leave about 2x margin for BLAS and
# thread-count differences between machines; the structural tests below, not these bounds, pin where every Q/DQ
# goes, and the backend comparison pins the scales.
REL_L2_MEAN_BOUND = 0.08
REL_L2_MAX_BOUND = 0.2
COSINE_MIN_BOUND = 0.99

HIGH_PRECISION_OP_TYPES = (
    "InstanceNormalization",  # GroupNorm
    "LayerNormalization",
    "Softmax",
    "Sigmoid",  # SiLU
    "Erf",  # GELU
    "Add",
    "Mul",
    "Concat",
    "Resize",
    "Gather",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny UNet's ops are too small to gain from threads, and on a shared 2-core machine torch's spinning
    worker threads made each pipeline call 7x slower (2.2 s instead of 0.3 s of CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def calibrate_once_per_setting() -> Iterator[None]:
    """The fixtures below run ``build_int8_unet`` five times over the same prompts, seed and sample count (torch
    ranges for int8 twice and fp8, ONNX Runtime's recorded inputs, fp8 with attention): the builds re-run only
    what a setting changes. Measuring ranges or recording inputs for settings already seen returns a copy of the
    first result (what a re-run gives: calibration is deterministic, and ``built`` and ``built_typed`` pinning the
    same scales shows it), so the Q/DQ writing, the typed files and the error measurement each run per build."""
    memo: dict[tuple[Any, ...], Any] = {}

    def memoized(fn: Any, key_of: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = (fn.__name__, *key_of(*args, **kwargs))
            if key not in memo:
                memo[key] = fn(*args, **kwargs)
            return copy.deepcopy(memo[key])
        return wrapper

    def digest(value: Any) -> Any:
        if isinstance(value, torch.Tensor | np.ndarray):
            return hashlib.sha256(np.ascontiguousarray(np.asarray(value)).tobytes()).hexdigest()
        if isinstance(value, dict):
            return tuple((k, digest(v)) for k, v in sorted(value.items()))
        if isinstance(value, list | tuple):
            return tuple(digest(v) for v in value)
        return value

    def settings(kw: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted((k, digest(v)) for k, v in kw.items()))

    def ranges_key(model: Any, graph: Any, nodes: Any, prompts: Any, **kw: Any) -> tuple[Any, ...]:
        return (id(model), frozenset(nodes), tuple(prompts), settings(kw))

    def inputs_key(model: Any, prompts: Any, **kw: Any) -> tuple[Any, ...]:
        return (id(model), tuple(prompts), settings(kw))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8, "collect_activation_ranges", memoized(int8.collect_activation_ranges, ranges_key))
        mp.setattr(int8, "collect_calibration_inputs", memoized(int8.collect_calibration_inputs, inputs_key))
        yield


def _build(tmp: Path, backend: str) -> dict[str, Any]:
    model = load_model("tiny")
    spec = component_specs(model_dims(model))["unet"]
    fp32 = tmp / "unet.onnx"
    if not fp32.exists():
        export_onnx(wrap_components(model)["unet"], spec, fp32, precision=torch.float32)
    out = tmp / f"unet.int8.{backend}.onnx"
    report = int8.build_int8_unet(
        model, fp32, out, num_prompts=CALIB_PROMPTS, steps=STEPS, width=SIZE, height=SIZE,
        num_eval_prompts=EVAL_PROMPTS, max_samples=CALIB_SAMPLES, backend=backend,  # type: ignore[arg-type]
    )
    return {"model": model, "spec": spec, "fp32": fp32, "int8": out, "report": report, "onnx": onnx.load(str(out))}


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8")


@pytest.fixture(scope="module")
def built(int8_dir: Path) -> dict[str, Any]:
    """The build's path: export the tiny UNet in fp32, then build_int8_unet (default backend: PyTorch hooks)."""
    return _build(int8_dir, "torch")


@pytest.fixture(scope="module")
def built_typed(int8_dir: Path, built: dict[str, Any]) -> dict[str, Any]:
    """What a TensorRT int8/fp8 build makes: the same ranges written as INT8 and as FP8 Q/DQ into the fp32 UNet (the
    twin ONNX Runtime verifies) and into the fp16 UNet exported from the fp16 model (the typed file TensorRT builds)."""
    model = built["model"]
    fp16 = int8_dir / "unet.fp16.onnx"
    if not fp16.exists():
        # A copy: halving the shared model in place would round the fp32 weights the other fixtures calibrate.
        export_onnx(copy.deepcopy(wrap_components(model)["unet"]).half(), built["spec"], fp16, precision=torch.float16)
    out: dict[str, Any] = {"fp16": fp16}
    for fmt in ("int8", "fp8"):
        twin, typed = int8_dir / f"unet.{fmt}.twin.onnx", int8_dir / f"unet.{fmt}.typed.onnx"
        report = int8.build_int8_unet(
            model, built["fp32"], twin, num_prompts=CALIB_PROMPTS, steps=STEPS, width=SIZE, height=SIZE,
            num_eval_prompts=EVAL_PROMPTS, max_samples=CALIB_SAMPLES, fmt=fmt, typed=(fp16, typed))  # type: ignore[arg-type]
        out[fmt] = {"twin": twin, "typed": typed, "report": report}
    return out


@pytest.fixture(scope="module")
def built_ort(int8_dir: Path, built: dict[str, Any]) -> dict[str, Any]:
    """The same build through ONNX Runtime's calibrator (the path before the bounded one), same prompts and samples."""
    return _build(int8_dir, "onnxruntime")


def test_prompts_file_has_64_unique_prompts() -> None:
    lines = [ln.strip() for ln in int8.DEFAULT_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    assert len(set(prompts)) >= 64
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    assert int8.read_prompts() == prompts


def test_calibration_inputs_come_from_the_denoising_loop(built: dict[str, Any]) -> None:
    spec = built["spec"]
    prompts = int8.read_prompts()[:2]
    calib = int8.collect_calibration_inputs(built["model"], prompts, steps=STEPS, width=SIZE, height=SIZE, max_samples=4)
    assert len(calib) == 4
    for s in calib:
        assert list(s) == spec.input_names
        assert s["sample"].shape == (2, 4, SIZE // 8, SIZE // 8)
        assert s["timestep"].shape == (2,) and s["timestep"].dtype == np.float32
        assert s["timestep"][0] == s["timestep"][1]
        assert s["encoder_hidden_states"].shape == (2, 77, 64)
        assert all(v.dtype == np.float32 for v in s.values())
        # micro-conditioning: original size, crop (0, 0), target size
        np.testing.assert_array_equal(s["time_ids"], [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2)
        # classifier-free guidance: the empty negative prompt is zeros (force_zeros_for_empty_prompt), the
        # positive one is the encoded prompt
        assert not s["encoder_hidden_states"][0].any() and s["encoder_hidden_states"][1].any()
    # Evenly spread over the schedule (Euler, leading spacing, 6 steps: 834, 667, ..., 1), a different phase per
    # prompt: 2 prompts x 2 picks land on 4 different timesteps.
    timesteps = sorted({float(s["timestep"][0]) for s in calib})
    assert len(timesteps) == 4 and timesteps[0] < 300 and timesteps[-1] > 600


def test_output_has_tensorrt_compatible_qdq(built: dict[str, Any]) -> None:
    model: onnx.ModelProto = built["onnx"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert int8.check_tensorrt_qdq(model, high_precision=set(built["report"].excluded_nodes)) == []

    inits = {i.name: i for i in model.graph.initializer}
    consumers = {name: n for n in model.graph.node for name in n.input}
    weights = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point must be int8 0 (symmetric)"
        scale = numpy_helper.to_array(inits[n.input[1]])
        if n.input[0] in inits:  # a weight: INT8 values, one scale per output channel
            weights += 1
            w = numpy_helper.to_array(inits[n.input[0]])
            assert w.dtype == np.int8 and w.min() >= -127
            axis = next(a.i for a in n.attribute if a.name == "axis")
            user = consumers[n.output[0]]
            expected_axis = 0 if user.op_type == "Conv" else 1
            assert axis == expected_axis, f"{n.name}: per-channel axis {axis} for {user.op_type}"
            assert scale.shape == (w.shape[axis],), f"{n.name}: scale {scale.shape} is not per-channel"
        else:  # an activation: one scale
            assert scale.size == 1
    report = built["report"]
    assert weights == sum(report.quantized_nodes.values())
    assert report.quantized_nodes.get("Conv", 0) > 0 and report.quantized_nodes.get("MatMul", 0) > 0


def test_high_precision_layers_have_no_qdq_inputs(built: dict[str, Any]) -> None:
    model: onnx.ModelProto = built["onnx"]
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {i.name for i in model.graph.initializer}
    excluded = built["report"].excluded_nodes
    for n in model.graph.node:
        fed = [i for i in n.input if i in dq_out]
        if n.op_type in HIGH_PRECISION_OP_TYPES:
            assert not fed, f"{n.op_type} {n.name} reads a DequantizeLinear output"
        if n.name in excluded:
            assert not fed, f"excluded {n.name} ({excluded[n.name]}) reads a DequantizeLinear output"
        if n.op_type == "MatMul" and n.input[1] not in inits and n.input[1] not in dq_out:
            # QK^T and softmax x V: two activations, the attention path stays high precision
            assert not fed, f"attention matmul {n.name} is quantized"
    for pattern in ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj", "conv_shortcut"):
        assert any(pattern in name for name in excluded), f"no node matching {pattern!r} was excluded"


def test_int8_runs_on_onnxruntime_cpu_and_stays_close_to_fp32(built: dict[str, Any]) -> None:
    onnx.checker.check_model(str(built["int8"]))
    err = built["report"].error
    assert err is not None and err["finite"] is True
    assert err["samples"] == 2 * EVAL_PROMPTS
    assert np.isfinite([err["relative_l2_mean"], err["relative_l2_max"], err["cosine_min"]]).all()
    assert err["relative_l2_mean"] < REL_L2_MEAN_BOUND, err
    assert err["relative_l2_max"] < REL_L2_MAX_BOUND, err
    assert err["cosine_min"] > COSINE_MIN_BOUND, err
    # the quantization is not a no-op: INT8 weights and activations do change the output a little
    assert err["relative_l2_mean"] > 1e-4, err
    # Weights are stored as INT8: the file is much smaller than FP32.
    assert built["int8"].stat().st_size < 0.5 * built["fp32"].stat().st_size


def test_report_is_json_serializable(built: dict[str, Any]) -> None:
    report = built["report"]
    data = json.loads(json.dumps(report.to_json()))
    assert data["calibration_samples"] == CALIB_SAMPLES
    assert data["collection_seconds"] > 0
    assert data["quantized_nodes"] == report.quantized_nodes
    assert data["excluded_nodes"] and all(isinstance(v, str) and v for v in data["excluded_nodes"].values())
    assert data["seconds"] > 0 and data["tool"].startswith("sdxl-trt range calibration")
    assert data["settings"]["calibration_backend"] == "torch"
    assert data["settings"]["attention_matmuls_not_quantized"] > 0  # QK^T and softmax x V of every attention
    assert report.error is not None and data["error"]["relative_l2_mean"] == report.error["relative_l2_mean"]
    assert "quantized" in report.summary()


def test_errors_name_the_bad_value(built: dict[str, Any], tmp_path: Path) -> None:
    calib = [{n: np.zeros(s, np.float32) for n, s in built["spec"].shapes({"B": 2, "S": 77, "h": 32, "w": 32}).items()
              if n != "noise_pred"}]
    with pytest.raises(BuildError, match="does not exist"):
        int8.quantize_unet(tmp_path / "missing.onnx", tmp_path / "o.onnx", calibration=calib)
    with pytest.raises(BuildError, match=r"lacks input\(s\) \['time_ids'\]"):
        bad = [{k: v for k, v in calib[0].items() if k != "time_ids"}]
        int8.quantize_unet(built["fp32"], tmp_path / "o.onnx", calibration=bad)
    with pytest.raises(BuildError, match="calibrate_method must be one of"):
        int8.quantize_unet(built["fp32"], tmp_path / "o.onnx", calibration=calib, calibrate_method="mse")
    with pytest.raises(BuildError, match="quant_level must be"):
        int8.quantize_unet(built["fp32"], tmp_path / "o.onnx", calibration=calib, quant_level=1.0)
    with pytest.raises(BuildError, match="multiples of 32"):
        int8.collect_calibration_inputs(built["model"], ["a cat"], steps=2, width=250, height=256, max_samples=1)
    with pytest.raises(BuildError, match=r"has 81 prompts; 80 calibration \+ 2 held-out need 82"):
        int8.build_int8_unet(built["model"], built["fp32"], tmp_path / "o.onnx", num_prompts=80, steps=2,
                             width=SIZE, height=SIZE)
    with pytest.raises(BuildError, match="calibration backend must be one of"):
        int8.build_int8_unet(built["model"], built["fp32"], tmp_path / "o.onnx", num_prompts=1, steps=2,
                             width=SIZE, height=SIZE, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="'percentile' needs histograms"):
        int8.build_int8_unet(built["model"], built["fp32"], tmp_path / "o.onnx", num_prompts=1, steps=2,
                             width=SIZE, height=SIZE, calibrate_method="percentile")
    with pytest.raises(BuildError, match="has no prompts"):
        empty = tmp_path / "empty.txt"
        empty.write_text("\n# a comment\n")
        int8.read_prompts(empty)


def test_picked_steps_cover_the_schedule() -> None:
    picks = [int8_calibration.picked_steps(i, 30, 2) for i in range(15)]
    assert all(len(p) == 2 for p in picks)
    covered = set().union(*picks)
    assert len(covered) >= 20, sorted(covered)  # 15 prompts x 2 picks spread over most of 30 steps
    assert int8_calibration.picked_steps(0, 4, 10) == {0, 1, 2, 3}




# --------------------------------------------------------------------------------------------------------------
# The bounded (PyTorch hooks) path against ONNX Runtime's calibrator
# --------------------------------------------------------------------------------------------------------------


def test_both_backends_quantize_the_same_nodes_with_the_same_scales(built: dict[str, Any],
                                                                     built_ort: dict[str, Any]) -> None:
    new, old = built["onnx"], built_ort["onnx"]
    assert int8.quantized_node_names(new) == int8.quantized_node_names(old)
    assert len(int8.quantized_node_names(new)) == sum(built["report"].quantized_nodes.values()) > 0
    assert built["report"].excluded_nodes == built_ort["report"].excluded_nodes
    # Same graph: every node with the same inputs and outputs (ORT leaves a few unused scales behind; we do not).
    def nodes(m: onnx.ModelProto) -> set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
        return {(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node}
    assert nodes(new) == nodes(old)
    # Same numbers: activation scales from PyTorch's amax vs ONNX Runtime's ReduceMin/Max agree to float rounding
    # (the same UNet inputs, two implementations of the forward); the INT8 weights are identical.
    a = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in old.graph.initializer}
    assert set(a) <= set(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a), "per-tensor scales must be scalars"
    scales = [k for k in a if k.endswith("_scale")]
    assert len(scales) > 100
    rel = max(float(np.max(np.abs(a[k] - b[k]) / np.abs(b[k]))) for k in scales)
    assert rel < 1e-4, rel
    for k, v in a.items():
        if v.dtype == np.int8 and k.endswith("_quantized"):
            np.testing.assert_array_equal(v, b[k], err_msg=k)


def test_bounded_path_is_as_accurate_as_the_onnxruntime_path(built: dict[str, Any], built_ort: dict[str, Any]) -> None:
    new, old = built["report"].error, built_ort["report"].error
    assert new is not None and old is not None and new["samples"] == old["samples"]
    assert new["relative_l2_mean"] <= old["relative_l2_mean"] * 1.02 + 1e-4, (new, old)
    assert new["relative_l2_max"] <= old["relative_l2_max"] * 1.02 + 1e-4, (new, old)
    assert new["cosine_min"] >= old["cosine_min"] - 1e-4, (new, old)


_MEMORY_SCRIPT = """
import json, os, resource, sys, torch
torch.set_num_threads(1)
from sdxl_trt.engine import int8
from sdxl_trt.export.loading import load_model
fp32, out_dir, fmts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model = load_model("tiny")  # imported and loaded once; each build runs in a child forked from here
for fmt in fmts:
    for prompts, samples in ((1, 2), (4, 8)):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one build; its peak RSS counts from the parent's RSS at the fork, as every child's
            os.close(read)
            r = int8.build_int8_unet(model, fp32, f"{out_dir}/{fmt}-{samples}.onnx", num_prompts=prompts,
                                     max_samples=samples, steps=6, width=256, height=256, num_eval_prompts=0,
                                     fmt=fmt.split("-")[0], attention=fmt == "fp8-attention")
            os.write(write, json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                        "samples": r.calibration_samples}).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and text, (fmt, samples, status)
        print(json.dumps({"fmt": fmt, **json.loads(text)}))
"""
MEMORY_FORMATS = ("int8", "fp8-attention")


@pytest.fixture(scope="module")
def calibration_peaks(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    """Peak host memory (MB) of a build with 2 and with 8 calibration samples, per format: each build in a process
    of its own (peak RSS is per process), forked from one that imported everything and loaded the model, so that
    all four start from the same memory and the imports are paid once."""
    out = tmp_path_factory.mktemp("int8-memory")
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(built["fp32"]), str(out), ",".join(MEMORY_FORMATS)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    peaks: dict[str, dict[int, float]] = {}
    for line in run.stdout.splitlines():
        if not line.startswith('{"fmt"'):  # anything else a library printed
            continue
        result = json.loads(line)
        peaks.setdefault(result["fmt"], {})[result["samples"]] = result["peak_kib"] / 1024
    logging.getLogger(__name__).info("peak host memory (MB) by format and samples: %s", peaks)
    return peaks


@pytest.mark.slow
@pytest.mark.parametrize("fmt", MEMORY_FORMATS)
def test_peak_host_memory_does_not_grow_with_calibration_samples(calibration_peaks: dict[str, dict[int, float]],
                                                                 fmt: str) -> None:
    """2 vs 8 samples, each build in its own process. Measured with 2 vs 16: 523 vs 526 MB.
    A path that kept anything per sample at the hooked modules (their inputs are tens of MB per UNet call here)
    would add well over 100 MB for the 6 extra samples; 32 MB covers allocator noise. Plain FP8 uses the same ranges
    and writer as fp8-attention, which also observes every attention's matmul inputs (the softmax in bounded
    chunks), kept as scalars: the two formats here cover all three."""
    peaks = calibration_peaks[fmt]
    assert set(peaks) == {2, 8}, peaks
    assert peaks[8] - peaks[2] < 32, peaks


def test_writer_streams_external_data_and_writes_the_same_model(built: dict[str, Any], tmp_path: Path) -> None:
    """The full-size path (FP32 weights in an external data file, read tensor by tensor and written straight to
    ``<out>.data``) gives the same model as the in-memory one: same graph, same outputs on ONNX Runtime."""
    import onnxruntime as ort

    src = onnx.load(str(built["fp32"]))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save_model(src, str(ext_dir / "unet.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024)  # one file per tensor, as torch's exporter writes large models
    q = built["onnx"]
    scales = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ranges = {n.input[0]: float(scales[n.input[1]]) * 127 for n in q.graph.node if n.op_type == "QuantizeLinear"}
    nodes = int8.quantized_node_names(q)
    mem = int8_writer.write_qdq_model(built["fp32"], tmp_path / "mem.onnx", ranges=ranges, quantize=nodes)
    ext = int8_writer.write_qdq_model(ext_dir / "unet.onnx", tmp_path / "ext.onnx", ranges=ranges, quantize=nodes)
    from onnx.external_data_helper import uses_external_data

    inside = [t.name for t in ext.graph.initializer if not uses_external_data(t) and len(t.raw_data) >= 1024]
    assert inside == [] and sum(uses_external_data(t) for t in ext.graph.initializer) > 100
    assert not (tmp_path / "mem.onnx.data").exists()
    assert [n.name for n in mem.graph.node] == [n.name for n in ext.graph.node]
    assert int8.check_tensorrt_qdq(ext, high_precision=set(built["report"].excluded_nodes),
                                   base_dir=str(tmp_path)) == []
    dims = {"B": 2, "S": 77, "h": 32, "w": 32}
    feed = {n: v.numpy() for n, v in sample_inputs(built["spec"], dims, torch.float32).items()}
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for f in ("mem.onnx", "ext.onnx")]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], ort.InferenceSession(str(built["int8"]), providers=["CPUExecutionProvider"])
                               .run(None, feed)[0], rtol=0, atol=1e-2)


def test_nodes_not_named_after_modules_are_refused(built: dict[str, Any]) -> None:
    assert int8_ranges.module_path("/unet/down_blocks.1/attentions.0/proj_in/MatMul") == \
        "down_blocks.1.attentions.0.proj_in"
    with pytest.raises(BuildError, match="not named after a module under 'unet'.*--calibration-backend onnxruntime"):
        int8_ranges.module_path("MatMul_123")
    graph = onnx.load(str(built["fp32"]), load_external_data=False)
    conv = next(n for n in graph.graph.node if n.op_type == "Conv" and "resnets.0/conv1" in n.name)
    plan = int8_ranges.observation_plan(graph, [conv.name], built["model"].unet)
    assert list(plan) == [conv.input[0]]
    conv.name = conv.name.replace("conv1", "norm1")  # a GroupNorm, not a Conv2d
    with pytest.raises(BuildError, match="a GroupNorm, not a Conv2d"):
        int8_ranges.observation_plan(graph, [conv.name], built["model"].unet)


def test_progress_reports_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=int8_calibration.__name__):
        p = int8_calibration.Progress("calibration", 10, every_s=0.0)
        p.advance(5)
        p.advance(5, "prompt 2/2")
    lines = [r.getMessage() for r in caplog.records]
    assert "5/10 UNet calls" in lines[0] and "ETA" in lines[0] and "#" * 10 + " " * 10 in lines[0]
    assert "10/10 UNet calls" in lines[-1] and "ETA 0s (prompt 2/2)" in lines[-1]


def test_a_prompt_stops_after_its_last_picked_step(built: dict[str, Any]) -> None:
    """Steps after the last sample cannot change the sampled inputs, so they are not run: prompt 0 with one sample
    of 6 steps is sampled at step 0 and the UNet runs once (the second prompt, phase 0.618, at step 3: 4 calls)."""
    calls: list[bool] = []
    picked = int8_calibration.run_calibration_prompts(
        built["model"], int8.read_prompts()[:2], lambda p, _a, _k: calls.append(p),
        int8_calibration.Sampling(steps=STEPS, width=SIZE, height=SIZE, max_samples=2))
    assert picked == 2
    assert calls == [True, False, False, False, True]


def test_prompt_embeddings_give_the_same_unet_inputs_without_text_encoders(built: dict[str, Any]) -> None:
    """Calibration encodes the prompts first so the text encoders can be let go; the UNet must then see exactly
    what it sees when the pipeline encodes the prompts itself."""
    import dataclasses

    model = built["model"]
    prompts = int8.read_prompts()[:2]
    embeds = int8_calibration.encode_prompts(model, prompts)
    bare = dataclasses.replace(model, text_encoder=None, text_encoder_2=None)
    a = int8.collect_calibration_inputs(model, prompts, steps=STEPS, width=SIZE, height=SIZE, max_samples=4)
    b = int8.collect_calibration_inputs(bare, prompts, steps=STEPS, width=SIZE, height=SIZE, max_samples=4,
                                        embeddings=embeds)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        for name in int8.UNET_INPUT_NAMES:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    with pytest.raises(BuildError, match="1 prompt embeddings for 2 prompts"):
        int8.collect_calibration_inputs(bare, prompts, steps=STEPS, width=SIZE, height=SIZE, max_samples=4,
                                        embeddings=embeds[:1])


# Measured on tiny with the fixtures above (same 8 samples, same 4 held-out inputs), ONNX Runtime CPU, noise_pred
# against the fp32 UNet: INT8 fp32 twin rel. L2 0.042 mean / 0.101 max, cosine >= 0.9949; INT8 fp16-typed 0.026 /
# 0.054, >= 0.9985 (ORT runs the fp16 file's Q/DQ as dequantize + float kernels, the fp32 twin through its own
# integer kernels); FP8 fp32 twin 0.046 / 0.095, >= 0.9955; FP8 fp16-typed 0.045 / 0.093, >= 0.9956. FP8's E4M3
# (3 mantissa bits, per-tensor weights) lands where INT8 does here, so the bounds are INT8's.
FP8_REL_L2_MEAN_BOUND = REL_L2_MEAN_BOUND
FP8_COSINE_MIN_BOUND = COSINE_MIN_BOUND


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_typed_qdq_files_run_on_onnxruntime_cpu_and_stay_close_to_fp32(built_typed: dict[str, Any], fmt: str) -> None:
    """Both files of each format run under ONNX Runtime on the CPU (Q/DQ with float8e4m3fn: opset 19) and are
    measured on held-out inputs against the fp32 UNet: the fp32 twin (Q/DQ intact, float remainder) and the fp16
    typed file (Q/DQ in the fp16 UNet, the remainder fp16: what TensorRT builds)."""
    report = built_typed[fmt]["report"]
    assert report.format == fmt and report.typed_onnx == str(built_typed[fmt]["typed"])
    mean_bound, cos_bound = (REL_L2_MEAN_BOUND, COSINE_MIN_BOUND) if fmt == "int8" else (
        FP8_REL_L2_MEAN_BOUND, FP8_COSINE_MIN_BOUND)
    for err in (report.error, report.error_typed):
        assert err is not None and err["finite"] is True and err["samples"] == 2 * EVAL_PROMPTS
        assert 1e-4 < err["relative_l2_mean"] < mean_bound, err
        assert err["cosine_min"] > cos_bound, err
    for path in (built_typed[fmt]["twin"], built_typed[fmt]["typed"]):
        onnx.checker.check_model(str(path))
    assert f"{fmt.upper()} UNet" in report.summary() and "fp16-typed file" in report.summary()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_typed_qdq_file_is_the_fp16_unet_with_the_same_qdq(built_typed: dict[str, Any], built: dict[str, Any],
                                                          fmt: str) -> None:
    """The typed file is strongly typed as TensorRT reads it: fp16 I/O and scales, opset 19, the quantized layers
    those INT8 quantizes (the same placement), FP8 as E4M3 with per-tensor weight scales, INT8 per channel."""
    typed = onnx.load(str(built_typed[fmt]["typed"]))
    twin = onnx.load(str(built_typed[fmt]["twin"]))
    assert {o.version for o in typed.opset_import if o.domain in ("", "ai.onnx")} == {19}
    sample = next(i for i in typed.graph.input if i.name == "sample")
    assert sample.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert typed.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inits = {i.name: i for i in typed.graph.initializer}
    dq = [n for n in typed.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq)
    quant = onnx.TensorProto.FLOAT8E4M3FN if fmt == "fp8" else onnx.TensorProto.INT8
    weights = [inits[n.input[0]] for n in dq if n.input[0] in inits]
    assert weights and all(w.data_type == quant for w in weights)
    scale_sizes = {int(np.prod(inits[n.input[1]].dims)) for n in dq if n.input[0] in inits}
    assert (scale_sizes == {1}) if fmt == "fp8" else (max(scale_sizes) > 1)
    assert int8.quantized_node_names(typed) == int8.quantized_node_names(twin) == int8.quantized_node_names(built["onnx"])
    assert not int8.check_tensorrt_qdq(typed, high_precision=set(built_typed[fmt]["report"].excluded_nodes))


def test_fp8_activation_scales_are_the_int8_ranges_over_448(built_typed: dict[str, Any], built: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One bounded calibration serves both: each FP8 activation scale is the INT8 one x 127 / 448."""
    with capsys.disabled():  # the figures the README quotes
        for fmt in ("int8", "fp8"):
            r = built_typed[fmt]["report"]
            print(f"\n{fmt}: twin {r.error}\n{fmt}: typed {r.error_typed}")
    def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
        inits = {i.name: i for i in model.graph.initializer}
        return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]]))
                for n in model.graph.node if n.op_type == "QuantizeLinear"}

    i8, f8 = activation_scales(built["onnx"]), activation_scales(onnx.load(str(built_typed["fp8"]["twin"])))
    assert i8.keys() == f8.keys() and i8
    assert all(abs(f8[k] - i8[k] * 127 / 448) <= 1e-6 * max(1.0, i8[k]) for k in i8)


# --------------------------------------------------------------------------------------- FP8 attention
@pytest.fixture(scope="module")
def built_fp8_attention(int8_dir: Path, built: dict[str, Any], built_typed: dict[str, Any]) -> dict[str, Any]:
    """``--precision fp8 --fp8-attention``: the same calibration (prompts, samples, seed) also measuring the attention
    MatMuls' inputs, written as FP8 Q/DQ into both files beside the convs' and linears'."""
    twin, typed = int8_dir / "unet.fp8attn.twin.onnx", int8_dir / "unet.fp8attn.typed.onnx"
    report = int8.build_int8_unet(
        built["model"], built["fp32"], twin, num_prompts=CALIB_PROMPTS, steps=STEPS, width=SIZE, height=SIZE,
        num_eval_prompts=EVAL_PROMPTS, max_samples=CALIB_SAMPLES, fmt="fp8", typed=(built_typed["fp16"], typed),
        attention=True)
    return {"twin": twin, "typed": typed, "report": report}


def _attention_count(model: onnx.ModelProto) -> int:
    """Attention modules in the graph: each holds one scaled_dot_product_attention (two activation MatMuls)."""
    return len({n.name.rsplit("/", 1)[0] for n in model.graph.node if n.name.endswith("/Softmax")})


@pytest.mark.parametrize("file", ["twin", "typed"])
def test_fp8_attention_puts_qdq_on_both_inputs_of_each_attention_matmul(built_fp8_attention: dict[str, Any],
                                                                         built_typed: dict[str, Any], file: str) -> None:
    """Two Q/DQ pairs per attention MatMul (Q.K^T and softmax.V, 2 per attention), nothing else moved: the convs and
    linears quantized are exactly those of the FP8 file without the option, and the placement check that accepts
    this file refuses it when attention is not meant to be quantized (and the reverse for the plain FP8 file)."""
    with_attn = onnx.load(str(built_fp8_attention[file]))
    plain = onnx.load(str(built_typed["fp8"][file]))
    attention = int8_qdq.attention_matmuls(with_attn)
    attentions = _attention_count(with_attn)
    assert attentions > 0 and sorted(attention.values()) == ["pv"] * attentions + ["qk"] * attentions
    dq_out = {n.output[0]: n for n in with_attn.graph.node if n.op_type == "DequantizeLinear"}
    q_of = {n.output[0]: n for n in with_attn.graph.node if n.op_type == "QuantizeLinear"}
    inits = {i.name: i for i in with_attn.graph.initializer}
    for n in with_attn.graph.node:
        if n.name in attention:
            for i in n.input:  # each input: its own activation pair, FP8 E4M3, one scale
                dq = dq_out[i]
                assert dq.input[0] in q_of and inits[dq.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
                assert int(np.prod(inits[dq.input[1]].dims)) == 1
    def count(model: onnx.ModelProto, op: str) -> int:
        return sum(n.op_type == op for n in model.graph.node)
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert count(with_attn, op) - count(plain, op) == 2 * len(attention) == 4 * attentions
    assert int8.quantized_node_names(with_attn) == int8.quantized_node_names(plain) | set(attention)
    assert not int8.quantized_node_names(plain) & set(attention)
    excluded = set(built_fp8_attention["report"].excluded_nodes)
    assert not int8.check_tensorrt_qdq(with_attn, high_precision=excluded, attention=True)
    assert not int8.check_tensorrt_qdq(plain, high_precision=excluded, attention=False)
    refused = int8.check_tensorrt_qdq(with_attn, high_precision=excluded, attention=False)
    assert len(refused) == len(attention) and "attention is not quantized" in refused[0]
    missing = int8.check_tensorrt_qdq(plain, high_precision=excluded, attention=True)
    assert len(missing) == 2 * len(attention) and "has no Q/DQ" in missing[0]
    report = built_fp8_attention["report"]
    assert report.attention_matmuls == len(attention) and report.settings["attention_matmuls_not_quantized"] == 0


# Measured on tiny with the fixtures above (same 8 calibration samples, same 4 held-out inputs), ONNX Runtime CPU,
# noise_pred against the fp32 UNet: FP8 + attention fp32 twin rel. L2 0.0456 mean / 0.0939 max, cosine >= 0.9956;
# fp16-typed 0.0453 / 0.0929, >= 0.9957; FP8 without attention 0.046 / 0.095, >= 0.9955 (tiny's 34 attentions
# have head_dim 32 and short sequences: E4M3 on Q, K, softmax and V adds little to the convs' and linears' error).
def test_fp8_attention_runs_on_onnxruntime_cpu_and_stays_close_to_fp32(built_fp8_attention: dict[str, Any],
                                                                       built_typed: dict[str, Any],
                                                                       built: dict[str, Any],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Both files run under ONNX Runtime on the CPU with the attention Q/DQ (float8e4m3fn, opset 19), measured on
    the held-out inputs against fp32; the attention pairs change the output (they are not optimised away)."""
    import onnxruntime as ort

    report = built_fp8_attention["report"]
    with capsys.disabled():  # the figures the README quotes
        print(f"\nfp8+attention: twin {report.error}\nfp8+attention: typed {report.error_typed}")
    for err in (report.error, report.error_typed):
        assert err is not None and err["finite"] is True and err["samples"] == 2 * EVAL_PROMPTS
        assert 1e-4 < err["relative_l2_mean"] < FP8_REL_L2_MEAN_BOUND, err
        assert err["cosine_min"] > FP8_COSINE_MIN_BOUND, err
    assert "attention MatMuls" in report.summary() and report.to_json()["attention_matmuls"] > 0
    dims = {"B": 2, "S": 77, "h": SIZE // 8, "w": SIZE // 8}
    feed = {k: v.numpy() for k, v in sample_inputs(built["spec"], dims, torch.float32).items()}
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for p in (built_fp8_attention["twin"], built_typed["fp8"]["twin"])]
    assert np.all(np.isfinite(outs[0])) and np.abs(outs[0] - outs[1]).max() > 1e-4


def test_fp8_attention_ranges_are_the_onnx_tensors_max_abs(built_fp8_attention: dict[str, Any],
                                                            built: dict[str, Any]) -> None:
    """The ranges the hooks measured inside scaled_dot_product_attention are those of the exported graph's tensors
    (Q and K after the sqrt(scale) Muls, the softmax, V): ONNX Runtime runs the fp32 UNet on the very UNet calls the
    calibration picked (same prompts, seed and sample cap) with those tensors as outputs; scale x 448 = max|x|."""
    import onnxruntime as ort

    prompts = int8.read_prompts()[:CALIB_PROMPTS]
    calib = int8.collect_calibration_inputs(built["model"], prompts, steps=STEPS, width=SIZE, height=SIZE,
                                            max_samples=CALIB_SAMPLES)
    graph = onnx.load(str(built["fp32"]))
    attention = int8_qdq.attention_matmuls(graph)
    tensors = sorted({i for n in graph.graph.node if n.name in attention for i in n.input})
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(tensors, 0.0)
    for sample in calib:
        for t, v in zip(tensors, sess.run(tensors, sample), strict=True):
            amax[t] = max(amax[t], float(np.abs(v).max()))
    twin = onnx.load(str(built_fp8_attention["twin"]))
    inits = {i.name: i for i in twin.graph.initializer}
    scales = {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in twin.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in amax}
    assert scales.keys() == amax.keys()
    for t in tensors:
        assert scales[t] * 448 == pytest.approx(amax[t], rel=2e-4), t
    softmax = [amax[n.input[0]] for n in graph.graph.node if attention.get(n.name) == "pv"]
    assert all(0 < p <= 1 + 1e-6 for p in softmax)


def test_fp8_attention_is_an_fp8_option_refused_before_anything_is_written(tmp_path: Path) -> None:
    """--fp8-attention with another precision is refused naming the fix; with fp8 it reaches the rebuild command
    and the engine's freshness key (so turning it on or off rebuilds the UNet)."""
    from sdxl_trt.cli import build_parser
    from sdxl_trt.engine import build as engine_build
    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.engine.onnx_source import OnnxExport
    from sdxl_trt.export.result import ExportedComponent, ExportResult

    out = tmp_path / "engines"
    with pytest.raises(BuildError, match=r"--fp8-attention .* needs --precision fp8, not 'int8'"):
        build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="int8", fp8_attention=True))
    assert not out.exists()
    with pytest.raises(BuildError, match="an FP8 option .* got format 'int8'"):
        int8.build_int8_unet(lambda: None, tmp_path / "x.onnx", tmp_path / "y.onnx", num_prompts=1,  # type: ignore
                             steps=1, width=SIZE, height=SIZE, fmt="int8", attention=True)
    args = build_parser().parse_args(["build", "--out", str(out), "--precision", "fp8", "--fp8-attention"])
    assert args.fp8_attention is True
    opts = BuildOptions(model="tiny", precision="fp8", fp8_attention=True)
    assert "--precision fp8 --fp8-attention" in engine_build._default_build_command(opts, out, "tensorrt")
    export = ExportResult(model={}, model_dims=ModelDims(), pipeline={}, precision="fp16", components={
        "unet": ExportedComponent(file="unet.onnx", sha256="abc", size_bytes=1, precision="fp16", settings="",
                                  relative_error={})})
    keys = {attn: OnnxExport(BuildOptions(fp8_attention=attn), tmp_path, export).source_hash("unet", "fp8")
            for attn in (False, True)}
    assert keys[False] == "abc" and keys[True] != keys[False]
