"""``sdxl-trt build --controlnet``: ControlNet engines exported and verified like every component, a UNet that
takes their residuals, and ControlNets that do not fit the base refused before anything is written.

References are diffusers' own modules on the same weights (``ControlNetModel`` and ``UNet2DConditionModel``)
run through PyTorch, against the built files run through ONNX Runtime. Tolerance: relative L2 1e-4 in fp32
(the export check measures about 1e-6; a wrong scale column or a dropped residual is off by 1e-1 or more).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import engine_cache
from support.controlnet_files import (
    load_tiny_controlnet,
    write_controlnet_file,
    write_mismatched_dir,
)

from sdxl_trt.contracts import ModelDims, component_specs
from sdxl_trt.engine.build import BuildOptions, build_engines
from sdxl_trt.engine_dir.describe import format_manifest
from sdxl_trt.engine_dir.layout import WEIGHT_MAP_NAME
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.errors import BuildError, ModelLoadError
from sdxl_trt.export.controlnet import (
    ControlNetSpec,
    controlnet_residuals,
    load_controlnet,
    parse_controlnets,
)
from sdxl_trt.export.onnx_export import sample_inputs
from sdxl_trt.presets import CONTROLNET_PRESETS, TINY_UNET

TOL = 1e-4
TINY_RESIDUALS = controlnet_residuals(TINY_UNET)


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def built_dims(engines: Path) -> ModelDims:
    return ModelDims.from_json(Manifest.load(engines).model_dims)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_residual_dims_follow_the_unet_config() -> None:
    # SDXL: conv_in, 2 resnets + downsampler per block but the last, mid: 9 down residuals and the mid one
    assert TINY_RESIDUALS == ((32, 1), (32, 1), (32, 1), (32, 2), (64, 2), (64, 2), (64, 4), (64, 4), (64, 4),
                              (64, 4))
    cn = load_tiny_controlnet("tiny-controlnet")
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        down, mid = cn(x, torch.tensor([10.0]), torch.randn(1, 77, 64), torch.rand(1, 3, 256, 256),
                       added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.rand(1, 6)},
                       return_dict=False)
    assert [(r.shape[1], 32 // r.shape[2]) for r in (*down, mid)] == list(TINY_RESIDUALS)
    assert all(r.abs().mean() > 0.05 for r in (*down, mid)), "preset ControlNets must not keep diffusers' zero convs"


def test_manifest_lists_controlnets(tiny_controlnet_engines: Path, tiny_controlnet_files: dict[str, Path]) -> None:
    m = Manifest.load(tiny_controlnet_engines)
    assert list(m.components)[-2:] == ["controlnet.edges", "controlnet.depth"]
    assert ModelDims.from_json(m.model_dims).controlnet_residuals == TINY_RESIDUALS
    edges, depth = m.components["controlnet.edges"], m.components["controlnet.depth"]
    assert edges.extra["controlnet"]["source"] == {"type": "preset", "name": "tiny-controlnet", "seed": 10}
    assert depth.extra["controlnet"]["source"]["path"] == str(tiny_controlnet_files["depth"].resolve())
    assert depth.extra["controlnet"]["config"]["transformer_layers_per_block"] == [1, 1, 1]
    assert edges.extra["controlnet"]["identity_hash"] != depth.extra["controlnet"]["identity_hash"]
    for e in (edges, depth):
        assert len(e.profiles) == len(m.components["unet"].profiles) == 5  # the UNet's buckets and batch
        assert e.profiles[0]["dims"]["B"] == [1, 2, 4]
        assert 0 < max(e.export_error.values()) < TOL
    assert "--controlnet tiny-controlnet:edges" in m.build_command
    text = format_manifest(m)
    assert "ControlNet: edges from tiny-controlnet" in text and "ControlNet: depth from" in text
    names = [i.name for i in onnx.load(str(tiny_controlnet_engines / "unet.onnx"), load_external_data=False).graph.input]
    assert names[5:] == [*(f"down_block_res_{i}" for i in range(9)), "mid_block_res"]
    weight_map = json.loads((tiny_controlnet_engines / WEIGHT_MAP_NAME).read_text())
    assert "unet" in json.dumps(weight_map)  # LoRA's map covers the residual UNet too


@pytest.mark.parametrize("name,source", [("edges", "tiny-controlnet"), ("depth", None)])
def test_controlnet_engine_matches_diffusers(tiny_controlnet_engines: Path, tiny_controlnet_files: dict[str, Path],
                                             name: str, source: str | None) -> None:
    """Row 0 at one plain scale, row 1 in guess mode: the engine given the scale columns diffusers uses equals
    diffusers' ControlNetModel called with ``conditioning_scale`` / ``guess_mode`` row by row."""
    cn = load_tiny_controlnet(source or tiny_controlnet_files[name])
    spec = component_specs(built_dims(tiny_controlnet_engines), [name])[f"controlnet.{name}"]
    x = sample_inputs(spec, {"B": 2, "S": 77, "h": 40, "w": 32}, torch.float32, seed=7)  # 320x256, non-square
    r = len(TINY_RESIDUALS)
    guess = torch.logspace(-1, 0, r) * 0.8
    x["conditioning_scale"] = torch.stack([torch.full((r,), 0.7), guess]).float()
    got = session(tiny_controlnet_engines / f"controlnet.{name}.onnx").run(
        None, {k: v.numpy() for k, v in x.items()})
    for row, (scale, guess_mode) in enumerate([(0.7, False), (0.8, True)]):
        with torch.no_grad():
            down, mid = cn(x["sample"][row:row + 1], x["timestep"][row:row + 1],
                           x["encoder_hidden_states"][row:row + 1], x["controlnet_cond"][row:row + 1],
                           conditioning_scale=scale, guess_mode=guess_mode,
                           added_cond_kwargs={"text_embeds": x["text_embeds"][row:row + 1],
                                              "time_ids": x["time_ids"][row:row + 1]}, return_dict=False)
        for i, want in enumerate((*down, mid)):
            assert rel(got[i][row:row + 1], want) < TOL, (name, row, i)


