"""Engine building: profile tables from the contracts, incremental rebuilds, manifest refusals, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_trt.buckets import SDXL_BUCKETS, Bucket
from sdxl_trt.contracts import CONTRACT_VERSION, ModelDims, component_specs
from sdxl_trt.engine_dir.manifest import Manifest, check_engine_dir, effective_contract_version
from sdxl_trt.engine_dir.profiles import component_profiles, select_profile, validate_shapes
from sdxl_trt.errors import ManifestError, ProfileError

SPECS = component_specs(ModelDims())  # full-size SDXL widths


# --------------------------------------------------------------------------- profile table
def test_per_bucket_profiles_cover_all_nine_buckets():
    profiles = component_profiles(SPECS["unet"], buckets=SDXL_BUCKETS, max_batch=4)
    assert [p.name for p in profiles] == [str(b) for b in SDXL_BUCKETS]
    for p, b in zip(profiles, SDXL_BUCKETS, strict=True):
        h, w = b.height // 8, b.width // 8
        assert (p.dims["h"].min, p.dims["h"].max, p.dims["w"].min, p.dims["w"].max) == (h, h, w, w)
        assert (p.dims["B"].min, p.dims["B"].opt, p.dims["B"].max) == (1, 2, 8)  # guidance doubles the batch
        assert p.shapes["sample"] == ((1, 4, h, w), (2, 4, h, w), (8, 4, h, w))
        assert p.shapes["encoder_hidden_states"][2] == (8, 231, 2048)  # 3 prompt chunks of 77
        assert p.shapes["time_ids"][0] == (1, 6)
    # latent sides range from 80 to 192 over SDXL's buckets
    assert min(p.dims["h"].min for p in profiles) == 80 and max(p.dims["w"].max for p in profiles) == 192


def test_vae_and_text_encoder_profiles():
    vae = component_profiles(SPECS["vae_decoder"], buckets=SDXL_BUCKETS, max_batch=4)
    assert vae[0].shapes["latent"] == ((1, 4, 128, 128), (1, 4, 128, 128), (4, 4, 128, 128))
    enc = component_profiles(SPECS["vae_encoder"], buckets=[Bucket(1344, 768)], max_batch=1)
    assert enc[0].shapes["images"][2] == (1, 3, 768, 1344)
    te = component_profiles(SPECS["text_encoder_2"], buckets=SDXL_BUCKETS, max_batch=4, max_prompt_chunks=2)
    assert len(te) == 1 and te[0].shapes["input_ids"] == ((1, 77), (2, 77), (16, 77))


def test_range_profile_spans_buckets_with_1024_optimum():
    (p,) = component_profiles(SPECS["unet"], buckets=SDXL_BUCKETS, max_batch=1, mode="range")
    assert p.name == "range" and len(p.buckets) == 9
    assert (p.dims["h"].min, p.dims["h"].opt, p.dims["h"].max) == (80, 128, 192)
    assert (p.dims["w"].min, p.dims["w"].opt, p.dims["w"].max) == (80, 128, 192)
    assert select_profile([p], {"B": 2, "h": 96, "w": 168, "S": 77}) == 0


def test_select_profile_by_bucket_and_refusal():
    profiles = component_profiles(SPECS["unet"], buckets=SDXL_BUCKETS[:3], max_batch=1)
    assert select_profile(profiles, {"B": 2, "h": 112, "w": 144, "S": 77}) == 1
    with pytest.raises(ProfileError, match="1024x1024, 1152x896, 896x1152"):
        select_profile(profiles, {"B": 2, "h": 96, "w": 168, "S": 77})


def test_mismatched_named_dimensions_name_the_tensors():
    (p,) = component_profiles(SPECS["unet"], buckets=[Bucket(1024, 1024)], max_batch=1)
    shapes = dict(p.shapes)
    shapes["encoder_hidden_states"] = ((1, 77, 2048), (2, 77, 2048), (4, 77, 2048))  # B max 4, sample says 2
    with pytest.raises(ProfileError) as err:
        validate_shapes(SPECS["unet"], shapes)
    msg = str(err.value)
    assert "'B'" in msg and "sample" in msg and "encoder_hidden_states" in msg
    shapes = dict(p.shapes)
    shapes["time_ids"] = ((1, 5), (2, 5), (2, 5))
    with pytest.raises(ProfileError, match="time_ids: axis 1 is fixed at 6"):
        validate_shapes(SPECS["unet"], shapes)
    with pytest.raises(ProfileError, match="no shapes for input"):
        validate_shapes(SPECS["unet"], {k: v for k, v in p.shapes.items() if k != "timestep"})


# --------------------------------------------------------------------------- building
@pytest.mark.parametrize("omp", ["1", "3", None])
def test_onnxruntime_threads_follow_omp_num_threads(tiny_engines: Path, monkeypatch: pytest.MonkeyPatch,
                                                    omp: str | None) -> None:
    """ONNX Runtime's pool takes OMP_NUM_THREADS, the knob torch reads; unset, ORT's own default (0: a thread
    per core)."""
    from sdxl_trt.engine_dir.manifest import open_engine_dir
    from sdxl_trt.runtime.loader import load_engines

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    engines = load_engines(tiny_engines, open_engine_dir(tiny_engines), device=torch.device("cpu"))
    threads = {n: e.session.get_session_options().intra_op_num_threads for n, e in engines.items()}
    assert set(threads.values()) == {int(omp or 0)}, threads


def test_onnxruntime_engines_match_pytorch(tiny_engines: Path, tiny_models):
    """Each built ONNX Runtime engine, run through the Engine protocol, equals the PyTorch component."""
    from sdxl_trt.engine_dir.manifest import open_engine_dir
    from sdxl_trt.export.onnx_export import sample_inputs
    from sdxl_trt.export.wrappers import wrap_components
    from sdxl_trt.runtime.loader import load_engines

    manifest = open_engine_dir(tiny_engines)
    engines = load_engines(tiny_engines, manifest, device=torch.device("cpu"))
    modules = wrap_components(*tiny_models)
    for name, engine in engines.items():
        dims = {"B": 2 if name in ("unet", "refiner") else 1, "S": 154, "h": 32, "w": 40}
        profile = 0
        if name not in ("text_encoder", "text_encoder_2"):
            dims["h"], dims["w"] = 32, 40
            profile = select_profile(engine.profiles, {"B": dims["B"], "h": 32, "w": 40, "S": 154})
        inputs = sample_inputs(engine.spec, dims, torch.float32, seed=5)
        out_shapes = engine.infer_shapes({k: tuple(v.shape) for k, v in inputs.items()}, profile)
        outputs = {k: torch.empty(s) for k, s in out_shapes.items()}
        engine.run(inputs, outputs, profile=profile)
        with torch.inference_mode():
            expected = modules[name](*(inputs[n] for n in engine.spec.input_names))
        expected = (expected,) if isinstance(expected, torch.Tensor) else expected
        for got, exp in zip(outputs.values(), expected, strict=True):
            rel = float((got - exp).norm() / exp.norm())
            assert rel < 1e-4, (name, rel)


def test_rebuild_with_nothing_changed_rebuilds_nothing(tmp_path: Path, tiny_engines: Path):
    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = tmp_path / "e"
    shutil.copytree(tiny_engines, out)
    before = Manifest.load(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    after = build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="onnxruntime",
                                       precision="fp32", max_batch=2))
    assert {k: v.sha256 for k, v in after.components.items()} == {k: v.sha256 for k, v in before.components.items()}
    assert {k: v.build_seconds for k, v in after.components.items()} == {
        k: v.build_seconds for k, v in before.components.items()}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")} == mtimes

    # Fewer buckets: the bucket-dependent engines get new profiles, the text encoders stay as they were.
    narrowed = build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="onnxruntime",
                                          precision="fp32", max_batch=2, buckets="256x256"))
    assert len(narrowed.components["unet"].profiles) == 1
    assert narrowed.components["text_encoder"].build_seconds == before.components["text_encoder"].build_seconds
    # A damaged engine file is rebuilt.
    (out / "vae_decoder.onnx").write_bytes(b"broken")
    repaired = build_engines(BuildOptions(model="tiny", refiner="tiny-refiner", out=out, backend="onnxruntime",
                                          precision="fp32", max_batch=2, buckets="256x256"))
    check_engine_dir(out, repaired)


# --------------------------------------------------------------------------- manifest refusals
@pytest.fixture
def engine_copy(tmp_path: Path, tiny_engines: Path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(tiny_engines, out)
    return out


def test_missing_truncated_and_corrupt_files_are_refused(engine_copy: Path):
    m = Manifest.load(engine_copy)
    check_engine_dir(engine_copy, m)
    unet = engine_copy / "unet.onnx"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="truncated or replaced.*rebuild: sdxl-trt build"):
        check_engine_dir(engine_copy, m)
    unet.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ManifestError, match="SHA-256"):
        check_engine_dir(engine_copy, m)
    unet.unlink()
    with pytest.raises(ManifestError, match="missing"):
        check_engine_dir(engine_copy, m)


def test_corrupt_missing_and_future_manifests(engine_copy: Path, tmp_path: Path):
    path = engine_copy / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.load(engine_copy)
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99"):
        Manifest.load(engine_copy)
    path.unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        Manifest.load(engine_copy)
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.load(tmp_path / "nowhere")


def _trt_manifest(engine_copy: Path) -> Manifest:
    m = Manifest.load(engine_copy)
    m.backend = "tensorrt"
    m.device = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    m.versions = {**m.versions, "tensorrt": "10.13.0"}
    return m


H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_tensorrt_engines_refused_on_other_gpu_capability_or_version(engine_copy: Path):
    m = _trt_manifest(engine_copy)
    check_engine_dir(engine_copy, m, device=H100, versions={"tensorrt": "10.9.1"})  # same major: fine
    with pytest.raises(ManifestError, match="need a CUDA GPU"):
        check_engine_dir(engine_copy, m, device={"type": "cpu"}, versions={"tensorrt": "10.13.0"})
    with pytest.raises(ManifestError, match="GPU 'NVIDIA H100 80GB HBM3'.*'NVIDIA L40S'"):
        check_engine_dir(engine_copy, m, device={**H100, "name": "NVIDIA L40S"}, versions={"tensorrt": "10.13.0"})
    with pytest.raises(ManifestError, match="compute capability '9.0'.*'8.9'"):
        check_engine_dir(engine_copy, m, device={**H100, "compute_capability": "8.9"}, versions={"tensorrt": "10.1"})
    with pytest.raises(ManifestError, match="TensorRT 10.13.0, this machine has 11.0"):
        check_engine_dir(engine_copy, m, device=H100, versions={"tensorrt": "11.0"})
    with pytest.raises(ManifestError, match="TensorRT is not installed"):
        check_engine_dir(engine_copy, m, device=H100, versions={})


def test_changed_model_is_refused(tmp_path: Path, tiny_models):
    """Engines built from a diffusers directory refuse to load once that directory's weights change."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.engine_dir.manifest import open_engine_dir

    base, _ = tiny_models
    model_dir = tmp_path / "model"
    diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=base.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
    ).save_pretrained(model_dir)
    out = tmp_path / "engines"
    build_engines(BuildOptions(model=str(model_dir), out=out, backend="onnxruntime", precision="fp32",
                               buckets="256x256"))
    open_engine_dir(out)
    weights = next((model_dir / "vae").glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=f"the model at {model_dir}.*changed.*rebuild"):
        open_engine_dir(out)


