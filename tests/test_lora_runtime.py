"""LoRAs per request at run time: the engines' weights change in place between batches, never the engines.

Against diffusers: a pipeline over engines built *without* LoRAs, asked for two stacked LoRAs at run time,
gives the images of diffusers' pipeline with the same LoRAs fused into the same weights (the reference
fusion is the ground truth tests/support/lora_files.py writes, independent of sdxl_trt.lora; tolerance as
tests/test_pipeline.py: 2 levels, mean 0.05). Switching base -> A -> B -> A -> base through one pipeline
gives the images of fresh loads bit for bit, and a torch engine's weights keep their addresses.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import lora_files as lf
from test_lora_build import (
    _diffusers_pipe,
    _fused_reference,
    lora_files,  # noqa: F401 - the module fixture lora_dir reads
)
from test_pipeline import assert_close, run_diffusers_txt2img

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest

SCALES = (0.8, -0.6)
PROMPT = dict(prompt="a watercolor of a harbour", width=256, height=256, steps=4, guidance_scale=5.0, seed=3)


@pytest.fixture(scope="module")
def lora_dir(request):
    """test_lora_build's two LoRAs (diffusers format; kohya with alpha 2 of rank 4), in one directory."""
    (style, style_truth), (detail, detail_truth) = request.getfixturevalue("lora_files")
    assert style.parent == detail.parent
    return style.parent, {"style": style_truth, "detail": detail_truth}


@pytest.fixture(scope="module")
def torch_engines(tiny_torch_parsed: Path) -> Path:
    """torch programs of tiny, 256x256 among their buckets (shared: runtime LoRAs change the loaded weights, never
    the files); their parsed programs are held for the session (conftest's ``tiny_torch_parsed``), so each test's
    loads are fresh loads that skip the parse."""
    return tiny_torch_parsed


def _engines(backend: str, tiny_engines: Path, request: pytest.FixtureRequest) -> Path:
    """The engine directory of ``backend`` (torch's only loaded when a test runs on it)."""
    return request.getfixturevalue("torch_engines") if backend == "torch" else tiny_engines


def _pixels(result) -> bytes:
    return b"".join(np.asarray(im).tobytes() for im in result.images)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_stacked_runtime_loras_match_diffusers_with_them_fused(backend, tiny_engines, request, lora_dir,
                                                                 tiny_models):
    from sdxl_trt.runtime.pipeline import Pipeline

    d, truth = lora_dir
    engines = _engines(backend, tiny_engines, request)
    pipe = Pipeline.load(engines, device="cpu", lora_dirs=[d])
    result = pipe.generate(GenerationRequest(**PROMPT, loras=(("style", SCALES[0]), ("detail", SCALES[1]))))
    base = tiny_models[0]
    files = [(d / "style.safetensors", truth["style"]), (d / "detail.safetensors", truth["detail"])]
    kw = dict(prompt=PROMPT["prompt"], negative="", width=256, height=256, steps=4, guidance=5.0, seed=3, n=1)
    theirs = run_diffusers_txt2img(_diffusers_pipe(base, _fused_reference(base, files)), "euler", **kw)
    assert_close(result.images, theirs)
    plain = run_diffusers_txt2img(_diffusers_pipe(base, {"unet": base.unet, "text_encoder": base.text_encoder,
                                                         "text_encoder_2": base.text_encoder_2}), "euler", **kw)
    ours = np.stack([np.asarray(i) for i in result.images]).astype(int)
    assert np.abs(ours - (np.asarray(plain) * 255).round().astype(int)).max() > 10  # the LoRAs do change it
    assert result.parameters["loras"] == [["style", 0.8], ["detail", -0.6]]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_switching_back_and_forth_equals_fresh_loads(backend, tiny_engines, request, lora_dir):
    from sdxl_trt.runtime.pipeline import Pipeline

    d, _ = lora_dir
    engines = _engines(backend, tiny_engines, request)
    sets = {"base": (), "A": (("style", 0.8),), "B": (("detail", -0.6), ("style", 0.3))}
    pipe = Pipeline.load(engines, device="cpu", lora_dirs=[d])
    addresses = None
    if backend == "torch":
        addresses = {c: {n: t.data_ptr() for n, t in e.weights().items()} for c, e in pipe.engines.items()}
    # The switching pipeline's first image (base, before any LoRA was applied) is a fresh load's base image;
    # A and B each get their own fresh load.
    fresh = {"base": _pixels(pipe.generate(GenerationRequest(**PROMPT)))}
    for name in ("A", "B"):
        fresh[name] = _pixels(Pipeline.load(engines, device="cpu", lora_dirs=[d]).generate(
            GenerationRequest(**PROMPT, loras=sets[name])))
    assert len(set(fresh.values())) == 3
    for name in ("A", "B", "A", "base", "B"):
        assert _pixels(pipe.generate(GenerationRequest(**PROMPT, loras=sets[name]))) == fresh[name], name
    if addresses is not None:  # weights updated in place: CUDA graphs and compiled code stay valid
        assert {c: {n: t.data_ptr() for n, t in e.weights().items()} for c, e in pipe.engines.items()} == addresses