def test_residual_unet_matches_diffusers(tiny_controlnet_engines: Path, tiny_models) -> None:
    unet = tiny_models[0].unet
    spec = component_specs(built_dims(tiny_controlnet_engines))["unet"]
    x = sample_inputs(spec, {"B": 2, "S": 77, "h": 32, "w": 32}, torch.float32, seed=8)
    got = session(tiny_controlnet_engines / "unet.onnx").run(None, {k: v.numpy() for k, v in x.items()})[0]
    res = [x[n] for n in spec.input_names[5:]]
    kwargs = {"added_cond_kwargs": {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}, "return_dict": False}
    with torch.no_grad():
        want = unet(x["sample"], x["timestep"], x["encoder_hidden_states"],
                    down_block_additional_residuals=tuple(res[:-1]), mid_block_additional_residual=res[-1],
                    **kwargs)[0]
        plain = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kwargs)[0]
    assert rel(got, want) < TOL
    assert rel(plain, want) > 0.05  # the residuals are really added


@pytest.mark.parametrize("kind,named", [
    ("cross_attention", "cross_attention_dim is 1024, but the base UNet's context width is 64"),
    ("sd15", "addition_embed_type is None"),
])
def test_misfit_controlnet_refused_before_writing(tmp_path: Path, kind: str, named: str) -> None:
    d = write_mismatched_dir(kind, tmp_path / kind)
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match=named):
        build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="fp32",
                                   controlnets=(f"{d}:bad",)))
    assert not out.exists()


def test_int8_with_controlnet_refused(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match="int8 is not supported.*rebuild with --precision fp16"):
        build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="int8",
                                   controlnets=("tiny-controlnet",)))
    assert not out.exists()


