"""Component facts in one place (sdxl_trt.contracts), the typed export -> build seam, atomic writes, engine names.

The precision rule is checked as a property over every component, backend and request (not only by examples),
the export result against the manifest file a real export wrote, atomic writes against real files (a failed
write leaves the old one), and the ONNX Runtime builder against ONNX Runtime itself on a file with external data.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_trt.contracts import (
    BASE_COMPONENTS,
    BUILD_PRECISIONS,
    COMPONENT_NAMES,
    CONTRACT_VERSION,
    IO_DTYPES,
    ModelDims,
    build_components,
    component_precision,
    component_specs,
    family_of,
    io_dtype,
    onnx_precision,
)
from sdxl_trt.engine_dir.layout import BACKENDS, engine_file_name, export_onnx_path, onnx_file_name
from sdxl_trt.engine_dir.manifest import Manifest, check_engine_dir
from sdxl_trt.errors import ManifestError
from sdxl_trt.files import atomic_path, write_atomic
from sdxl_trt.presets import PRESETS

ALL = (*COMPONENT_NAMES, "controlnet.edges")


# --------------------------------------------------------------------------- the precision rule
def test_precision_rule_properties_over_every_case() -> None:
    """fp32 stays fp32; a VAE is never fp16 unless fp16-safe, bf16 only on the torch backend with bf16; INT8/FP8
    only for the base UNet (the one calibrated), the rest fp16 files where the ONNX's types are the engine's
    (TensorRT, and the export, which writes what TensorRT parses), fp32 on ONNX Runtime; each result has an I/O
    dtype."""
    seen = set()
    for component, requested, backend, bf16, safe in itertools.product(
            ALL, BUILD_PRECISIONS, (*BACKENDS, None), (False, True), (False, True)):
        got = component_precision(component, requested, backend=backend, bf16_device=bf16, vae_fp16_safe=safe)
        seen.add(got)
        assert got in IO_DTYPES
        family = family_of(component)
        if requested == "fp32":
            assert got == "fp32"
        if family == "vae":
            assert got in ("fp32", "bf16") or (safe and got == "fp16")
            assert got != "bf16" or (backend == "torch" and bf16)
        else:
            assert got != "bf16"
        assert got not in ("int8", "fp8") or (component == "unet" and requested == got)
        if requested in ("int8", "fp8") and component != "unet" and family != "vae":
            assert got == ("fp16" if backend in (None, "tensorrt") else "fp32")
        if backend is None and requested not in ("int8", "fp8"):
            assert got in ("fp32", "fp16")
    assert seen == {"fp32", "fp16", "bf16", "int8", "fp8"}


def test_precision_rule_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        component_precision("vae", "fp16", backend="onnxruntime")
    with pytest.raises(ValueError, match="precision must be one of"):
        component_precision("unet", "fp4", backend="tensorrt")


def test_io_dtypes_and_onnx_precision() -> None:
    assert [io_dtype(p) for p in ("fp32", "fp16", "bf16", "int8", "fp8")] == [
        torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float16]  # Q/DQ in the fp16 UNet
    assert io_dtype("int8", "onnxruntime") == torch.float32  # ONNX Runtime's Q/DQ UNet keeps the fp32 graph
    assert io_dtype("int8", "tensorrt") == torch.float16
    spec = component_specs(ModelDims())["text_encoder_2"]
    assert spec.tensor("input_ids").torch_dtype(torch.float16) == torch.int64
    assert spec.tensor("text_embeds").torch_dtype(torch.float16) == torch.float16
    assert [onnx_precision(p) for p in BUILD_PRECISIONS] == ["fp16", "fp16", "fp16", "fp32"]
    assert [onnx_precision(p, "tensorrt") for p in BUILD_PRECISIONS] == ["fp16", "fp16", "fp16", "fp32"]
    assert onnx_precision("int8", "onnxruntime") == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        io_dtype("fp4")


def test_component_lists_come_from_the_contracts() -> None:
    assert build_components() == list(BASE_COMPONENTS)
    assert build_components(refiner=True, controlnets=["edges"]) == [*BASE_COMPONENTS, "refiner", "controlnet.edges"]
    assert {c: family_of(c) for c in ALL} == {
        "text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "unet", "refiner": "unet",
        "vae_decoder": "vae", "vae_encoder": "vae", "controlnet.edges": "controlnet"}


# --------------------------------------------------------------------------- engine file names
def test_engine_file_names_are_the_layouts(tiny_engines: Path) -> None:
    """The build names every engine as layout.py says (the runtime reads the names from the manifest)."""
    m = Manifest.load(tiny_engines)
    assert {n: e.file for n, e in m.components.items()} == {
        n: engine_file_name(n, m.backend, e.precision) for n in m.components for e in [m.components[n]]}
    assert export_onnx_path(tiny_engines, "unet").is_file()
    assert engine_file_name("unet", "onnxruntime", "int8") == onnx_file_name("unet", "int8") == "unet.int8.onnx"
    assert engine_file_name("unet", "tensorrt", "int8") == "unet.plan"
    with pytest.raises(ValueError, match="unknown backend"):
        engine_file_name("unet", "openvino")


def test_onnxruntime_builder_keeps_an_external_data_files_name(tmp_path: Path) -> None:
    """An INT8 UNet's Q/DQ ONNX keeps its name in the engine directory, so the external data file it names is
    found: ONNX Runtime runs the copy."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sdxl_trt.engine.builder import BuiltEngine
    from sdxl_trt.engine.onnxruntime_backend import OnnxRuntimeBuilder

    src_dir, out = tmp_path / "onnx", tmp_path / "engines"
    src_dir.mkdir()
    out.mkdir()
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(weight, "w")])
    src = src_dir / onnx_file_name("unet", "int8")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src),
                    save_as_external_data=True, location=src.name + ".data", size_threshold=0)

    class Source:
        export = None

        def onnx_for(self, component: str, precision: str) -> tuple[Path, dict]:
            assert (component, precision) == ("unet", "int8")
            return src, {"int8": {"made": "here"}}

    built = OnnxRuntimeBuilder(Source()).build("unet", precision="int8", spec=None, profiles=[], out=out)  # type: ignore[arg-type]
    assert built == BuiltEngine("unet.int8.onnx", {"int8": {"made": "here"}, "external_data": "unet.int8.onnx.data"})
    session = ort.InferenceSession(str(out / built.file), providers=["CPUExecutionProvider"])
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + weight)


