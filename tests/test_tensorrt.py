"""The TensorRT backend without TensorRT: type-checked against the mended stubs, logic tested in pure Python.

* mypy runs on engine/tensorrt_backend.py and runtime/tensorrt_engine.py against tensorrt-stubs (mended by
  tests/support/mend_tensorrt_stubs.py) and must pass; on a deliberately wrong snippet it must fail with
  the expected errors, which proves the check is not vacuous.
* mypy runs a second time against the stubs less every member TensorRT 11 removed
  (``mend_tensorrt_stubs.py --trt11``), with a canary: ``trt.BuilderFlag.FP16`` fails there, ``trt.DataType.INT8``
  passes.
* The pure parts (flag mapping, component precision, profile translation, install errors) are tested
  directly; build and load are exercised up to the library boundary with a small fake ``tensorrt`` module
  whose methods record their calls, in a 10.x and an 11.x mode (11.x lacks every removed member, so touching
  one raises AttributeError). The fake keeps the ONNX's tensor dtypes, as a strongly typed build does.
"""

from __future__ import annotations

import enum
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import COMPONENT_NAMES, ModelDims, component_precision, component_specs
from sdxl_trt.engine import tensorrt_backend as tb
from sdxl_trt.engine_dir.profiles import Profile, component_profiles
from sdxl_trt.errors import (
    BackendUnavailableError,
    BuildError,
    InvalidRequestError,
    ManifestError,
    ProfileError,
)

ROOT = Path(__file__).resolve().parents[1]
MEND = ROOT / "tests" / "support" / "mend_tensorrt_stubs.py"
SPECS = component_specs(ModelDims())
BUCKETS = [Bucket(1024, 1024), Bucket(1152, 896)]


# --------------------------------------------------------------------------------------------- mypy


def _require_mypy_and_stubs() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'sdxl-trt[dev]')")
    try:
        metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")


def _mypy(*files: str, trt11: bool = False) -> subprocess.CompletedProcess[str]:
    """Mend the stubs into build/typings and build/typings-trt11 (as CI does), then run mypy with the repository's
    mypy.ini; ``trt11``: against the stubs less what TensorRT 11 removed (MYPYPATH is searched first)."""
    subprocess.run([sys.executable, str(MEND), "build/typings", "--trt11", "build/typings-trt11"], cwd=ROOT,
                   check=True, capture_output=True)
    env = {**os.environ, "MYPYPATH": str(ROOT / "build" / "typings-trt11")} if trt11 else None
    cache = ["--cache-dir", str(ROOT / "build" / ".mypy_cache-trt11")] if trt11 else []
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *cache, *files],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def test_mypy_accepts_the_tensorrt_modules_against_tensorrt_11() -> None:
    """Nothing TensorRT 11 removed is used: the same files pass against the stubs less those members."""
    _require_mypy_and_stubs()
    result = _mypy(trt11=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 3 source files" in result.stdout


def test_mypy_trt11_canary_rejects_removed_members_only(tmp_path: Path) -> None:
    """The canary that makes the second check worth something: a removed member fails there (and passes against
    10.13), a kept one passes both."""
    _require_mypy_and_stubs()
    snippet = tmp_path / "trt11_canary.py"
    snippet.write_text(textwrap.dedent("""\
        import tensorrt as trt

        def flags(config: trt.IBuilderConfig, engine: trt.ICudaEngine) -> int:
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.INT8)
            kept = trt.DataType.INT8, trt.DataType.FP8, trt.BuilderFlag.REFIT
            return engine.device_memory_size + engine.device_memory_size_v2 + len(kept)
    """))
    out11 = _mypy(str(snippet), trt11=True).stdout
    assert 'trt11_canary.py:4: error: "type[BuilderFlag]" has no attribute "FP16"' in out11, out11
    assert 'trt11_canary.py:5: error: "type[BuilderFlag]" has no attribute "INT8"' in out11, out11
    assert 'trt11_canary.py:7: error: "ICudaEngine" has no attribute "device_memory_size"' in out11, out11
    assert "Found 3 errors in 1 file" in out11, out11  # line 6 (DataType.INT8, FP8, REFIT) passes
    out10 = _mypy(str(snippet)).stdout
    assert "Success: no issues found in 1 source file" in out10, out10


def test_flag_names_exist_in_the_tensorrt_10_api() -> None:
    """Every flag name the pure mapping can return is a member of the enum in TensorRT 10.13's bindings."""
    try:
        root = _stub_root()
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed")
    import ast

    tree = ast.parse(_load_mend().mend((root / "tensorrt_bindings" / "tensorrt.pyi").read_text())[0])
    members = {node.name: {t.target.id for t in node.body if isinstance(t, ast.AnnAssign)
                           and isinstance(t.target, ast.Name)}
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert set(tb.BUILDER_FLAG_NAMES) <= members["BuilderFlag"]
    assert set(tb.NETWORK_FLAG_NAMES) <= members["NetworkDefinitionCreationFlag"]


def _load_mend() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("mend_tensorrt_stubs", MEND)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_root() -> Path:
    return Path(str(metadata.distribution("tensorrt-stubs").locate_file("")))


def test_mend_fixes_the_known_syntax_errors() -> None:
    mend = _load_mend().mend
    text = ("class P:\n"
            "    def get_workspace_size(self, in: list[int], out: list[int]) -> int:\n"
            "        ':arg in: inputs'\n"
            "    def add_scale_nd(self, input: int, power: int = None, channel_axis: int) -> int: ...\n")
    fixed, changed = mend(text)
    assert changed == 2
    assert "(self, in_: list[int], out" in fixed and ":arg in: inputs" in fixed
    assert "channel_axis: int = ...)" in fixed
    compile(fixed, "<mended>", "exec")


# ------------------------------------------------------------------------------------ pure logic

PRECISION_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}
"""The builder flags TensorRT 11 removed (weak typing): never set, on either generation."""


def test_removed_flag_list_is_the_stub_menders() -> None:
    assert set(_load_mend().REMOVED_IN_11["BuilderFlag"]) == PRECISION_FLAGS
    assert not PRECISION_FLAGS & set(tb.BUILDER_FLAG_NAMES)


@pytest.mark.parametrize("precision,refit,stream,flag", itertools.product(
    ["fp16", "fp32", "int8", "fp8"], [False, True, "identical"], [False, True], [True, False]))
def test_flag_names_every_combination(precision: str, refit: Any, stream: bool, flag: bool) -> None:
    """Strongly typed always: STRONGLY_TYPED exactly where this TensorRT needs it (10.x), no precision flag."""
    config = tb.TensorRTBuildConfig(precision=precision, refittable=refit, weight_streaming=stream)
    builder, network = tb.flag_names(config, strongly_typed_flag=flag)
    assert set(builder) <= set(tb.BUILDER_FLAG_NAMES) and set(network) <= set(tb.NETWORK_FLAG_NAMES)
    assert network == (["STRONGLY_TYPED"] if flag else [])
    assert not PRECISION_FLAGS & set(builder)
    assert ("REFIT" in builder) == (refit is True)
    assert ("REFIT_IDENTICAL" in builder) == (refit == "identical")
    assert ("WEIGHT_STREAMING" in builder) == stream


@pytest.mark.parametrize("version,needs", [("10.8.0.43", True), ("10.13.0.35", True), ("11.0.0.1", False),
                                           ("11.4.0.9", False)])
def test_strongly_typed_flag_by_version(version: str, needs: bool) -> None:
    from sdxl_trt.tensorrt_support import needs_strongly_typed_flag, tensorrt_major

    flags = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt = types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)
    assert tensorrt_major(trt) == int(version.split(".")[0])
    assert needs_strongly_typed_flag(trt) is needs
    assert needs_strongly_typed_flag(types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=object())) is False