def test_parse_names() -> None:
    assert ControlNetSpec.parse("tiny-controlnet") == ControlNetSpec("tiny-controlnet", "tiny-controlnet")
    assert ControlNetSpec.parse("tiny-controlnet:edges") == ControlNetSpec("tiny-controlnet", "edges")
    with pytest.raises(BuildError, match="given twice"):
        parse_controlnets(["tiny-controlnet:a", "tiny-controlnet-small:a"])
    with pytest.raises(BuildError, match="neither a ControlNet preset"):
        ControlNetSpec.parse("/no/such/dir:edges")
    with pytest.raises(BuildError, match="not a valid ControlNet name"):
        ControlNetSpec.parse("tiny-controlnet:bad name")


def test_path_with_colon_and_default_names(tmp_path: Path) -> None:
    f = write_controlnet_file("tiny-controlnet", tmp_path / "a:b", with_config=True)
    assert ControlNetSpec.parse(str(f)) == ControlNetSpec(str(f), "tiny-controlnet")
    assert ControlNetSpec.parse(f"{f}:canny") == ControlNetSpec(str(f), "canny")
    good = tmp_path / "depth-v1"
    good.mkdir()
    assert ControlNetSpec.parse(str(good)) == ControlNetSpec(str(good), "depth-v1")  # a directory's own name
    bad = tmp_path / "dir.with.dots"
    bad.mkdir()
    with pytest.raises(BuildError, match="name it: --controlnet"):
        ControlNetSpec.parse(str(bad))


def test_single_files_load(tmp_path: Path) -> None:
    """With config.json beside it; without, when the file fits ``from_unet`` of the base; else refused, naming
    the fix."""
    want = load_tiny_controlnet("tiny-controlnet").state_dict()
    for with_config in (True, False):
        f = write_controlnet_file("tiny-controlnet", tmp_path / f"cfg-{with_config}", with_config=with_config)
        got = load_controlnet(str(f), base_unet=dict(TINY_UNET)).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    small = write_controlnet_file("tiny-controlnet-small", tmp_path / "small", with_config=False)
    with pytest.raises(ModelLoadError, match="config.json beside it"):
        load_controlnet(str(small), base_unet=dict(TINY_UNET))


def test_rebuild_without_controlnet_drops_it(tiny_controlnet_engines: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    shutil.copytree(tiny_controlnet_engines, out)
    m = build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="fp32", max_batch=2))
    assert "controlnet.edges" not in m.components and not (out / "controlnet.edges.onnx").exists()
    assert ModelDims.from_json(m.model_dims).controlnet_residuals == ()
    names = [i.name for i in onnx.load(str(out / "unet.onnx"), load_external_data=False).graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


@pytest.mark.slow
def test_torch_build_with_controlnet(tiny_torch_engines: Path, tmp_path: Path) -> None:
    """A ControlNet added to a torch build: the residual UNet's program and the ControlNet's (torch.export with the
    residuals' h/4 and h/2 axes as derived Dims), each verified against PyTorch by the build; the text encoders and
    VAEs, unchanged by a ControlNet, are kept as they were (the shared ``tiny-torch`` build, copied, and its recipe
    with the ControlNet added)."""
    out = tmp_path / "t"
    shutil.copytree(tiny_torch_engines, out)
    before = Manifest.load(out)
    m = build_engines(BuildOptions(**engine_cache.RECIPES["tiny-torch"], out=out, controlnets=("tiny-controlnet:edges",)))
    assert {"unet", "controlnet.edges"} <= set(m.components)
    assert max(m.components["controlnet.edges"].export_error.values()) < TOL
    assert max(m.components["unet"].export_error.values()) < TOL
    assert m.components["unet"].source_hash.endswith("+controlnet-residuals:fp32")
    assert m.components["unet"].sha256 != before.components["unet"].sha256
    kept = set(before.components) - {"unet"}
    assert kept == {"text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder"}
    assert all(m.components[c] == before.components[c] for c in kept), kept


def test_presets_exist() -> None:
    assert {"tiny-controlnet", "tiny-controlnet-small", "sdxl-controlnet"} <= set(CONTROLNET_PRESETS)