def test_a_batch_mixing_lora_sets_gives_each_request_its_own_image(tiny_engines, lora_dir):
    from sdxl_trt.runtime.pipeline import Pipeline

    d, _ = lora_dir
    pipe = Pipeline.load(tiny_engines, device="cpu", lora_dirs=[d])
    reqs = [GenerationRequest(**PROMPT, loras=(("style", 0.8),)), GenerationRequest(**PROMPT),
            GenerationRequest(**PROMPT, loras=(("style", 0.8),))]
    together = pipe.generate_batch(reqs)
    alone = [pipe.generate(r) for r in reqs]
    assert [_pixels(r) for r in together] == [_pixels(r) for r in alone]
    assert _pixels(together[0]) != _pixels(together[1])


def test_bad_loras_are_refused_and_the_next_request_is_fine(tiny_engines, lora_dir, tmp_path):
    from sdxl_trt.runtime.pipeline import Pipeline

    d, _ = lora_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    lf.write_sd15_kohya_lora(bad / "sd15.safetensors")
    lf.write_refused_kind(bad / "oft.safetensors", "OFT")
    lf.truncate(d / "style.safetensors", bad / "cut.safetensors")
    pipe = Pipeline.load(tiny_engines, device="cpu", lora_dirs=[d, bad])
    good = GenerationRequest(**PROMPT, loras=(("style", 0.5),))
    expected = _pixels(pipe.generate(good))
    cases = [
        ((("nope", 1.0),), "unknown LoRA 'nope'; available: .*style"),
        ((("style", math.nan),), "scale"),
        ((("style", 11.0),), "scale"),
        ((("sd15", 1.0),), "sd15.safetensors"),
        ((("oft", 1.0),), "oft.safetensors is OFT"),
        ((("cut", 1.0),), "cut.safetensors"),
    ]
    for loras, match in cases:
        with pytest.raises(InvalidRequestError, match=match):
            pipe.check(GenerationRequest(**PROMPT, loras=loras))
        with pytest.raises(InvalidRequestError):
            pipe.generate(GenerationRequest(**PROMPT, loras=loras))
        assert _pixels(pipe.generate(good)) == expected  # nothing was applied in part