def test_pyproject_extra_is_the_supported_range() -> None:
    """The extra installs what tensorrt_status accepts: 10.8 and newer 10.x, and 11.x."""
    from sdxl_trt.tensorrt_support import MIN_VERSION, SUPPORTED_MAJORS

    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'tensorrt = \["tensorrt>=([0-9.]+),<([0-9]+)"', text)
    assert pin, text
    assert tuple(int(x) for x in pin.group(1).split(".")) == MIN_VERSION
    assert int(pin.group(2)) == max(SUPPORTED_MAJORS) + 1


@pytest.mark.parametrize("kwargs,message", [
    ({"precision": "bf16"}, "precision must be one of"),
    ({"refittable": "yes"}, "refittable must be"),
    ({"workspace_gib": 0}, "workspace_gib must be positive"),
    ({"builder_optimization_level": 6}, "0..5"),
])
def test_config_rejects_bad_values_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        tb.TensorRTBuildConfig(**kwargs)


@pytest.mark.parametrize("component,requested,safe,expected", [
    ("vae_decoder", "fp16", False, "fp32"),
    ("vae_encoder", "fp16", False, "fp32"),
    ("vae_decoder", "int8", False, "fp32"),
    ("vae_decoder", "fp16", True, "fp16"),
    ("vae_decoder", "fp32", True, "fp32"),
    ("unet", "fp16", False, "fp16"),
    ("unet", "int8", False, "int8"),
    ("unet", "fp8", False, "fp8"),
    ("refiner", "int8", False, "fp16"),  # only the base UNet is calibrated
    ("refiner", "fp8", False, "fp16"),
    ("text_encoder", "int8", False, "fp16"),  # fp16 files: TensorRT builds what the ONNX says
    ("text_encoder_2", "fp8", False, "fp16"),
    ("vae_decoder", "fp8", False, "fp32"),
    ("text_encoder_2", "fp16", False, "fp16"),
    ("text_encoder", "fp32", False, "fp32"),
])
def test_component_precision(component: str, requested: Any, safe: bool, expected: str) -> None:
    """The one rule (sdxl_trt.contracts) as the TensorRT backend gets it."""
    assert component_precision(component, requested, backend="tensorrt", vae_fp16_safe=safe) == expected


def test_component_precision_covers_every_component_and_rejects_others() -> None:
    for name in COMPONENT_NAMES:
        assert component_precision(name, "fp16", backend="tensorrt") in ("fp16", "fp32")
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        component_precision("vae", "fp16", backend="tensorrt")


def test_a_fp16_vae_is_refused_not_rewritten(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """build_engine builds the precision it is given (the rule is applied once, by the build); an fp16 VAE would
    overflow to NaN, so it is refused with the fix, whatever its file holds."""
    spec = SPECS["vae_decoder"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    with pytest.raises(BuildError, match=r"fp16 VAE would run in fp16.*precision='fp32'"):
        tb.build_engine(_onnx(tmp_path, "vae_decoder", dtype="HALF"), tmp_path / "vae.plan", spec=spec,
                        profiles=profiles, config=tb.TensorRTBuildConfig(precision="fp16"))
    with pytest.raises(BuildError, match=r"has float tensors .*latent \(HALF\).*needs FLOAT.*overflows in fp16"):
        tb.build_engine(_onnx(tmp_path, "vae_decoder", dtype="HALF"), tmp_path / "vae.plan", spec=spec,
                        profiles=profiles, config=tb.TensorRTBuildConfig(precision="fp32"))
    info = tb.build_engine(_onnx(tmp_path, "vae_decoder"), tmp_path / "vae.plan", spec=spec, profiles=profiles,
                           config=tb.TensorRTBuildConfig(precision="fp32"))
    assert info["precision"] == "fp32" and info["builder_flags"] == []


def test_profile_shapes_translate_each_profile_to_set_shape_arguments() -> None:
    spec = SPECS["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=2)
    args = tb.profile_shapes(spec, profiles[1])  # 1152x896: latent h=112, w=144
    assert [a[0] for a in args] == spec.input_names
    by_name = {name: (lo, opt, hi) for name, lo, opt, hi in args}
    assert by_name["sample"] == ([1, 4, 112, 144], [2, 4, 112, 144], [4, 4, 112, 144])
    assert by_name["timestep"] == ([1], [2], [4])
    assert by_name["encoder_hidden_states"] == ([1, 77, 2048], [2, 77, 2048], [4, 231, 2048])
    assert all(type(v) is int for _, *shapes in args for s in shapes for v in s)


def test_profile_shapes_name_the_bad_tensors() -> None:
    spec = SPECS["unet"]
    good = component_profiles(spec, buckets=BUCKETS[:1], max_batch=1)[0]
    extra = Profile("x", (), good.dims, {**good.shapes, "mask": ((1,), (1,), (1,))})
    with pytest.raises(ProfileError, match=r"unknown input\(s\) \['mask'\]"):
        tb.profile_shapes(spec, extra)
    shapes = dict(good.shapes)
    shapes["text_embeds"] = ((1, 1280), (2, 1280), (3, 1280))  # batch range disagrees with the others
    with pytest.raises(ProfileError, match="text_embeds"):
        tb.profile_shapes(spec, Profile("x", (), good.dims, shapes))


def test_require_tensorrt_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = tb.tensorrt_status()
    assert not ok and "cannot be imported" in reason
    with pytest.raises(BackendUnavailableError) as e:
        tb.require_tensorrt()
    assert "pip install 'sdxl-trt[tensorrt]'" in str(e.value) and "NVIDIA GPU" in str(e.value)


def test_stubs_alone_are_not_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "tensorrt").mkdir()  # what tensorrt-stubs leaves in site-packages: no __init__.py
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # restored (or removed) after the test
    del sys.modules["tensorrt"]
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, reason = tb.tensorrt_status()
    assert not ok and "only type stubs" in reason


@pytest.mark.parametrize("version,gpu,expected", [
    ("8.6.1", True, "written for TensorRT 10.8"),
    ("10.4.0.26", True, "written for TensorRT 10.8"),
    ("12.0.0", True, "written for TensorRT 10.8"),
    ("10.13.0.35", False, "no CUDA GPU"),
    ("11.4.0.9", False, "no CUDA GPU"),  # 11.x is supported: only the missing GPU stops it
])
def test_tensorrt_status_reasons(monkeypatch: pytest.MonkeyPatch, version: str, gpu: bool, expected: str) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version, Builder=object))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    ok, reason = tb.tensorrt_status()
    assert not ok and expected in reason


