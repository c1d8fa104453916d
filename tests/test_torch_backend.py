"""The torch backend on the ``tiny`` preset: torch.export engines equal the PyTorch modules, load without
diffusers/transformers, and reject bad shapes with a clear error while staying usable.

Tolerance: fp32 on the CPU runs the same ATen kernels as eager PyTorch, so outputs must agree to
``rtol=1e-5, atol=1e-5`` (in practice they are bitwise equal or within a few ulps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import component_specs
from sdxl_trt.engine.torch_backend import build_torch_engine, cache_artifacts_path
from sdxl_trt.engine.torch_shapes import dim_multiples_for, export_ranges, multiples_from_suggested_fixes
from sdxl_trt.engine_dir.manifest import Manifest
from sdxl_trt.engine_dir.profiles import Profile, component_profiles
from sdxl_trt.errors import BuildError, InvalidRequestError
from sdxl_trt.export.loading import load_model, model_dims
from sdxl_trt.export.onnx_export import sample_inputs
from sdxl_trt.export.wrappers import wrap_components
from sdxl_trt.runtime.engine import Engine
from sdxl_trt.runtime.torch_engine import TorchEngine

BUCKETS = [Bucket(256, 256), Bucket(320, 256)]  # the shared tiny-torch build's (tests/support/engine_cache.py)
MAX_BATCH = 2
COMPONENTS = ("unet", "refiner", "vae_decoder", "vae_encoder", "text_encoder", "text_encoder_2")
RTOL = ATOL = 1e-5
BLOCKED = ("diffusers", "transformers", "sdxl_trt.export")


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    base, refiner = load_model("tiny"), load_model("tiny-refiner")
    dims = model_dims(base, refiner)
    return {"modules": wrap_components(base, refiner), "dims": dims, "specs": component_specs(dims)}


@pytest.fixture(scope="module")
def built(tiny: dict[str, Any], tiny_torch_parsed: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every tiny component's engine: name -> {path, profiles, info}. The base's five are the shared
    ``tiny-torch`` build's (``build_engines`` -> ``build_torch_engine`` with ``dim_multiples_for``, over these
    BUCKETS and MAX_BATCH; its manifest holds each build's info). The refiner is built here the same way (the
    path without ``dim_multiples``, where torch.export's suggested fixes supply them at the price of a second
    trace, has its own test on a small module: test_multiples_missing_from_the_call_come_from_a_second_trace)."""
    manifest = Manifest.load(tiny_torch_parsed)
    out = {}
    for name in COMPONENTS:
        spec = tiny["specs"][name]
        profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
        if name == "refiner":
            path = tmp_path_factory.mktemp("torch-engines") / f"{name}.pt2"
            info = build_torch_engine(tiny["modules"][name], spec, path, profiles=profiles, precision=torch.float32,
                                      device="cpu", dim_multiples=dim_multiples_for(name, tiny["dims"]))
        else:
            entry = manifest.components[name]
            assert [Profile.from_json(p).to_json() for p in entry.profiles] == [p.to_json() for p in profiles], name
            path, info = tiny_torch_parsed / entry.file, entry.extra
        out[name] = {"path": path, "profiles": profiles, "info": info}
    return out


@pytest.fixture(scope="module")
def engines(tiny: dict[str, Any], built: dict[str, dict[str, Any]]) -> dict[str, TorchEngine]:
    return {
        name: TorchEngine.load(b["path"], tiny["specs"][name], b["profiles"], device="cpu") for name, b in built.items()
    }


def _cases(profiles: list[Profile]) -> list[tuple[int, dict[str, int]]]:
    """(profile index, named-dimension values): both buckets, the smallest and largest batch, 1 and 2 prompt chunks."""
    cases = []
    for i, p in enumerate(profiles):
        for k, batch in enumerate((p.dims["B"].min, p.dims["B"].max)):
            values = {n: r.opt for n, r in p.dims.items()}
            values["B"] = batch
            if "S" in values:
                values["S"] = 77 * (k + 1)
            cases.append((i, values))
    return cases