def test_an_int8_unet_refuses_a_runtime_lora(tiny_engines, lora_dir, tmp_path):
    """INT8 engines were calibrated for their weights: LoRAs are fused at build for them, never at run time."""
    from sdxl_trt.runtime.pipeline import Pipeline

    d, _ = lora_dir
    engines = tmp_path / "int8-like"
    shutil.copytree(tiny_engines, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["components"]["unet"]["precision"] = "int8"  # what an INT8 build records for its UNet
    (engines / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(engines, device="cpu", lora_dirs=[d], verify_hashes=False)
    with pytest.raises(InvalidRequestError, match="INT8.*--lora"):
        pipe.check(GenerationRequest(**PROMPT, loras=(("style", 1.0),)))
    assert pipe.generate(GenerationRequest(**PROMPT)).images


def test_sdxl_trt_run_takes_loras(tiny_engines, lora_dir, tmp_path):
    from PIL import Image

    from sdxl_trt.cli import main
    from sdxl_trt.runtime.pipeline import Pipeline

    d, _ = lora_dir
    out = tmp_path / "lora.png"
    args = ["-q", "run", "--engines", str(tiny_engines), "--prompt", PROMPT["prompt"], "--width", "256", "--height",
            "256", "--steps", "4", "--guidance", "5", "--seed", "3", "--out", str(out),
            "--lora", f"{d / 'style.safetensors'}:0.8"]
    assert main(args) == 0
    direct = Pipeline.load(tiny_engines, device="cpu", lora_dirs=[d]).generate(
        GenerationRequest(**PROMPT, loras=(("style", 0.8),)))
    assert np.asarray(Image.open(out).convert("RGB")).tobytes() == _pixels(direct)


@pytest.fixture(scope="module")
def kind_dir(tmp_path_factory, tiny_models) -> Path:
    """A LoHa (CP cores on the 3x3 convolutions) and a kohya DoRA over the tiny model's kohya layers."""
    from sdxl_trt.lora import lora_weight_shapes

    base = tiny_models[0]
    modules = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    shapes = lora_weight_shapes(modules)
    weights = {c: {n: p.detach() for n, p in m.named_parameters()} for c, m in modules.items()}
    d = tmp_path_factory.mktemp("kind-loras")
    lf.write_loha_lora(d / "loha.safetensors", shapes, std=0.3)
    lf.write_kohya_dora(d / "dora.safetensors", shapes, weights, std=0.1)
    return d


class RefitEmulation:
    """TensorRT refit's contract over an ONNX Runtime engine: ``set_weights(values)`` replaces the named
    weights and every other keeps its current value (so the switcher must restore what the old set changed).
    It runs from the start on a session holding every LoRA-able weight as an override, so that images before
    and after switches come from sessions built alike."""

    backend = "tensorrt"

    def __init__(self, inner, weights: dict[str, np.ndarray]) -> None:
        self._inner = inner
        self.weights = dict(weights)
        self.refits = 0
        inner.set_weights(("refit", 0), dict(self.weights))

    def set_weights(self, values, *, rebuild: str) -> None:
        assert "--refittable" in rebuild
        self.weights.update({k: np.array(v, copy=True) for k, v in values.items()})
        self.refits += 1
        self._inner.set_weights(("refit", self.refits), dict(self.weights))

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _refit_emulated(pipe):
    import onnx
    from onnx import numpy_helper

    from sdxl_trt.lora.weight_map import WeightMap

    wm = WeightMap.load(pipe.directory / "weight_map.json")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        cw, engine = wm.components[component], pipe.engines[component]
        wanted = {w.onnx for w in cw.weights.values() if w.onnx}
        initial = {i.name: numpy_helper.to_array(i).copy() for i in onnx.load(str(engine.path)).graph.initializer
                   if i.name in wanted}
        pipe.engines[component] = RefitEmulation(engine, initial)
    return pipe


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "tensorrt-refit"])
def test_switching_base_loha_dora_loha_base_is_exact_at_each_return(backend, tiny_engines, request, kind_dir):
    """One pipeline through base -> LoHa -> DoRA -> LoHa -> base: each return gives the image of its first
    visit bit for bit, and DoRA (which renormalises the weight it is merged into) the image of a fresh load's
    DoRA. TensorRT refit is emulated over ONNX Runtime (``RefitEmulation``): what is checked is what the
    switcher hands refit."""
    from sdxl_trt.runtime.pipeline import Pipeline

    engines = _engines(backend, tiny_engines, request)
    sets = {"base": (), "LoHa": (("loha", 1.0),), "DoRA": (("dora", 0.7),)}

    def load():
        pipe = Pipeline.load(engines, device="cpu", lora_dirs=[kind_dir])
        return _refit_emulated(pipe) if backend == "tensorrt-refit" else pipe

    pipe = load()
    seen: dict[str, bytes] = {}
    for name in ("base", "LoHa", "DoRA", "LoHa", "base"):
        pixels = _pixels(pipe.generate(GenerationRequest(**PROMPT, loras=sets[name])))
        assert seen.setdefault(name, pixels) == pixels, f"{backend}: {name} again differs"
    assert len(set(seen.values())) == 3
    if backend == "tensorrt-refit":
        assert [e.refits for e in pipe.engines.values() if isinstance(e, RefitEmulation)] == [4, 4, 4]
    # DoRA came after LoHa: merged onto LoHa's weights instead of the kept base, it would differ from this
    fresh = load().generate(GenerationRequest(**PROMPT, loras=sets["DoRA"]))
    assert _pixels(fresh) == seen["DoRA"], f"{backend}: DoRA after LoHa differs from DoRA on a fresh load"