@pytest.mark.parametrize("version", ["10.8.0.43", "10.13.0.35", "11.4.0.9"])
def test_tensorrt_status_accepts_supported_versions(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version, Builder=object))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert tb.tensorrt_status() == (True, f"TensorRT {version} on Fake GPU")


@pytest.mark.parametrize("name,capability,ok", [("NVIDIA A100-SXM4-80GB", (8, 0), False),
                                                ("NVIDIA GeForce RTX 3090", (8, 6), False),
                                                ("NVIDIA L40S", (8, 9), True), ("NVIDIA H200", (9, 0), True),
                                                ("NVIDIA B200", (10, 0), True)])
def test_fp8_needs_compute_capability_8_9(name: str, capability: tuple[int, int], ok: bool) -> None:
    if ok:
        tb.check_fp8_device(name, capability)
        return
    with pytest.raises(BuildError, match=rf"capability 8\.9 or newer.*{name} has compute capability {capability[0]}\.{capability[1]}"):
        tb.check_fp8_device(name, capability)


@pytest.mark.parametrize("backend,why", [("onnxruntime", "slower than fp16"), ("torch", "no FP8 convolutions")])
def test_fp8_is_refused_on_other_backends_before_anything_is_written(tmp_path: Path, backend: str, why: str) -> None:
    from sdxl_trt.engine.build import build_engines
    from sdxl_trt.engine.options import BuildOptions

    out = tmp_path / "engines"
    with pytest.raises(BuildError, match=rf"--precision fp8 is for --backend tensorrt.*{why}"):
        build_engines(BuildOptions(model="tiny", out=out, backend=backend, precision="fp8"))
    assert not out.exists()