# --------------------------------------------------------------------------- the export result
def test_export_result_reads_back_the_file_it_was_saved_as(tiny_engines: Path, tmp_path: Path) -> None:
    from sdxl_trt.export.result import ExportResult, read_export_manifest

    onnx_dir = tiny_engines / "onnx"
    on_disk = json.loads((onnx_dir / "manifest.json").read_text())
    result = read_export_manifest(onnx_dir)
    assert result is not None and result.assets_dir == onnx_dir
    assert json.loads(json.dumps(result.to_json())) == on_disk  # what save() writes is what was read
    assert result.identity("unet") == on_disk["model"]["identity_hash"]  # no LoRA, no ControlNet
    assert result.identity("refiner") == on_disk["refiner"]["identity_hash"]
    assert result.relative_error("unet") == on_disk["components"]["unet"]["relative_error"]
    # an export manifest from before ControlNets and weight maps had no such keys: still read
    old = {k: v for k, v in on_disk.items() if k not in ("controlnets", "weight_map")}
    assert ExportResult.from_json(old).controlnets == {}
    (tmp_path / "manifest.json").write_text("{broken")
    assert read_export_manifest(tmp_path) is None  # corrupt: everything is exported again


def test_the_torch_summary_is_the_same_type_and_identity(tiny_engines: Path) -> None:
    """model_summary (torch backend, configs only) describes the model as the export did."""
    from sdxl_trt.export.result import read_export_manifest
    from sdxl_trt.export.summary import model_summary

    summary = model_summary("tiny", refiner="tiny-refiner")
    export = read_export_manifest(tiny_engines / "onnx")
    assert export is not None and type(summary) is type(export)
    assert summary.components == {} and summary.precision is None
    assert (summary.model, summary.refiner, summary.model_dims, summary.pipeline) == (
        export.model, export.refiner, export.model_dims, export.pipeline)
    assert summary.assets_dir is not None and (summary.assets_dir / "tokenizer").is_dir()
    # in this process's scratch root (removed at exit: test_loading), beside the presets' configs it read
    assert summary.assets_dir.parent == PRESETS["tiny"].config_dir().parent


# --------------------------------------------------------------------------- contract version
def test_engines_of_another_contract_version_are_refused_and_rebuilt(tmp_path: Path, tiny_engines: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import shutil

    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = tmp_path / "e"
    shutil.copytree(tiny_engines, out)
    assert Manifest.load(out).contract_version == CONTRACT_VERSION
    path = out / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "contract_version": CONTRACT_VERSION + 1}))
    other = Manifest.load(out)  # still readable (sdxl-trt info shows it) ...
    with pytest.raises(ManifestError, match=rf"contract version {CONTRACT_VERSION + 1}.*Rebuild: sdxl-trt build"):
        check_engine_dir(out, other)  # ... but not loaded

    def build() -> tuple[Manifest, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdxl_trt.engine.build"):
            m = build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="onnxruntime",
                                           precision="fp32", max_batch=2))
        return m, [r.getMessage() for r in caplog.records if r.name == "sdxl_trt.engine.build"]

    rebuilt, log = build()
    assert rebuilt.contract_version == CONTRACT_VERSION
    assert sum("up to date" in line for line in log) == 0 and sum(": building" in line for line in log) == 6
    check_engine_dir(out, Manifest.load(out))
    _, log = build()  # the same version again: nothing to do
    assert sum("up to date" in line for line in log) == 6


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_files_and_a_failed_write_keeps_the_old(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "manifest.json"
    write_atomic(target, '{"a": 1}')
    write_atomic(target, b'{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # a plain file, readable as any other
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text('{"a": 3')  # half written ...
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 2}  # ... never seen
    with atomic_path(tmp_path / "prog.pt2", suffix=".pt2") as tmp:
        assert tmp.suffix == ".pt2" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["manifest.json", "prog.pt2", "sub"]  # no temp files left
