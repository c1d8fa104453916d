"""``sdxl-trt build --lora``: LoRAs fused before export give the images of diffusers' pipeline with the same
LoRAs fused into the same weights; the manifest and ``info`` record them; the weight map points at the
engines' real weights.

The reference modules are fused independently of sdxl_trt.lora: each weight gets ``scale * delta`` from the
ground truth tests/support/lora_files.py returns with the files it writes. Image tolerance as in
tests/test_pipeline.py (2 levels, mean 0.05): a LoRA missing from one text encoder or scaled wrongly moves
pixels by far more (checked: the LoRA image is far from the base image).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from support import lora_files as lf
from support.lora_references import diffusers_pipe
from test_pipeline import assert_close, run_diffusers_txt2img, to_uint8

from sdxl_trt.cli import main
from sdxl_trt.engine_dir.layout import WEIGHT_MAP_NAME
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.lora import lora_weight_shapes
from sdxl_trt.lora.weight_map import WeightMap
from sdxl_trt.request import GenerationRequest

SCALES = (0.8, -0.6)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_models):
    base = tiny_models[0]
    shapes = lora_weight_shapes({"unet": base.unet, "text_encoder": base.text_encoder,
                                 "text_encoder_2": base.text_encoder_2})
    d = tmp_path_factory.mktemp("loras")
    t1 = lf.write_diffusers_lora(d / "style.safetensors", shapes, rank=4, std=0.08, seed=5)
    t2 = lf.write_kohya_lora(d / "detail.safetensors", shapes, rank=4, alpha=2.0, std=0.08, seed=6)
    return [(d / "style.safetensors", t1), (d / "detail.safetensors", t2)]


@pytest.fixture(scope="module")
def lora_engines(tmp_path_factory, lora_files) -> Path:
    out = tmp_path_factory.mktemp("lora-engines") / "tiny"
    args = ["-q", "build", "--model", "tiny", "--out", str(out), "--backend", "onnxruntime", "--precision", "fp32",
            "--buckets", "256x256"]
    for (path, _), scale in zip(lora_files, SCALES, strict=True):
        args += ["--lora", f"{path}:{scale}"]
    assert main(args) == 0
    return out


def _fused_reference(base, lora_files):
    """Deep copies of the tiny modules with the ground-truth deltas added."""
    modules = {"unet": copy.deepcopy(base.unet), "text_encoder": copy.deepcopy(base.text_encoder),
               "text_encoder_2": copy.deepcopy(base.text_encoder_2)}
    with torch.no_grad():
        for (_, truth), scale in zip(lora_files, SCALES, strict=True):
            for comp, layers in truth.items():
                params = dict(modules[comp].named_parameters())
                for name, delta in layers.items():
                    params[name].add_((scale * delta).float())
    return modules


def _diffusers_pipe(base, modules):
    return diffusers_pipe(base, modules)


def test_build_with_loras_matches_diffusers_with_loras_fused(lora_engines, lora_files, tiny_models):
    from sdxl_trt.runtime.pipeline import Pipeline

    base = tiny_models[0]
    req = GenerationRequest(prompt="a watercolor harbour at dawn", negative_prompt="blurry", width=256, height=256,
                            steps=5, guidance_scale=6.0, seed=21)
    ours = Pipeline.load(lora_engines, device="cpu").generate(req).images
    kw = dict(prompt=req.prompt, negative=req.negative_prompt, width=256, height=256, steps=5, guidance=6.0, seed=21,
              n=1)
    theirs = run_diffusers_txt2img(_diffusers_pipe(base, _fused_reference(base, lora_files)), "euler", **kw)
    assert_close(ours, theirs)
    plain = run_diffusers_txt2img(_diffusers_pipe(base, {"unet": base.unet, "text_encoder": base.text_encoder,
                                                         "text_encoder_2": base.text_encoder_2}), "euler", **kw)
    assert np.abs(to_uint8(ours) - to_uint8(plain)).mean() > 5  # the LoRAs did change the image


def test_manifest_and_info_record_the_loras(lora_engines, lora_files, capsys):
    m = Manifest.load(lora_engines)
    loras = m.model["loras"]
    assert [lo["scale"] for lo in loras] == list(SCALES)
    assert [lo["format"] for lo in loras] == ["diffusers", "kohya"]
    import hashlib

    assert [lo["sha256"] for lo in loras] == [hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in lora_files]
    assert loras[0]["layers"] == {"unet": 263, "text_encoder": 18, "text_encoder_2": 19}
    # The model's own identity is kept (the load check compares it with the model files); staleness uses the fused one.
    assert m.model["fused_identity"] != m.model["identity_hash"]
    capsys.readouterr()
    assert main(["info", str(lora_engines)]) == 0
    out = capsys.readouterr().out
    for (path, _), scale in zip(lora_files, SCALES, strict=True):
        assert f"LoRA:       {path.resolve()} (scale {scale:g}, sha256 " in out


def test_weight_map_points_at_the_engines_weights(lora_engines, lora_files, tiny_models):
    """Every mapped ONNX initializer of the built engines holds the fused PyTorch weight (transposed where the
    map says so); unmapped ones are only those no output depends on."""
    base = tiny_models[0]
    fused = _fused_reference(base, lora_files)
    wm = WeightMap.load(lora_engines / WEIGHT_MAP_NAME)
    manifest = Manifest.load(lora_engines)
    assert set(wm.components) == {"unet", "text_encoder", "text_encoder_2"}
    for comp, cw in wm.components.items():
        assert cw.onnx_sha256 == manifest.components[comp].sha256  # the map describes this very engine file
        graph = onnx.load(str(lora_engines / manifest.components[comp].file)).graph
        inits = {i.name: i for i in graph.initializer}
        params = dict(fused[comp].named_parameters())
        assert set(cw.weights) == set(lora_weight_shapes({comp: fused[comp]})[comp])
        for name, loc in cw.weights.items():
            if loc.onnx is None:
                assert loc.unused, f"{comp}.{name} has no initializer and is not unused"
                continue
            arr = numpy_helper.to_array(inits[loc.onnx])
            want = params[name].detach().numpy()
            np.testing.assert_allclose(arr.T if loc.onnx_transposed else arr, want, rtol=0, atol=1e-6,
                                       err_msg=f"{comp}.{name} -> {loc.onnx}")
        assert sum(w.onnx_transposed for w in cw.weights.values()) > 0  # MatMul weights are stored [in, out]
    # text_encoder: SDXL reads the penultimate layer, so the last layer's weights are pruned and marked unused.
    unused = sorted(n for n, w in wm.components["text_encoder"].weights.items() if w.unused)
    assert unused and all(n.startswith("encoder.layers.2.") for n in unused)


def test_weight_map_torch_names_are_the_exported_programs_parameters(tiny_models, tmp_path):
    """torch engines: each ``torch`` name is a parameter of the torch.export program of the wrapper."""
    from sdxl_trt.export.weight_map import torch_weight_map
    from sdxl_trt.export.wrappers import wrap_components

    base = tiny_models[0]
    wrapper = wrap_components(base)["text_encoder_2"]
    program = torch.export.export(wrapper, (torch.zeros(1, 77, dtype=torch.int64),))
    cw = torch_weight_map(base.text_encoder_2, wrapper)
    assert len(cw.weights) == 19
    for name, loc in cw.weights.items():
        torch.testing.assert_close(program.state_dict[loc.torch], dict(base.text_encoder_2.named_parameters())[name])


def test_changing_loras_re_exports_and_none_restores(tmp_path, lora_files):
    """Another scale is another model (re-exported); the same again is up to date; no LoRA is the base model."""
    from sdxl_trt.export.exporter import export_model
    from sdxl_trt.lora import LoraSpec

    path = lora_files[1][0]
    out = tmp_path / "onnx"

    def export(loras):
        m = export_model("tiny", out=out, components=["text_encoder"], loras=loras)
        return m.components["text_encoder"].settings, m.components["text_encoder"].sha256

    plain = export([])
    a = export([LoraSpec(path, 1.0)])
    b = export([LoraSpec(path, 0.5)])
    assert len({plain[0], a[0], b[0]}) == 3 and len({plain[1], a[1], b[1]}) == 3
    mtime = (out / "text_encoder.onnx").stat().st_mtime_ns
    assert export([LoraSpec(path, 0.5)]) == b and (out / "text_encoder.onnx").stat().st_mtime_ns == mtime
    assert export([])[0] == plain[0]
    meta = json.loads((out / "manifest.json").read_text())
    assert "loras" not in meta["model"]


def test_bad_loras_stop_the_build_with_one_line(tmp_path, capsys):
    """A missing file or bad scale stops before anything is written; an SD 1.5 LoRA before any ONNX or engine."""
    out = tmp_path / "engines"
    assert main(["build", "--model", "tiny", "--out", str(out), "--backend", "onnxruntime", "--precision", "fp32",
                 "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err and not out.exists()
    lf.write_sd15_kohya_lora(tmp_path / "sd15.safetensors")
    assert main(["build", "--model", "tiny", "--out", str(out), "--backend", "onnxruntime", "--precision", "fp32",
                 "--lora", f"{tmp_path / 'sd15.safetensors'}:nan"]) == 2
    assert "scale nan is not a number" in capsys.readouterr().err and not out.exists()
    assert main(["build", "--model", "tiny", "--out", str(out), "--backend", "onnxruntime", "--precision", "fp32",
                 "--lora", str(tmp_path / "sd15.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "sd15.safetensors has one text encoder" in err and "Stable Diffusion 1.x/2.x" in err
    assert not list(out.rglob("*.onnx")) and not (out / "manifest.json").exists()


def test_the_builds_own_loader_fuses_for_torch_programs_and_int8_calibration(lora_files, tiny_models):
    """``engine.models.load_base`` (what the torch backend exports and INT8 calibration runs) holds the LoRAs."""
    from sdxl_trt.engine.models import load_base
    from sdxl_trt.engine.options import BuildOptions

    base = tiny_models[0]
    opts = BuildOptions(model="tiny", loras=tuple(f"{p}:{s}" for (p, _), s in zip(lora_files, SCALES, strict=True)))
    loaded = load_base(opts)
    want = _fused_reference(base, lora_files)
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        got = dict(getattr(loaded, comp).named_parameters())
        for name, p in want[comp].named_parameters():
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=f"{comp}.{name}")


def test_an_export_from_before_weight_maps_gets_one_without_exporting_again(tmp_path):
    from sdxl_trt.export.exporter import export_model

    out = tmp_path / "onnx"
    export_model("tiny", out=out, components=["text_encoder_2"])
    first = WeightMap.load(out / WEIGHT_MAP_NAME).components["text_encoder_2"]
    (out / WEIGHT_MAP_NAME).unlink()
    mtime = (out / "text_encoder_2.onnx").stat().st_mtime_ns
    export_model("tiny", out=out, components=["text_encoder_2"])
    assert (out / "text_encoder_2.onnx").stat().st_mtime_ns == mtime  # not exported again
    again = WeightMap.load(out / WEIGHT_MAP_NAME).components["text_encoder_2"]
    assert again.weights == first.weights and again.onnx_sha256 == first.onnx_sha256