def test_fp8_on_an_old_gpu_is_refused_before_anything_is_written(fake_trt: FakeTensorRT, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sdxl_trt.engine.build import build_engines
    from sdxl_trt.engine.options import BuildOptions

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10G")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match=r"NVIDIA A10G has compute capability 8\.6"):
        build_engines(BuildOptions(model="tiny", out=out, backend="tensorrt", precision="fp8"))
    assert not out.exists()


def test_build_refuses_before_writing_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    spec = SPECS["unet"]
    with pytest.raises(BackendUnavailableError, match="sdxl-trt\\[tensorrt\\]"):
        tb.build_engine(tmp_path / "onnx" / "unet.onnx", tmp_path / "engines" / "unet.plan", spec=spec,
                        profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig(timing_cache=tmp_path / "engines" / "timing.cache"))
    assert list(tmp_path.iterdir()) == []


def test_runtime_imports_without_tensorrt_export_or_diffusers() -> None:
    code = ("import sys; import sdxl_trt.runtime.tensorrt_engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'tensorrt') "
            "or m.startswith('sdxl_trt.export')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_loading_without_tensorrt_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="sdxl-trt\\[tensorrt\\]"):
        TensorRTEngine.load(tmp_path / "unet.plan", SPECS["unet"], [])


# ------------------------------------------------- build and load against a recording fake tensorrt


REMOVED_MEMBERS_IN_11 = {
    "device_memory_size", "create_execution_context_without_device_memory", "int8_calibrator",
    "set_calibration_profile", "get_calibration_profile", "set_quantization_flag", "clear_quantization_flag",
    "set_output_type", "precision", "set_dynamic_range", "dynamic_range", "platform_has_fast_fp16",
    "platform_has_fast_int8",
}
"""Object members the fake's 11.x mode lacks (AttributeError), from the stub mender's list."""


class FakeTensorRT(types.ModuleType):
    """Just enough of TensorRT's Python API (same names and signatures as the stubs) to record calls, as 10.x
    (``major=10``: every member, precision flags included, so a test proves they are never set) or as 11.x
    (``major=11``: the members 11 removed are absent and raise AttributeError; every network is strongly typed).

    The "ONNX" file is JSON: ``{"inputs": {name: dtype}, "outputs": {name: dtype}, "errors": [...]}``; the plan
    is JSON too and keeps those dtypes (a strongly typed build runs in the file's types), so a built plan loads
    in the fake runtime with the tensor dtypes its ONNX had. ``fail_build`` makes the build return None.
    """

    def __init__(self, major: int = 10) -> None:
        super().__init__("tensorrt")
        self.major = major
        self.__version__ = "10.13.0.35" if major == 10 else "11.4.0.9"
        self.calls: list[tuple[Any, ...]] = []
        self.contexts: list[Any] = []
        self.fail_build = False
        fake = self
        removed = REMOVED_MEMBERS_IN_11 if major >= 11 else set()

        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass

        ILogger.Severity = Severity
        self.ILogger = ILogger
        kept = list(tb.BUILDER_FLAG_NAMES) + ["TF32", "STRIP_PLAN", "REFIT_INDIVIDUAL"]
        flags = kept + ([] if major >= 11 else sorted(PRECISION_FLAGS))
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(flags)})
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                          {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        self.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
        self.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64 INT8 UINT8 BOOL FP8")
        self.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
        self.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                                            "STATIC ON_PROFILE_CHANGE USER_MANAGED")
        self.nptype = lambda t: {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                                 "INT64": np.int64, "BOOL": np.bool_}[t.name]

        class Dims(tuple):
            pass

        self.Dims = Dims

        class Recorder:
            def __getattr__(self, name: str) -> Any:
                if name in removed:
                    raise AttributeError(f"TensorRT {fake.__version__} has no {type(self).__name__}.{name}")
                return lambda *args, **kw: fake.calls.append((name, *args, *kw.values())) or True

        class Tensor:
            def __init__(self, name: str, dtype: str = "FLOAT") -> None:
                self.name, self.dtype = name, fake.DataType[dtype]

        class Network:
            inputs: list[Tensor] = []
            outputs: list[Tensor] = []
            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))
            get_input = lambda self, i: self.inputs[i]  # noqa: E731
            get_output = lambda self, i: self.outputs[i]  # noqa: E731

        class Error:
            def __init__(self, node: str) -> None:
                self.node_name, self.desc = (lambda: node), (lambda: "unsupported operator")
                self.node, self.node_operator = (lambda: 7), (lambda: "FancyOp")

        class OnnxParser:
            def __init__(self, network: Network, logger: ILogger) -> None:
                self.network, self.errors = network, []

            def parse_from_file(self, path: str) -> bool:
                onnx = json.loads(Path(path).read_text())
                self.network.inputs = [Tensor(n, d) for n, d in onnx["inputs"].items()]
                self.network.outputs = [Tensor(n, d) for n, d in onnx["outputs"].items()]
                self.network.weights = onnx.get("weights", {})
                self.errors = [Error(n) for n in onnx.get("errors", [])]
                return not self.errors

            num_errors = property(lambda self: len(self.errors))
            get_error = lambda self, i: self.errors[i]  # noqa: E731

        class TimingCache:
            def serialize(self) -> bytes:
                return b"timings"

        class BuilderConfig(Recorder):
            def __init__(self) -> None:
                self.profiles: list[Any] = []
                self.flags: set[Any] = set()

            def set_flag(self, flag: Any) -> None:
                fake.calls.append(("set_flag", flag))
                self.flags.add(flag)

            def add_optimization_profile(self, profile: Any) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data: bytes) -> TimingCache:
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache()

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> TimingCache:
                return TimingCache()

        class Builder(Recorder):
            def __init__(self, logger: ILogger) -> None:
                pass

            def create_network(self, flags: int = 0) -> Network:
                fake.calls.append(("create_network", flags))
                network = Network()
                # 10.x: weakly typed unless STRONGLY_TYPED is set; 11.x: always strongly typed (flag ignored).
                network.strongly_typed = major >= 11 or bool(flags & (1 << 1))
                return network

            create_builder_config = lambda self: BuilderConfig()  # noqa: E731
            create_optimization_profile = lambda self: Recorder()  # noqa: E731

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                if fake.fail_build:
                    return None
                if not network.strongly_typed:
                    raise AssertionError("the fake builds strongly typed networks only (a weakly typed 10.x build)")
                io = {t.name: "INPUT" for t in network.inputs} | {t.name: "OUTPUT" for t in network.outputs}
                dtypes = {t.name: t.dtype.name for t in (*network.inputs, *network.outputs)}
                return json.dumps({"io": io, "dtypes": dtypes, "profiles": len(config.profiles),
                                   "refittable": bool(config.flags & {fake.BuilderFlag.REFIT}),
                                   "weights": network.weights}).encode()

        class Context(Recorder):
            def __init__(self) -> None:
                fake.contexts.append(self)
                self.calls: list[tuple[Any, ...]] = []

            def __getattr__(self, name: str) -> Any:
                record = super().__getattr__(name)
                return lambda *args, **kw: self.calls.append((name, *args)) or record(*args, **kw)

        class Engine:
            def __init__(self, plan: dict[str, Any]) -> None:
                self.io, self.num_optimization_profiles = plan["io"], plan["profiles"]
                self.dtypes, self.refittable, self.weights = plan["dtypes"], plan["refittable"], plan["weights"]
                self.num_io_tensors = len(self.io)
                self.device_memory_size_v2 = plan.get("memory", 1000)
                if major < 11:
                    self.device_memory_size = self.device_memory_size_v2

            get_tensor_name = lambda self, i: list(self.io)[i]  # noqa: E731
            get_tensor_mode = lambda self, n: fake.TensorIOMode[self.io[n]]  # noqa: E731
            get_tensor_dtype = lambda self, n: fake.DataType[self.dtypes[n]]  # noqa: E731
            get_device_memory_size_for_profile_v2 = lambda self, i: 100 * (i + 1)  # noqa: E731

            def create_execution_context(self, strategy: Any) -> Context:
                fake.calls.append(("create_execution_context", strategy))
                return Context()

            def __getattr__(self, name: str) -> Any:
                raise AttributeError(f"TensorRT {fake.__version__}: ICudaEngine has no {name}")

        class Runtime:
            def __init__(self, logger: ILogger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                try:
                    return Engine(json.loads(data))
                except ValueError:
                    return None  # what TensorRT does for a plan of another version or GPU

        class Weights:
            def __init__(self, array: np.ndarray) -> None:
                self.array = array
                self.dtype = {np.dtype(np.float32): fake.DataType.FLOAT,
                              np.dtype(np.float16): fake.DataType.HALF}[array.dtype]

        class Refitter:
            def __init__(self, engine: Engine, logger: ILogger) -> None:
                self.engine, self.set = engine, {}

            def get_weights_prototype(self, name: str) -> Weights:
                return Weights(np.zeros(1, dtype={"FLOAT": np.float32, "HALF": np.float16}[self.engine.weights[name]]))

            def set_named_weights(self, name: str, weights: Weights) -> bool:
                if name not in self.engine.weights or weights.dtype.name != self.engine.weights[name]:
                    return False
                self.set[name] = weights.array.copy()
                return True

            def refit_cuda_engine(self) -> bool:
                fake.calls.append(("refit_cuda_engine", dict(self.set)))
                return True

            def get_missing_weights(self) -> list[str]:
                return []

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime
        self.Weights, self.Refitter = Weights, Refitter


class FakeStream:
    cuda_stream = 1234

    def synchronize(self) -> None:
        pass


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def fake_trt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    """The fake in both generations: every test using it runs as TensorRT 10.13 and as TensorRT 11.4."""
    fake = FakeTensorRT(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    return fake


def _onnx(tmp_path: Path, name: str, *, dtype: str = "FLOAT", errors: tuple[str, ...] = (),
          weights: dict[str, str] | None = None, spec: Any = None) -> Path:
    """A fake ONNX of component ``name`` whose float tensors are ``dtype`` (the fixed ones their own)."""
    spec = spec or SPECS[name]
    path = tmp_path / f"{name}.onnx"
    fixed = {"int64": "INT64", "int32": "INT32", "float32": "FLOAT"}
    types_ = {t.name: fixed.get(t.dtype, dtype) for t in spec.tensors}
    path.write_text(json.dumps({"inputs": {t.name: types_[t.name] for t in spec.inputs},
                                "outputs": {t.name: types_[t.name] for t in spec.outputs},
                                "errors": list(errors), "weights": weights or {}}))
    return path


def _network_flags(fake: FakeTensorRT) -> int:
    """What create_network must be given: STRONGLY_TYPED on 10.x, nothing on 11.x (ignored there)."""
    return 1 << 1 if fake.major < 11 else 0


def test_build_with_fake_tensorrt(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    cache = tmp_path / "engines" / "timing.cache"
    config = tb.TensorRTBuildConfig(precision="fp16", refittable=True, workspace_gib=2, timing_cache=cache,
                                    builder_optimization_level=1)
    info = tb.build_engine(_onnx(tmp_path, "unet", dtype="HALF"), tmp_path / "engines" / "unet.plan", spec=spec,
                           profiles=profiles, config=config)
    calls = fake_trt.calls
    assert ("create_network", _network_flags(fake_trt)) in calls
    assert [c[1] for c in calls if c[0] == "set_flag"] == [fake_trt.BuilderFlag.REFIT]  # no precision flag
    assert ("set_memory_pool_limit", fake_trt.MemoryPoolType.WORKSPACE, 2 * 2**30) in calls
    assert ("create_timing_cache", b"") in calls
    set_shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    expected = [a for p in profiles for a in tb.profile_shapes(spec, p)]
    assert set_shapes == [(n, tuple(lo), tuple(opt), tuple(hi)) for n, lo, opt, hi in expected]  # per bucket
    assert all(isinstance(d, fake_trt.Dims) for c in set_shapes for d in c[1:])
    assert cache.read_bytes() == b"timings"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["timing.cache", "unet.plan"]  # no temp files
    assert info["builder_flags"] == ["REFIT"] and info["strongly_typed"] is True
    assert info["network_flags"] == (["STRONGLY_TYPED"] if fake_trt.major < 11 else [])
    assert info["tensorrt_version"] == fake_trt.__version__ and info["tensorrt_major"] == fake_trt.major
    assert info["profiles"] == ["1024x1024", "1152x896"]
    assert info["bytes"] == (tmp_path / "engines" / "unet.plan").stat().st_size


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8", "fp32"])
def test_every_precision_builds_strongly_typed_from_its_typed_file(fake_trt: FakeTensorRT, tmp_path: Path,
                                                                   precision: str) -> None:
    """Every precision on both generations: the network strongly typed, no precision flag, the plan's I/O the
    file's (fp16 for fp16/int8/fp8: the Q/DQ nodes sit in the fp16 UNet; fp32 for fp32)."""
    spec = SPECS["unet"]
    dtype = tb.ONNX_FLOAT_TYPE[precision]
    plan = tmp_path / "unet.plan"
    info = tb.build_engine(_onnx(tmp_path, "unet", dtype=dtype), plan, spec=spec,
                           profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                           config=tb.TensorRTBuildConfig(precision=precision))
    assert ("create_network", _network_flags(fake_trt)) in fake_trt.calls
    assert not [c for c in fake_trt.calls if c[0] == "set_flag"] and info["builder_flags"] == []
    built = json.loads(plan.read_text())["dtypes"]
    assert built["sample"] == dtype and built["noise_pred"] == dtype and built["timestep"] == "FLOAT"


@pytest.mark.parametrize("component,precision", [("unet", "fp16"), ("text_encoder", "fp16"), ("unet", "int8"),
                                                 ("unet", "fp8"), ("text_encoder_2", "fp32")])
def test_a_file_of_another_precision_is_refused(fake_trt: FakeTensorRT, tmp_path: Path, component: str,
                                                precision: str) -> None:
    """What used to be a weakly typed build (an fp32 ONNX asked to build fp16 or int8 with precision flags) is
    refused naming the tensors and the export command: strongly typed, it would silently build fp32 (and the
    runtime would hand it fp16 buffers: fault 8)."""
    spec = SPECS[component]
    wrong = "FLOAT" if precision != "fp32" else "HALF"
    fix = f"sdxl-trt export --precision {precision}" if precision != "fp32" else "export it in fp32"
    with pytest.raises(BuildError, match=rf"{spec.output_names[0]} \({wrong}\).*strongly typed.*{fix}"):
        tb.build_engine(_onnx(tmp_path, component, dtype=wrong), tmp_path / "out" / "x.plan", spec=spec,
                        profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig(precision=precision))
    assert not (tmp_path / "out").exists()


def test_tensorrt_11_mode_raises_on_removed_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 11.x fake is only a proof if it lacks what 11 removed: each access raises, as the real module would."""
    fake = FakeTensorRT(11)
    for flag in PRECISION_FLAGS:
        with pytest.raises(AttributeError):
            getattr(fake.BuilderFlag, flag)
    config = fake.Builder(None).create_builder_config()
    for member in ("set_quantization_flag", "int8_calibrator", "set_calibration_profile"):
        with pytest.raises(AttributeError, match="11.4"):
            getattr(config, member)
    engine = fake.Runtime(None).deserialize_cuda_engine(json.dumps(
        {"io": {}, "dtypes": {}, "profiles": 1, "refittable": False, "weights": {}}).encode())
    for member in ("device_memory_size", "create_execution_context_without_device_memory"):
        with pytest.raises(AttributeError):
            getattr(engine, member)
    assert FakeTensorRT(10).BuilderFlag.FP16 is not None  # 10.x still has them (and the build never sets them)


def test_tensorrt_builder_builds_each_component_from_its_onnx_source(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """The builder build_engines drives: the plan is named by engine_dir/layout.py, strongly typed, the timing
    cache beside it, the source's Q/DQ facts kept."""
    from sdxl_trt.engine.options import BuildOptions
    from sdxl_trt.export.result import ExportResult

    class Source:
        def __init__(self, onnx_precision: str) -> None:
            self.export = ExportResult(model={}, model_dims=ModelDims(), pipeline={}, precision=onnx_precision)

        def onnx_for(self, component: str, precision: str) -> tuple[Path, dict[str, Any]]:
            facts = {"int8": {"calibrated": True}} if precision in ("int8", "fp8") else {}
            return _onnx(tmp_path, component, dtype=tb.ONNX_FLOAT_TYPE[precision]), facts

    out = tmp_path / "engines"
    out.mkdir()
    spec = SPECS["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    built = tb.TensorRTBuilder(Source("fp16"), BuildOptions(refittable=True)).build(
        "unet", precision="fp16", spec=spec, profiles=profiles, out=out)
    assert built.file == "unet.plan" and (out / "unet.plan").is_file()
    assert (out / "timing.cache").read_bytes() == b"timings"
    assert built.info["strongly_typed"] is True and built.info["builder_flags"] == ["REFIT"]
    for precision in ("int8", "fp8"):
        qdq = tb.TensorRTBuilder(Source("fp16"), BuildOptions()).build(
            "unet", precision=precision, spec=spec, profiles=profiles, out=out)
        assert qdq.info["int8"] == {"calibrated": True} and qdq.info["builder_flags"] == []


def test_parser_errors_name_the_nodes(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    with pytest.raises(BuildError, match=r"node 7 '/down_blocks.0/attn' \(FancyOp\): unsupported operator"):
        tb.build_engine(_onnx(tmp_path, "unet", errors=("/down_blocks.0/attn",)), tmp_path / "out" / "unet.plan",
                        spec=spec, profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig(precision="fp32"))
    assert not (tmp_path / "out").exists()


def test_failed_build_leaves_no_plan(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    fake_trt.fail_build = True
    spec = SPECS["text_encoder"]
    with pytest.raises(BuildError, match="failed to build"):
        tb.build_engine(_onnx(tmp_path, "text_encoder"), tmp_path / "out" / "text_encoder.plan", spec=spec,
                        profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig(precision="fp32"))
    assert not (tmp_path / "out").exists()


def test_fp16_safe_vae_builds_fp16(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["vae_decoder"]
    info = tb.build_engine(_onnx(tmp_path, "vae_decoder", dtype="HALF"), tmp_path / "vae.plan", spec=spec,
                           profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                           config=tb.TensorRTBuildConfig(precision="fp16", vae_fp16_safe=True))
    assert info["precision"] == "fp16" and info["strongly_typed"] is True


def _built_plan(tmp_path: Path, name: str, precision: str = "fp32", *, refittable: bool = False,
                weights: dict[str, str] | None = None) -> tuple[Path, list[Profile]]:
    spec = SPECS[name]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    plan = tmp_path / f"{name}.plan"
    tb.build_engine(_onnx(tmp_path, name, dtype=tb.ONNX_FLOAT_TYPE[precision], weights=weights), plan, spec=spec,
                    profiles=profiles, config=tb.TensorRTBuildConfig(precision=precision,  # type: ignore[arg-type]
                                                                     refittable=refittable))
    return plan, profiles


def test_load_and_run_with_fake_tensorrt(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    from sdxl_trt.runtime.tensorrt_engine import SharedDeviceMemory, TensorRTEngine

    plan, profiles = _built_plan(tmp_path, "unet")
    shared = SharedDeviceMemory("cpu")
    engine = TensorRTEngine.load(plan, SPECS["unet"], profiles, device_memory=shared, device="cpu")
    with pytest.raises(RuntimeError, match="allocate"):
        engine.run({}, {}, profile=0)
    shared.allocate()
    strategy = fake_trt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert fake_trt.calls.count(("create_execution_context", strategy)) == len(profiles) == 2
    assert [c[1] for c in fake_trt.calls if c[0] == "set_optimization_profile_async"] == [0, 1]
    assert shared.nbytes == 1000  # the largest of device_memory_size_v2 and the per-profile sizes
    assert fake_trt.calls.count(("set_device_memory", shared.address, 1000)) == 2
    assert engine.tensor_dtypes["sample"] == torch.float32 and engine.tensor_dtypes["timestep"] == torch.float32

    shapes = {"sample": (2, 4, 112, 144), "timestep": (2,), "encoder_hidden_states": (2, 77, 2048),
              "text_embeds": (2, 1280), "time_ids": (2, 6)}
    out_shapes = engine.infer_shapes(shapes, profile=1)
    assert out_shapes == {"noise_pred": (2, 4, 112, 144)}
    inputs = {n: torch.zeros(s) for n, s in shapes.items()}
    outputs = {n: torch.zeros(s) for n, s in out_shapes.items()}
    fake_trt.calls.clear()
    engine.run(inputs, outputs, profile=1)
    assert [c[0] for c in fake_trt.calls] == ["set_input_shape", "set_tensor_address"] * 5 + [
        "set_tensor_address", "execute_async_v3"]
    assert ("set_tensor_address", "noise_pred", outputs["noise_pred"].data_ptr()) in fake_trt.calls
    assert fake_trt.calls[-1] == ("execute_async_v3", 1234)
    with pytest.raises(InvalidRequestError, match="time_ids"):
        engine.run({n: t for n, t in inputs.items() if n != "time_ids"}, outputs, profile=0)
    with pytest.raises(InvalidRequestError, match="outside profile"):
        engine.infer_shapes(shapes, profile=0)


def test_engines_share_one_device_block(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    from sdxl_trt.runtime.tensorrt_engine import SharedDeviceMemory, TensorRTEngine

    shared = SharedDeviceMemory("cpu")
    seen: dict[str, tuple[int, int]] = {}
    shared.attach(100, lambda a, n: seen.__setitem__("small", (a, n)))
    shared.attach(300, lambda a, n: seen.__setitem__("large", (a, n)))
    assert seen == {} and shared.nbytes == 0  # nothing is allocated until every engine is loaded
    shared.allocate()
    assert shared.nbytes == 300 and seen == {"small": (shared.address, 300), "large": (shared.address, 300)}
    shared.attach(50, lambda a, n: seen.__setitem__("late", (a, n)))
    assert seen["late"] == (shared.address, 300)
    shared.attach(400, lambda a, n: seen.__setitem__("larger", (a, n)))
    assert shared.nbytes == 400 and set(seen.values()) == {(shared.address, 400)}  # everyone rebound

    plans = [_built_plan(tmp_path, name) for name in ("text_encoder", "unet")]
    memory = SharedDeviceMemory("cpu")
    engines = [TensorRTEngine.load(p, SPECS[n], profiles, device_memory=memory, device="cpu")
               for (p, profiles), n in zip(plans, ("text_encoder", "unet"), strict=True)]
    memory.allocate()
    assert memory.nbytes == max(e.scratch_bytes for e in engines)


def test_unloadable_plan_names_file_cause_and_rebuild(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"\x00 a plan from TensorRT 8")
    with pytest.raises(ManifestError) as e:
        TensorRTEngine.load(plan, SPECS["unet"], [], device="cpu",
                            rebuild_hint="sdxl-trt build --model sdxl-base-1.0 --out engines")
    message = str(e.value)
    assert str(plan) in message and "another TensorRT version" in message and "another GPU" in message
    assert "sdxl-trt build --model sdxl-base-1.0 --out engines" in message


def test_plan_with_other_profiles_is_refused(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    plan, profiles = _built_plan(tmp_path, "text_encoder")
    with pytest.raises(ManifestError, match="1 optimization profile"):
        TensorRTEngine.load(plan, SPECS["text_encoder"], profiles * 2, device="cpu")
    with pytest.raises(ManifestError, match="contract says"):
        TensorRTEngine.load(plan, SPECS["text_encoder_2"], profiles, device="cpu")


def test_controlnet_and_residual_unet_plans_with_fake_tensorrt(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """A --controlnet build on TensorRT: the ControlNet follows the UNet's precision rule, its profiles set every
    residual's feature-map shape (h/f of each bucket), and at run time its outputs and the residual UNet's inputs
    are bound at those shapes."""
    from sdxl_trt.export.controlnet import controlnet_residuals
    from sdxl_trt.presets import SDXL_BASE_UNET
    from sdxl_trt.runtime.tensorrt_engine import SharedDeviceMemory, TensorRTEngine

    specs = component_specs(ModelDims(controlnet_residuals=controlnet_residuals(SDXL_BASE_UNET)), ["edges"])
    assert component_precision("controlnet.edges", "fp16", backend="tensorrt") == "fp16"
    assert component_precision("controlnet.edges", "int8", backend="tensorrt") == "fp16"  # never calibrated
    for name in ("controlnet.edges", "unet"):
        spec = specs[name]
        profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
        by_name = {n: (lo, opt, hi) for n, lo, opt, hi in tb.profile_shapes(spec, profiles[1])}  # 1152x896
        if name == "unet":  # the residuals are the residual UNet's inputs, at each bucket's feature-map sides
            assert by_name["down_block_res_0"] == ([1, 320, 112, 144], [2, 320, 112, 144], [2, 320, 112, 144])
            assert by_name["mid_block_res"][2] == [2, 1280, 28, 36]
        else:
            assert by_name["controlnet_cond"][2] == [2, 3, 896, 1152]
            assert by_name["conditioning_scale"][2] == [2, 10]
        path = tmp_path / f"{name}.onnx"
        fixed = {"float32": "FLOAT", "int64": "INT64"}
        path.write_text(json.dumps({"inputs": {t.name: fixed.get(t.dtype, "HALF") for t in spec.inputs},
                                    "outputs": {t.name: "HALF" for t in spec.outputs}, "errors": []}))
        plan = tmp_path / f"{name}.plan"
        tb.build_engine(path, plan, spec=spec, profiles=profiles, config=tb.TensorRTBuildConfig(precision="fp16"))
        shared = SharedDeviceMemory("cpu")
        engine = TensorRTEngine.load(plan, spec, profiles, device_memory=shared, device="cpu")
        shared.allocate()
        shapes = {t.name: t.shape({"B": 2, "S": 77, "h": 112, "w": 144}) for t in spec.inputs}
        out_shapes = engine.infer_shapes(shapes, profile=1)
        assert out_shapes == {t.name: t.shape({"B": 2, "h": 112, "w": 144}) for t in spec.outputs}
        fake_trt.calls.clear()
        engine.run({n: torch.zeros(s) for n, s in shapes.items()}, {n: torch.zeros(s) for n, s in out_shapes.items()},
                   profile=1)
        assert [c[1] for c in fake_trt.calls if c[0] == "set_input_shape"] == spec.input_names
        wrong = {**shapes, spec.input_names[-1]: (2, 1280, 29, 36) if name == "unet" else (2, 11)}
        with pytest.raises(InvalidRequestError):
            engine.infer_shapes(wrong, profile=1)


# ------------------------------------------------------------- faults 8, 9, 10 and typed refit


def test_engine_dtypes_are_checked_against_the_arenas_at_load(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """Fault 8: an fp32 text encoder plan handed the fp16 buffers its manifest precision gives (what an INT8 build
    did) is refused at load with the rebuild command; the same plan with the buffers it has loads."""
    from sdxl_trt.contracts import io_dtype
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    spec = SPECS["text_encoder"]
    plan, profiles = _built_plan(tmp_path, "text_encoder", "fp32")

    def buffers(precision: str) -> dict[str, torch.dtype]:
        return {t.name: t.torch_dtype(io_dtype(precision, "tensorrt")) for t in spec.tensors}

    with pytest.raises(ManifestError) as e:
        TensorRTEngine.load(plan, spec, profiles, device="cpu", expected_dtypes=buffers("fp16"),
                            rebuild_hint="sdxl-trt build --model tiny --precision int8 --out engines")
    message = str(e.value)
    assert "hidden_states: plan float32, buffer float16" in message and "input_ids" not in message
    assert "sdxl-trt build --model tiny --precision int8 --out engines" in message
    engine = TensorRTEngine.load(plan, spec, profiles, device="cpu", expected_dtypes=buffers("fp32"))
    assert engine.tensor_dtypes == buffers("fp32")


@pytest.mark.parametrize("requested", ["int8", "fp8"])
def test_the_rules_precisions_and_the_typed_files_agree(fake_trt: FakeTensorRT, tmp_path: Path, requested: str) -> None:
    """What the rule gives each component of an int8/fp8 TensorRT build is what its typed file holds, so plans
    load against the arena's buffers (the same io_dtype the arena uses)."""
    from sdxl_trt.contracts import io_dtype
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    for name in ("text_encoder", "text_encoder_2", "unet", "refiner", "vae_decoder"):
        precision = component_precision(name, requested, backend="tensorrt")
        plan, profiles = _built_plan(tmp_path, name, precision)
        float_dtype = io_dtype(precision, "tensorrt")
        TensorRTEngine.load(plan, SPECS[name], profiles, device="cpu",
                            expected_dtypes={t.name: t.torch_dtype(float_dtype) for t in SPECS[name].tensors})
    assert io_dtype("int8", "onnxruntime") == torch.float32  # ONNX Runtime's INT8 UNet keeps the fp32 graph


def test_one_execution_context_per_shape_set(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """Fault 9: two graphs on one profile (1 and 2 images per batch) get two contexts, each bound to the shared
    device block and its profile; running a shape set again reuses its context; another profile its own."""
    from sdxl_trt.runtime.tensorrt_engine import SharedDeviceMemory, TensorRTEngine

    spec = SPECS["unet"]
    plan, profiles = _built_plan(tmp_path, "unet")
    memory = SharedDeviceMemory("cpu")
    engine = TensorRTEngine.load(plan, spec, profiles, device_memory=memory, device="cpu")
    memory.allocate()
    assert engine.num_contexts == len(profiles) == 2

    def run(batch: int, profile: int) -> Any:
        dims = {"B": batch, "S": 77, "h": 112 if profile else 128, "w": 144 if profile else 128}
        inputs = {t.name: torch.zeros(t.shape(dims)) for t in spec.inputs}
        outputs = {t.name: torch.zeros(t.shape(dims)) for t in spec.outputs}
        before = {id(c): len(c.calls) for c in fake_trt.contexts}
        engine.run(inputs, outputs, profile=profile)
        used = [c for c in fake_trt.contexts if len(c.calls) > before.get(id(c), 0)
                and any(call[0] == "execute_async_v3" for call in c.calls[before.get(id(c), 0):])]
        assert len(used) == 1
        return used[0]

    one, two = run(1, 1), run(2, 1)
    assert one is not two and engine.num_contexts == 3
    assert ("set_optimization_profile_async", 1, 1234) in two.calls
    assert ("set_device_memory", memory.address, memory.nbytes) in two.calls
    assert run(1, 1) is one and run(2, 1) is two and engine.num_contexts == 3
    assert run(2, 0) not in (one, two)


def test_refit_hands_each_weight_in_its_plan_dtype(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """Typed refit: an fp16 plan takes fp16 arrays; an fp32 array for it is refused naming both dtypes."""
    from sdxl_trt.runtime.tensorrt_engine import TensorRTEngine

    plan, profiles = _built_plan(tmp_path, "unet", "fp16", refittable=True, weights={"w": "HALF", "b": "FLOAT"})
    engine = TensorRTEngine.load(plan, SPECS["unet"], profiles, device="cpu")
    w, b = np.full((4, 4), 0.5, np.float16), np.ones(4, np.float32)
    engine.set_weights({"w": w, "b": b})
    refit = [c[1] for c in fake_trt.calls if c[0] == "refit_cuda_engine"][-1]
    assert refit["w"].dtype == np.float16 and refit["b"].dtype == np.float32
    with pytest.raises(InvalidRequestError, match=r"'w' .* is float16 in the plan, but the refit array is float32"):
        engine.set_weights({"w": w.astype(np.float32)})


def test_lora_switch_on_an_fp16_plan_refits_fp16_from_fp32_base_and_recaptures(
        fake_trt: FakeTensorRT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Items 5 and 10: the switch adds the delta to the base in fp32 and rounds once to the weight map's fp16 (the
    plan's dtype), refits, and drops the graphs that enqueue the refit engine (they are captured again; other
    graphs stay)."""
    from sdxl_trt.lora import Lora
    from sdxl_trt.lora.weight_map import ComponentWeights, WeightLocation
    from sdxl_trt.runtime.graphs import CudaGraphs
    from sdxl_trt.runtime.lora import LoraSwitcher

    class Engine:
        backend = "tensorrt"

        def __init__(self) -> None:
            self.pushed: list[dict[str, np.ndarray]] = []

        def set_weights(self, arrays: dict[str, np.ndarray], *, rebuild: str) -> None:
            self.pushed.append(arrays)

    graphs = CudaGraphs(torch.device("cpu"), enabled=False)
    step, text = ("step", "unet", "64x64", 1, True, 1, False, "euler", ()), ("text", "text_encoder", 2)
    graphs.graphs.update({step: "graph-a", text: "graph-b"})
    engine = Engine()
    ctx = types.SimpleNamespace(engines={"unet": engine}, graphs=graphs,
                                manifest=types.SimpleNamespace(rebuild_hint=lambda d: "sdxl-trt build ..."))
    switcher = LoraSwitcher.__new__(LoraSwitcher)
    switcher.ctx, switcher.directory = ctx, Path(".")
    cw = ComponentWeights(weights={"proj.weight": WeightLocation(shape=(2, 2), torch="proj.weight", onnx="W",
                                                                 onnx_dtype="float16")})
    base = {"proj.weight": torch.tensor([[1.0, 2.0], [3.0, 1e-4]], dtype=torch.float16).float()}
    delta = torch.full((2, 2), 1e-4)
    monkeypatch.setattr("sdxl_trt.runtime.lora.onnx_weight_updates",
                        lambda cw, component, base, new: {"W": base["proj.weight"] + delta})
    switcher._push("unet", cw, base, [(Lora(path="x", sha256="", format="", layers={}), 1.0)], key=(("x", 1.0),))
    (arrays,) = engine.pushed
    assert arrays["W"].dtype == np.float16
    expected = (base["proj.weight"] + delta).numpy().astype(np.float16)  # rounded once, from fp32
    assert np.array_equal(arrays["W"], expected)
    assert step not in graphs.graphs and text in graphs.graphs


def test_invalidated_graphs_are_captured_again_after_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault 10: after a refit, the dropped graph is captured again at its next use even though warm-up is over;
    a key never captured still runs eagerly."""
    from sdxl_trt.runtime.graphs import CudaGraphs

    graphs = CudaGraphs(torch.device("cpu"), enabled=False)
    graphs.enabled = True  # the capture itself is CUDA's; what is tested is which keys (re)capture
    captured: list[Any] = []
    monkeypatch.setattr(graphs, "_capture", lambda key, work, mutable: captured.append(key)
                        or graphs.graphs.setdefault(key, f"graph-{len(captured)}"))
    from sdxl_trt.buckets import Bucket
    from sdxl_trt.step_shape import GraphKey

    step = GraphKey("unet", Bucket(64, 64), 1, True, 1, False, "euler", ())  # the key the runtime captures under
    controlled = GraphKey("unet", Bucket(64, 64), 1, True, 1, False, "euler", (("controlnet.edges", False),))
    text = ("text", "text_encoder_2", 2)
    assert graphs.get(step, lambda: None, graph_safe=True, mutable=()) == "graph-1"
    assert graphs.get(text, lambda: None, graph_safe=True, mutable=()) == "graph-2"
    assert graphs.get(controlled, lambda: None, graph_safe=True, mutable=()) == "graph-3"
    graphs.forbid_capture()
    assert graphs.invalidate({"controlnet.edges"}) == [controlled]  # a ControlNet's refit: its steps only
    assert graphs.invalidate({"unet"}) == [step]
    assert graphs.get(step, lambda: None, graph_safe=True, mutable=()) == "graph-4"  # re-captured
    assert graphs.get(text, lambda: None, graph_safe=True, mutable=()) == "graph-2"  # untouched
    assert graphs.get(("text", "text_encoder", 1), lambda: None, graph_safe=True, mutable=()) is None
    assert captured == [step, text, controlled, step]


@pytest.mark.parametrize("built,here,refused", [("10.13.0.35", "11.4.0.9", True), ("11.4.0.9", "10.13.0.35", True),
                                                ("10.8.0.43", "10.13.0.35", False), ("11.0.0.1", "11.4.0.9", False)])
def test_manifest_refuses_plans_of_another_tensorrt_major(tmp_path: Path, built: str, here: str, refused: bool) -> None:
    """A 10.x plan on 11.x (or back) is refused with the rebuild command; minor versions of one major load."""
    from sdxl_trt.engine_dir.manifest import Manifest, check_engine_dir

    gpu = {"type": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0"}
    manifest = Manifest(backend="tensorrt", precision="fp8", model={"name": "sdxl-base-1.0"}, model_dims={},
                        buckets=["1024x1024"], max_batch=1, max_prompt_chunks=3, profile_mode="per-bucket",
                        pipeline={}, versions={"tensorrt": built}, device=gpu,
                        build_command="sdxl-trt build --model sdxl-base-1.0 --precision fp8 --out engines")
    check = lambda: check_engine_dir(tmp_path, manifest, device=gpu, versions={"tensorrt": here},  # noqa: E731
                                     check_model_source=False)
    if not refused:
        check()
        return
    with pytest.raises(ManifestError, match=rf"TensorRT {built}, this machine has {here}: plans do not load across "
                                            r"major versions. Rebuild: sdxl-trt build --model sdxl-base-1.0"):
        check()


def test_shallow_unet_builds_per_bucket_profiles_with_the_feature_at_h_f_w_f(fake_trt: FakeTensorRT,
                                                                           tmp_path: Path) -> None:
    """A ``--deepcache`` build's shallow UNet goes through the same TensorRT build as the UNet: one profile per
    bucket, its ``deepcache_feature`` input at the branch's downscale of each bucket's latent (SDXL's branch 3:
    640 channels at h/2, w/2), batch range shared with the other inputs; the full UNet's feature outputs."""
    from types import SimpleNamespace

    from sdxl_trt.contracts import DEEPCACHE_FEATURE
    from sdxl_trt.export.deepcache import deepcache_features

    sdxl = SimpleNamespace(block_out_channels=[320, 640, 1280], layers_per_block=2)
    specs = component_specs(ModelDims(deepcache_features=deepcache_features(sdxl, (0, 3))))
    assert [t.name for t in specs["unet"].outputs] == ["noise_pred", "deepcache_feature_0", "deepcache_feature_3"]
    spec = specs["unet_shallow.3"]
    assert spec.input_names == [*SPECS["unet"].input_names, DEEPCACHE_FEATURE]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=2)
    tb.build_engine(_onnx(tmp_path, spec.name, dtype="HALF", spec=spec), tmp_path / "unet_shallow.3.plan", spec=spec, profiles=profiles,
                    config=tb.TensorRTBuildConfig(precision="fp16"))
    feature = [c[2:] for c in fake_trt.calls if c[0] == "set_shape" and c[1] == DEEPCACHE_FEATURE]
    sample = [c[2:] for c in fake_trt.calls if c[0] == "set_shape" and c[1] == "sample"]
    assert len(feature) == len(BUCKETS)
    for (lo, opt, hi), (s_lo, s_opt, s_hi) in zip(feature, sample, strict=True):
        for f, s in ((lo, s_lo), (opt, s_opt), (hi, s_hi)):
            assert tuple(f) == (s[0], 640, s[2] // 2, s[3] // 2)
    assert [tuple(f[2]) for f in feature] == [(4, 640, 64, 64), (4, 640, 56, 72)]  # 1024x1024, 1152x896