def _run(engine: TorchEngine, inputs: dict[str, torch.Tensor], profile: int) -> dict[str, torch.Tensor]:
    shapes = engine.infer_shapes({n: tuple(x.shape) for n, x in inputs.items()}, profile)
    outputs = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    engine.run(inputs, outputs, profile=profile)
    return outputs


def _expected(module: torch.nn.Module, spec: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = module(*(inputs[n] for n in spec.input_names))
    return dict(zip(spec.output_names, (out,) if isinstance(out, torch.Tensor) else out, strict=True))


@pytest.mark.parametrize("name", COMPONENTS)
def test_engine_matches_pytorch(
    name: str, tiny: dict[str, Any], built: dict[str, dict[str, Any]], engines: dict[str, TorchEngine]
) -> None:
    spec, engine, info = tiny["specs"][name], engines[name], built[name]["info"]
    assert isinstance(engine, Engine) and engine.backend == "torch"
    assert info["graph_nodes"] > 10 and info["bytes"] == built[name]["path"].stat().st_size > 0
    cases = _cases(built[name]["profiles"])
    assert len({tuple(sorted(v.items())) for _, v in cases}) == len(cases) >= 2
    for seed, (profile, values) in enumerate(cases):
        inputs = sample_inputs(spec, values, torch.float32, seed=seed)
        got = _run(engine, inputs, profile)
        want = _expected(tiny["modules"][name], spec, inputs)
        for out_name in spec.output_names:
            assert got[out_name].shape == spec.tensor(out_name).shape(values)
            torch.testing.assert_close(got[out_name], want[out_name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=out_name, v=values: f"{name}.{n} at {v}: {m}")


def test_the_pipeline_on_torch_engines_gives_the_onnxruntime_pipelines_image(
        tiny_torch_parsed: Path, tiny_pipeline: Any) -> None:
    """`--backend torch`: torch.export programs, checked against PyTorch at build time, and the whole pipeline on
    them gives the ONNX Runtime pipeline's image (both fp32 of the same weights: at most 2 levels apart). The
    build is the shared ``tiny-torch`` one (BuildOptions(model="tiny", backend="torch", precision="fp32",
    buckets="256x256,320x256", max_batch=2), made by this checkout's build code: tests/support/engine_cache.py).
    ``tiny_torch_parsed`` holds their parsed programs, so the pipeline's load skips the parse."""
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    m = Manifest.load(tiny_torch_parsed)
    assert {e.file for e in m.components.values()} == {f"{n}.pt2" for n in m.components}
    for name, e in m.components.items():
        assert max(e.export_error.values()) < 1e-5, name
    req = GenerationRequest(prompt="a small red boat", steps=4, seed=9, scheduler="dpmpp_2m")
    ours = np.asarray(Pipeline.load(tiny_torch_parsed).generate(req).images[0]).astype(int)
    ort = np.asarray(tiny_pipeline.generate(req).images[0]).astype(int)
    assert np.abs(ours - ort).max() <= 2


def test_unet_exports_latent_sides_as_multiples(tiny: dict[str, Any], built: dict[str, dict[str, Any]]) -> None:
    """w spans 32..40 as 4*k (the UNet downsamples twice); h is one value in both buckets, exported over
    one extra step because torch.export needs min < max."""
    tiny_dims = tiny["dims"]
    dims = built["unet"]["info"]["dynamic_dims"]
    assert dims == {"B": "1..4", "h": "32 (exported 32..36), multiple of 4", "w": "32..40, multiple of 4", "S": "77..231"}
    assert built["refiner"]["info"]["dynamic_dims"]["w"] == "32..40, multiple of 8"
    assert dim_multiples_for("refiner", tiny_dims) == {"h": 8, "w": 8}  # three downsamplings: 2**3
    assert built["vae_encoder"]["info"]["dynamic_dims"] == {"B": "1..2", "h": "32 (exported 32..33)", "w": "32..40"}
    assert built["text_encoder"]["info"]["dynamic_dims"] == {"B": "1..12"}


class _NeedsWidthMultipleOf4(torch.nn.Module):
    """A VAE decoder's contract with diffusers' UNet habit: a branch on ``w % 4`` (diffusers passes explicit
    upsample sizes when a side is not a multiple of its downsampling), which torch.export can only keep for
    ``w = 4*k``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv(latent)
        if x.shape[-1] % 4 != 0:
            x = x[..., :-1]
        return torch.nn.functional.interpolate(x, scale_factor=8.0, mode="nearest")


def test_multiples_missing_from_the_call_come_from_a_second_trace(tiny: dict[str, Any], tmp_path: Path) -> None:
    """Without ``dim_multiples``, build_torch_engine traces with plain Dims, reads the multiples from
    torch.export's suggested fixes, traces again with them, and the saved program runs every profile's width."""
    spec = tiny["specs"]["vae_decoder"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
    module = _NeedsWidthMultipleOf4().eval()
    path = tmp_path / "toy.pt2"
    info = build_torch_engine(module, spec, path, profiles=profiles, precision=torch.float32, device="cpu",
                              dim_multiples=None)
    assert info["dim_multiples"] == {"w": 4}
    assert info["dynamic_dims"]["w"] == "32..40, multiple of 4"
    engine = TorchEngine.load(path, spec, profiles, device="cpu")
    for seed, (profile, values) in enumerate(_cases(profiles)):
        inputs = sample_inputs(spec, values, torch.float32, seed=seed)
        torch.testing.assert_close(_run(engine, inputs, profile)["images"], _expected(module, spec, inputs)["images"],
                                   rtol=RTOL, atol=ATOL)


def test_multiples_come_from_torchs_suggested_fixes() -> None:
    message = textwrap.dedent(
        """\
        Constraints violated (h, w)! For more information, run with TORCH_LOGS="+dynamic".
          - Not all values of h = L['sample'].size()[2] in the specified range 24 <= h <= 48 satisfy ...
        Suggested fixes:
          _h = Dim('_h', min=6, max=12)
          _w = Dim('_w', min=6, max=12)
          h = 4*_h
          w = 4*_w
          B = 2

        The error above occurred when calling torch.export.export. ...
        """
    )
    assert multiples_from_suggested_fixes(message, ("B", "h", "w", "S")) == {"h": 4, "w": 4}
    assert multiples_from_suggested_fixes(message, ("B",)) == {}
    assert multiples_from_suggested_fixes("Constraints violated (w)!", ("w",)) == {}


def test_engine_loads_without_diffusers_or_transformers(
    tiny: dict[str, Any], built: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A fresh interpreter with diffusers, transformers and export/ blocked loads and runs saved engines."""
    cases = []
    for name in ("vae_decoder", "text_encoder_2"):  # one diffusers and one transformers model, cheap to load
        spec, (profile, values) = tiny["specs"][name], _cases(built[name]["profiles"])[-1]
        inputs = sample_inputs(spec, values, torch.float32, seed=7)
        data = tmp_path / f"{name}.io.pt"
        torch.save({"inputs": inputs, "expected": _expected(tiny["modules"][name], spec, inputs)}, data)
        cases.append({"name": name, "path": str(built[name]["path"]), "data": str(data), "profile": profile,
                      "profiles": [p.to_json() for p in built[name]["profiles"]]})
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        BLOCKED = {BLOCKED!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if any(fullname == b or fullname.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"{{fullname}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from sdxl_trt.contracts import ModelDims, component_specs
        from sdxl_trt.engine_dir.profiles import Profile
        from sdxl_trt.runtime.torch_engine import TorchEngine

        specs = component_specs(ModelDims.from_json(json.loads(sys.argv[1])))
        for case in json.loads(sys.argv[2]):
            spec = specs[case["name"]]
            engine = TorchEngine.load(case["path"], spec, [Profile.from_json(p) for p in case["profiles"]], device="cpu")
            io = torch.load(case["data"])
            shapes = engine.infer_shapes({{n: tuple(x.shape) for n, x in io["inputs"].items()}}, case["profile"])
            outputs = {{n: torch.empty(s) for n, s in shapes.items()}}
            engine.run(io["inputs"], outputs, profile=case["profile"])
            for n, want in io["expected"].items():
                torch.testing.assert_close(outputs[n], want, rtol={RTOL}, atol={ATOL})
        loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
        assert not loaded, loaded
        print("OK", len(json.loads(sys.argv[2])))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(tiny["dims"].to_json()), json.dumps(cases)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK 2")


def test_bad_shapes_raise_clear_errors_and_engine_keeps_working(
    tiny: dict[str, Any], built: dict[str, dict[str, Any]], engines: dict[str, TorchEngine]
) -> None:
    spec, engine = tiny["specs"]["unet"], engines["unet"]
    good = {"B": 2, "h": 32, "w": 32, "S": 77}  # profile 0 is 256x256: h = w = 32
    shapes = spec.shapes(good)
    bad: list[tuple[dict[str, tuple[int, ...]], int, str]] = [
        ({**shapes, "sample": (2, 4, 32)}, 0, "rank 3, expected 4"),
        ({**shapes, "sample": (2, 3, 32, 32)}, 0, "axis 1 must be 4, got 3"),
        ({**shapes, "timestep": (3,)}, 0, "dimension B is 3 here but 2"),
        ({**spec.shapes({**good, "w": 40})}, 0, "outside profile '256x256'"),
        ({**spec.shapes({**good, "B": 5})}, 0, "outside profile '256x256'"),
        ({**spec.shapes({**good, "S": 308})}, 0, "outside profile '256x256'"),
        ({k: v for k, v in shapes.items() if k != "time_ids"}, 0, "missing input 'time_ids'"),
        (shapes, 2, "profile 2 does not exist"),
    ]
    for input_shapes, profile, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            engine.infer_shapes(input_shapes, profile)
    # 320x256 (w = 40) is profile 1's, so the same shapes are fine there.
    assert engine.infer_shapes(spec.shapes({**good, "w": 40}), 1) == {"noise_pred": (2, 4, 32, 40)}

    # run() refuses wrong dtypes, missing buffers and buffers of the wrong shape (the VAE decoder: cheap).
    vae, vae_spec = engines["vae_decoder"], tiny["specs"]["vae_decoder"]
    latent = sample_inputs(vae_spec, {"B": 1, "h": 32, "w": 32}, torch.float32, seed=4)
    with pytest.raises(InvalidRequestError, match="engine takes torch.float32"):
        vae.run({"latent": latent["latent"].double()}, {"images": torch.empty(1, 3, 256, 256)}, profile=0)
    with pytest.raises(InvalidRequestError, match="missing tensor 'images'"):
        vae.run(latent, {}, profile=0)
    with pytest.raises(InvalidRequestError, match=r"output buffer is \(1, 3, 256, 320\)"):
        vae.run(latent, {"images": torch.empty(1, 3, 256, 320)}, profile=0)

    # ... and both engines still run the next good call correctly.
    for name, inputs in (("unet", sample_inputs(spec, good, torch.float32, seed=3)), ("vae_decoder", latent)):
        got = _run(engines[name], inputs, 0)
        want = _expected(tiny["modules"][name], tiny["specs"][name], inputs)
        for out_name, value in want.items():
            torch.testing.assert_close(got[out_name], value, rtol=RTOL, atol=ATOL)


def test_engine_moves_to_the_requested_device(tiny: dict[str, Any], built: dict[str, dict[str, Any]]) -> None:
    """An engine built on one device loads onto another (weights and device constants in the graph move):
    the meta device stands in for CUDA on a CPU-only machine."""
    for name in ("vae_decoder", "text_encoder_2"):
        spec, profiles = tiny["specs"][name], built[name]["profiles"]
        engine = TorchEngine.load(built[name]["path"], spec, profiles, device="meta")
        profile, values = _cases(profiles)[-1]
        inputs = {t.name: torch.zeros(t.shape(values), dtype=engine.input_dtypes[t.name], device="meta")
                  for t in spec.inputs}
        shapes = engine.infer_shapes({n: tuple(x.shape) for n, x in inputs.items()}, profile)
        outputs = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        engine.run(inputs, outputs, profile=profile)
        with pytest.raises(InvalidRequestError, match=r"on cpu, engine takes torch\.\w+ on meta"):
            engine.run({n: torch.zeros(x.shape, dtype=x.dtype) for n, x in inputs.items()}, outputs, profile=profile)


def test_a_file_loaded_again_reuses_its_parsed_program_with_weights_of_its_own(
        tiny: dict[str, Any], built: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing is most of a load; a second load of a file whose first module lives reuses the parsed program, with
    copied weights. Once the first module's weights change (a LoRA), later loads parse the file again, so every
    load starts from the file's weights; the last module going frees the program."""
    import gc

    from sdxl_trt.engine_dir import torch_program

    name = "vae_decoder"
    spec, profiles = tiny["specs"][name], built[name]["profiles"]
    path = tmp_path / f"{name}.pt2"  # a file of its own: no other test's engine shares its parsed program
    path.write_bytes(Path(built[name]["path"]).read_bytes())
    parses: list[str] = []
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f, *a, **k: parses.append(f) or real_load(f, *a, **k))

    def load() -> TorchEngine:
        return TorchEngine.load(path, spec, profiles, device="cpu")

    def run(engine: TorchEngine) -> torch.Tensor:
        profile, values = _cases(profiles)[0]
        inputs = sample_inputs(spec, values, torch.float32, seed=1)
        return _run(engine, inputs, profile)[spec.output_names[0]]

    first, second = load(), load()
    assert len(parses) == 1
    w1, w2 = first.weights(), second.weights()
    assert w1.keys() == w2.keys() and all(w1[k].data_ptr() != w2[k].data_ptr() for k in w1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    file_image = run(second)
    torch.testing.assert_close(run(first), file_image, rtol=0, atol=0)
    first.set_weights({k: torch.zeros_like(v) for k, v in w1.items() if v.is_floating_point()})
    assert not torch.equal(run(first), file_image)
    torch.testing.assert_close(run(second), file_image, rtol=0, atol=0)  # untouched by the first's change
    third = load()
    assert len(parses) == 2  # the parsed program's weights were no longer the file's
    torch.testing.assert_close(run(third), file_image, rtol=0, atol=0)
    del first, second, third
    gc.collect()
    assert not any(key[0] == str(path.resolve()) for key in torch_program._PARSED.keys())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_engine_on_cuda_runs_on_the_callers_stream(tmp_path: Path) -> None:
    """fp16 on the GPU: built and run on CUDA, enqueued on a side stream, equal to eager fp16."""
    base = load_model("tiny", dtype=torch.float16, device="cuda")
    dims = model_dims(base)
    spec, module = component_specs(dims)["unet"], wrap_components(base)["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
    path = tmp_path / "unet.pt2"
    build_torch_engine(module, spec, path, profiles=profiles, precision=torch.float16, device="cuda",
                       dim_multiples=dim_multiples_for("unet", dims))
    engine = TorchEngine.load(path, spec, profiles, device="cuda")
    for profile, values in _cases(profiles):
        inputs = sample_inputs(spec, values, torch.float16, device="cuda")
        out = {"noise_pred": torch.full(spec.outputs[0].shape(values), float("nan"), dtype=torch.float16, device="cuda")}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        engine.run(inputs, out, profile=profile, stream=stream)
        stream.synchronize()
        want = _expected(module, spec, inputs)["noise_pred"]
        torch.testing.assert_close(out["noise_pred"], want, rtol=2e-3, atol=2e-3)


def test_build_rejects_bad_requests_before_tracing(tiny: dict[str, Any], tmp_path: Path) -> None:
    spec, module = tiny["specs"]["unet"], tiny["modules"]["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
    kwargs: dict[str, Any] = {"profiles": profiles, "device": "cpu"}
    with pytest.raises(BuildError, match="precision is torch.float16"):
        build_torch_engine(module, spec, tmp_path / "unet.pt2", precision=torch.float16, **kwargs)
    with pytest.raises(BuildError, match="must end in .pt2"):
        build_torch_engine(module, spec, tmp_path / "unet.onnx", precision=torch.float32, **kwargs)
    with pytest.raises(BuildError, match="must be a multiple of 16"):
        export_ranges(spec, profiles, {"h": 16, "w": 16})
    with pytest.raises(BuildError, match="dim_multiples names"):
        export_ranges(spec, profiles, {"H": 4})
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SDXL_TRT_SLOW_TESTS"), reason="Inductor on the CPU: ~40 s; set SDXL_TRT_SLOW_TESTS=1")
def test_compile_cache_is_a_hit_in_a_fresh_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    """compile_shapes saves torch's portable cache; a fresh process (empty Inductor cache) hits it."""
    spec = tiny["specs"]["text_encoder"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
    path = tmp_path / "text_encoder.pt2"
    info = build_torch_engine(tiny["modules"]["text_encoder"], spec, path, profiles=profiles,
                              precision=torch.float32, device="cpu", compile_shapes=[{"B": 2}])
    assert info["compile"]["cache_path"] == str(cache_artifacts_path(path)) and info["compile"]["cache_bytes"] > 0
    inputs = sample_inputs(spec, {"B": 2}, torch.float32, seed=5)
    data = tmp_path / "io.pt"
    torch.save({"inputs": inputs, "expected": _expected(tiny["modules"]["text_encoder"], spec, inputs)}, data)
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from torch._dynamo.utils import counters
        from sdxl_trt.contracts import ModelDims, component_specs
        from sdxl_trt.engine_dir.profiles import Profile
        from sdxl_trt.runtime.torch_engine import TorchEngine

        spec = component_specs(ModelDims.from_json(json.loads(sys.argv[1])))["text_encoder"]
        profiles = [Profile.from_json(p) for p in json.loads(sys.argv[2])]
        engine = TorchEngine.load({str(path)!r}, spec, profiles, device="cpu", compile=True,
                                  cache_artifacts={str(cache_artifacts_path(path))!r})
        io = torch.load({str(data)!r})
        out = {{"hidden_states": torch.empty(2, 77, spec.outputs[0].dims[2])}}
        engine.run(io["inputs"], out, profile=0)
        torch.testing.assert_close(out["hidden_states"], io["expected"]["hidden_states"], rtol=1e-4, atol=1e-4)
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
        print("OK")
        """
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor-cache")}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(tiny["dims"].to_json()), json.dumps([p.to_json() for p in profiles])],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK")


def test_bf16_vae_decoder_engine_runs_and_stays_close_to_fp32(tiny: dict[str, Any], tmp_path: Path) -> None:
    """The VAE decoder a GPU build makes in bf16 (fp32's range, so no fp16 overflow): exported, reloaded and run
    in bf16 (on the CPU here), it stays within bf16's rounding of the fp32 module."""
    import copy

    spec = tiny["specs"]["vae_decoder"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=MAX_BATCH)
    module = copy.deepcopy(tiny["modules"]["vae_decoder"]).to(torch.bfloat16)
    path = tmp_path / "vae_decoder.pt2"
    build_torch_engine(module, spec, path, profiles=profiles, precision=torch.bfloat16, device="cpu",
                       dim_multiples=dim_multiples_for("vae_decoder", tiny["dims"]))
    engine = TorchEngine.load(path, spec, profiles, device="cpu")
    assert engine.input_dtypes["latent"] == torch.bfloat16
    dims = {n: r.opt for n, r in profiles[0].dims.items()}
    inputs = sample_inputs(spec, dims, torch.float32, device="cpu", seed=3)
    out = _run(engine, {k: v.to(torch.bfloat16) for k, v in inputs.items()}, 0)["images"].float()
    with torch.inference_mode():
        ref = tiny["modules"]["vae_decoder"](inputs["latent"])
    assert torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits (2**-8 = 0.4% per rounding); over the decoder's ~20 layers on random tiny
    # weights that accumulates to ~3% relative (measured 3.1%); a wrong dtype path would be off by 100%.
    assert float((out - ref).norm() / ref.norm()) < 5e-2
