"""ONNX export of every tiny component: checker, dynamic axes, parity with PyTorch through ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdxl_trt.contracts import component_specs
from sdxl_trt.export.loading import model_dims
from sdxl_trt.export.onnx_export import check_onnx, export_onnx, sample_inputs
from sdxl_trt.export.wrappers import wrap_components

# fp32 ONNX Runtime vs PyTorch: the bound. Measured ~1e-6 (see the export table).
REL_ERROR = 1e-4
SHAPES = [{"B": 1, "S": 77, "h": 32, "w": 32}, {"B": 3, "S": 154, "h": 24, "w": 48}]


@pytest.fixture(scope="module")
def exported(tiny_models, tiny_engines: Path):
    """The tiny components' ONNX files as a build exports them (export_model -> export_onnx, fp32): the shared
    ``tiny`` build's export stage (``onnx/``, base + refiner), read only, and the PyTorch modules they came from."""
    base, refiner = tiny_models
    specs = component_specs(model_dims(base, refiner))
    modules = wrap_components(base, refiner)
    stage = json.loads((tiny_engines / "onnx" / "manifest.json").read_text())
    assert stage["precision"] == "fp32" and set(stage["components"]) == set(modules)
    paths = {n: tiny_engines / "onnx" / e["file"] for n, e in stage["components"].items()}
    return specs, modules, paths


def run_both(spec, module, path, dims, seed=3):
    inputs = sample_inputs(spec, dims, torch.float32, seed=seed)
    with torch.inference_mode():
        expected = module(*(inputs[n] for n in spec.input_names))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    return [e.numpy() for e in expected], got


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2", "unet", "refiner", "vae_decoder", "vae_encoder"])
def test_component_exports_checks_and_matches_pytorch_at_two_shapes(exported, name):
    specs, modules, paths = exported
    spec, path = specs[name], paths[name]
    check_onnx(path)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    # Named dimensions stay symbolic in the graph (dynamic axes from the contract).
    for t, value in zip(spec.inputs, model.graph.input, strict=True):
        dims = value.type.tensor_type.shape.dim
        for axis, d in enumerate(t.dims):
            if isinstance(d, int):
                assert dims[axis].dim_value == d
            else:
                assert dims[axis].dim_param == str(d), (t.name, axis)
    for shape in SHAPES:
        expected, got = run_both(spec, modules[name], path, shape)
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape
            rel = np.linalg.norm(g - e) / np.linalg.norm(e)
            assert rel < REL_ERROR, (name, shape, rel)


def test_large_models_use_one_external_data_file(exported, tmp_path: Path):
    """The >2 GB path (full-size UNets), forced with a tiny threshold: graph + one .data file, same outputs."""
    specs, modules, _ = exported
    path = export_onnx(modules["unet"], specs["unet"], tmp_path / "unet.onnx", precision=torch.float32,
                       external_data_threshold=1)
    data = tmp_path / "unet.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    check_onnx(path)
    expected, got = run_both(specs["unet"], modules["unet"], path, SHAPES[1])
    assert np.linalg.norm(got[0] - expected[0]) / np.linalg.norm(expected[0]) < REL_ERROR


def test_cli_export_writes_manifest_and_table_and_skips_unchanged(tmp_path: Path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "sdxl_trt.cli", "export", "--model", "tiny", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "rel. error" in first.stdout and "unet" in first.stdout
    assert "[3/5] unet: exporting" in first.stderr  # progress per component and stage
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    for entry in manifest["components"].values():
        assert max(entry["relative_error"].values()) < REL_ERROR
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "scheduler" / "scheduler_config.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "up to date" in second.stderr


def test_diffusers_dir_of_another_config_exports(tmp_path: Path):
    from test_loading import _save_other_pipeline

    from sdxl_trt.export.exporter import export_model

    saved = _save_other_pipeline(tmp_path / "other", "base")
    result = export_model(str(saved.path), out=tmp_path / "onnx")
    assert result.model["source"]["type"] == "diffusers"
    assert result.model_dims.unet_context != 64  # not the tiny preset's width
    for entry in result.components.values():
        assert max(entry.relative_error.values()) < REL_ERROR


def test_bad_model_paths_fail_with_clear_cli_errors(tmp_path: Path):
    bad = tmp_path / "nothing-here"
    proc = subprocess.run([sys.executable, "-m", "sdxl_trt.cli", "export", "--model", str(bad), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "neither a preset" in proc.stderr and "tiny" in proc.stderr


# fp16 ONNX (exported from the fp16 model) against PyTorch fp32: measured 8e-4 (text encoders), 9e-4 (UNet) on tiny.
FP16_REL_ERROR = 5e-3


def test_fp16_export_loads_in_onnxruntime_and_is_measured_against_fp32(tmp_path: Path) -> None:
    """`sdxl-trt export --precision fp16` used to stop at the text encoder (LayerNormalization bound to float and
    float16). Now every fp16 file loads in ONNX Runtime's CPU provider, its float I/O is fp16, nothing mixes float
    types, and its error against PyTorch fp32 is in the manifest and the table, next to the file's own."""
    from sdxl_trt.export.exporter import export_model, format_export_table
    from sdxl_trt.export.onnx_export import unify_float16

    result = export_model("tiny", out=tmp_path, precision="fp16", components=["text_encoder", "text_encoder_2"])
    for name, entry in result.components.items():
        assert entry.precision == "fp16" and entry.fp32_relative_error is not None
        assert 0 < max(entry.fp32_relative_error.values()) < FP16_REL_ERROR, (name, entry.fp32_relative_error)
        model = onnx.load(str(tmp_path / entry.file))
        assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == {
            o: onnx.TensorProto.FLOAT16 for o in component_specs(result.model_dims)[name].output_names}
        assert unify_float16(model) == 0  # no op left reading float32 and float16 at once
        ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    table = format_export_table(result)
    assert "vs PyTorch fp32" in table.splitlines()[0]
    te = next(line for line in table.splitlines() if line.startswith("text_encoder "))
    assert f"{max(result.components['text_encoder'].fp32_relative_error.values()):.2e}" in te


def test_unify_float16_fixes_a_mixed_layer_norm() -> None:
    """The traced CLIP graph's fault in miniature: LayerNormalization reading a float32 activation with fp16 scale
    and bias. ONNX Runtime refuses it; after unify_float16 it loads and matches numpy's layer norm in fp16."""
    from onnx import TensorProto, helper, numpy_helper

    from sdxl_trt.export.onnx_export import unify_float16

    rng = np.random.default_rng(0)
    scale, bias = rng.normal(size=8).astype(np.float16), rng.normal(size=8).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
         helper.make_node("LayerNormalization", ["x32", "scale", "bias"], ["y"], axis=-1, epsilon=1e-5)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Exception, match="bound to different types"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert unify_float16(model) == 1
    x = rng.normal(size=(2, 8)).astype(np.float16)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * scale + bias
    assert y.dtype == np.float16 and np.abs(y - ref).max() < 1e-2