def test_loaded_pipeline_refuses_a_corrupt_engine_with_the_rebuild_command(engine_copy: Path):
    from sdxl_trt.runtime.pipeline import Pipeline

    (engine_copy / "text_encoder.onnx").write_bytes(b"\x00" * 10)
    with pytest.raises(ManifestError, match="text_encoder.*rebuild: sdxl-trt build"):
        Pipeline.load(engine_copy)


# --------------------------------------------------------------------------- CLI
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_trt.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_tensorrt_backend_without_tensorrt_fails_fast_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "trt"
    proc = _cli("build", "--model", "tiny", "--out", str(out), "--backend", "tensorrt")
    assert proc.returncode == 2
    assert "pip install 'sdxl-trt[tensorrt]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_info_and_run_write_png_with_parameters(tiny_engines: Path, tmp_path: Path):
    from PIL import Image

    info = _cli("info", str(tiny_engines))
    assert info.returncode == 0 and "backend:    onnxruntime" in info.stdout and "unet" in info.stdout
    out = tmp_path / "img.png"
    proc = _cli("run", "--engines", str(tiny_engines), "--prompt", "a red bicycle", "--seed", "42", "--steps", "3",
                "--width", "320", "--height", "256", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "denoise" in proc.stdout and "vae_decode" in proc.stdout
    with Image.open(out) as im:
        params = json.loads(im.text["parameters"])
        assert im.size == (320, 256)
        pixels = np.asarray(im)
    assert params["seed"] == 42 and params["prompt"] == "a red bicycle" and params["steps"] == 3
    # The same settings through the Python API give the same pixels.
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    again = Pipeline.load(tiny_engines).generate(GenerationRequest(prompt="a red bicycle", seed=42, steps=3,
                                                                     width=320, height=256))
    assert np.array_equal(np.asarray(again.images[0]), pixels)


def test_cli_run_refuses_bad_size_with_bucket_list(tiny_engines: Path, tmp_path: Path):
    proc = _cli("run", "--engines", str(tiny_engines), "--prompt", "x", "--width", "1000", "--height", "1000",
                "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert "1000x1000 is not a built bucket" in proc.stderr and "256x256" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_int8_build_writes_a_qdq_unet_and_reports_its_error(tmp_path: Path, tiny_engines: Path):
    """`--precision int8` on ONNX Runtime: a Q/DQ UNet calibrated on real prompts, its error vs FP32 in the
    manifest and in `sdxl-trt info`, and the pipeline runs it."""
    import onnx

    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.engine_dir.describe import format_manifest
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    out = tmp_path / "int8"
    shutil.copytree(tiny_engines / "onnx", out / "onnx")  # reuse the fp32 export
    m = build_engines(BuildOptions(model="tiny", out=out, backend="onnxruntime", precision="int8",
                                   buckets="256x256", calibration_prompts=3, calibration_steps=3))
    unet = m.components["unet"]
    assert unet.precision == "int8" and m.components["vae_decoder"].precision == "fp32"
    ops = {n.op_type for n in onnx.load(str(out / unet.file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    err = unet.extra["int8"]["error"]
    # Measured on tiny: relative L2 ~0.035, cosine ~0.999. INT8 is lossy; wrong scales give > 0.5.
    assert 0 < err["relative_l2_mean"] < 0.25 and err["cosine_mean"] > 0.97
    assert "int8 vs fp32" in format_manifest(m)
    image = Pipeline.load(out).generate(GenerationRequest(prompt="a cat", steps=3, seed=0)).images[0]
    assert image.size == (256, 256)


def test_manifest_written_before_the_engine_dir_move_loads(tiny_engines: Path, tmp_path: Path) -> None:
    """tests/data/manifest-format1-onnxruntime.json was written by the code before the engine-directory format
    moved to sdxl_trt.engine_dir: it loads unchanged, and today's build writes the same fields."""
    from sdxl_trt.engine_dir.profiles import Profile

    old = json.loads((Path(__file__).parent / "data" / "manifest-format1-onnxruntime.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    loaded = Manifest.load(tmp_path)
    assert loaded.to_json() == old
    profiles = [Profile.from_json(p) for p in loaded.components["unet"].profiles]
    assert [p.to_json() for p in profiles] == old["components"]["unet"]["profiles"]
    assert loaded.contract_version is None and effective_contract_version(loaded) == 1  # read off model_dims
    new = json.loads((tiny_engines / "manifest.json").read_text())
    assert set(new) == set(old) | {"contract_version"}
    assert new["contract_version"] == CONTRACT_VERSION
    assert set(new["components"]["unet"]) == set(old["components"]["unet"])
