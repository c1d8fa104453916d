"""The TensorRT backend without TensorRT: type-checked against the mended stubs, logic tested in pure Python.

* mypy runs on engine/tensorrt_backend.py and runtime/tensorrt_engine.py against tensorrt-stubs (mended by
  tests/support/mend_tensorrt_stubs.py) as its own step of `.ci/run` (tests/support/typecheck.py), and must
  pass; on a deliberately wrong snippet it must fail with the expected errors, which proves the check is not
  vacuous.
* The pure parts (flag mapping, component precision, profile translation, install errors) are tested
  directly; build and load are exercised up to the library boundary with a small fake ``tensorrt`` module
  whose methods record their calls.
"""

from __future__ import annotations

import enum
import importlib.util
import itertools
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Case:
    precision: str
    strongly_typed: bool | None
    builder: list[str]
    network: list[str]


PRECISION_CASES = [
    Case("fp16", None, ["FP16"], []),
    Case("fp16", False, ["FP16"], []),
    Case("fp16", True, [], ["STRONGLY_TYPED"]),  # the fp16 ONNX decides; FP16 would be rejected
    Case("fp32", None, [], []),
    Case("fp32", False, [], []),
    Case("fp32", True, [], ["STRONGLY_TYPED"]),
    Case("int8", None, ["FP16", "INT8"], []),  # Q/DQ layers INT8, the unquantized rest FP16
    Case("int8", False, ["FP16", "INT8"], []),
    Case("int8", True, [], ["STRONGLY_TYPED"]),  # an fp16 Q/DQ ONNX decides every dtype
]


@pytest.mark.parametrize("case", PRECISION_CASES, ids=lambda c: f"{c.precision}-typed={c.strongly_typed}")
def test_flag_names_for_precision(case: Case) -> None:
    names = tb.flag_names(tb.TensorRTBuildConfig(precision=case.precision, strongly_typed=case.strongly_typed))
    assert names == tb.FlagNames(case.builder, case.network)


@pytest.mark.parametrize("precision,typed,refit,stream", itertools.product(
    ["fp16", "fp32", "int8"], [None, True, False], [False, True, "identical"], [False, True]))
def test_flag_names_every_combination(precision: str, typed: bool | None, refit: Any, stream: bool) -> None:
    kwargs = dict(precision=precision, strongly_typed=typed, refittable=refit, weight_streaming=stream)
    if typed is False and stream:
        with pytest.raises(BuildError, match="strongly typed"):
            tb.TensorRTBuildConfig(**kwargs)
        return
    builder, network = tb.flag_names(tb.TensorRTBuildConfig(**kwargs))
    assert set(builder) <= set(tb.BUILDER_FLAG_NAMES) and set(network) <= set(tb.NETWORK_FLAG_NAMES)
    strongly = typed is True or (typed is None and stream)
    assert ("STRONGLY_TYPED" in network) == strongly
    if strongly:
        assert not {"FP16", "INT8", "BF16", "FP8"} & set(builder)
    assert ("FP16" in builder) == (precision in ("fp16", "int8") and not strongly)
    assert ("INT8" in builder) == (precision == "int8" and not strongly)
    assert ("REFIT" in builder) == (refit is True)
    assert ("REFIT_IDENTICAL" in builder) == (refit == "identical")
    assert ("WEIGHT_STREAMING" in builder) == stream


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
    ("refiner", "int8", False, "fp16"),  # only the base UNet is calibrated
    ("text_encoder", "int8", False, "fp16"),
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


def test_the_rules_int8_text_encoder_builds_fp16_not_strongly_typed() -> None:
    cfg = tb.TensorRTBuildConfig(precision=component_precision("text_encoder", "int8", backend="tensorrt"))
    assert cfg.precision == "fp16" and tb.flag_names(cfg) == tb.FlagNames(["FP16"], [])
    vae = tb.TensorRTBuildConfig(precision=component_precision("vae_decoder", "fp16", backend="tensorrt"))
    assert vae.precision == "fp32" and tb.flag_names(vae) == tb.FlagNames([], [])


def test_a_weakly_typed_fp16_vae_is_refused_not_rewritten(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """build_engine builds the precision it is given (the rule is applied once, by the build); an fp16 VAE
    without strong typing would get the FP16 flag and NaN images, so it is refused with the fix."""
    spec = SPECS["vae_decoder"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    with pytest.raises(BuildError, match=r"weakly typed fp16 VAE.*precision='fp32'"):
        tb.build_engine(_onnx(tmp_path, "vae_decoder"), tmp_path / "vae.plan", spec=spec, profiles=profiles,
                        config=tb.TensorRTBuildConfig(precision="fp16"))
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
    ("8.6.1", True, "written for TensorRT 10"),
    ("10.13.0.35", False, "no CUDA GPU"),
])
def test_tensorrt_status_reasons(monkeypatch: pytest.MonkeyPatch, version: str, gpu: bool, expected: str) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version, Builder=object))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    ok, reason = tb.tensorrt_status()
    assert not ok and expected in reason


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


class FakeTensorRT(types.ModuleType):
    """Just enough of TensorRT 10's Python API (same names and signatures as the stubs) to record calls.

    The "ONNX" file is JSON: ``{"inputs": {name: dtype}, "outputs": [...], "errors": [...]}``; the "plan" is
    JSON too, so a built plan loads in the fake runtime. ``fail_build`` makes the build return None.
    """

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.13.0.35"
        self.calls: list[tuple[Any, ...]] = []
        self.fail_build = False
        fake = self

        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass

        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(tb.BUILDER_FLAG_NAMES)})
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                          {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        self.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
        self.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64 INT8 UINT8 BOOL")
        self.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
        self.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                                            "STATIC ON_PROFILE_CHANGE USER_MANAGED")

        class Dims(tuple):
            pass

        self.Dims = Dims

        class Recorder:
            def __getattr__(self, name: str) -> Any:
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
                self.network.outputs = [Tensor(n) for n in onnx["outputs"]]
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
                return Network()

            create_builder_config = lambda self: BuilderConfig()  # noqa: E731
            create_optimization_profile = lambda self: Recorder()  # noqa: E731

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                if fake.fail_build:
                    return None
                io = {t.name: "INPUT" for t in network.inputs} | {t.name: "OUTPUT" for t in network.outputs}
                return json.dumps({"io": io, "profiles": len(config.profiles)}).encode()

        class Context(Recorder):
            pass

        class Engine:
            def __init__(self, plan: dict[str, Any]) -> None:
                self.io, self.num_optimization_profiles = plan["io"], plan["profiles"]
                self.num_io_tensors = len(self.io)
                self.device_memory_size_v2 = plan.get("memory", 1000)

            get_tensor_name = lambda self, i: list(self.io)[i]  # noqa: E731
            get_tensor_mode = lambda self, n: fake.TensorIOMode[self.io[n]]  # noqa: E731
            get_tensor_dtype = lambda self, n: fake.DataType.INT64 if n == "input_ids" else fake.DataType.HALF  # noqa: E731
            get_device_memory_size_for_profile_v2 = lambda self, i: 100 * (i + 1)  # noqa: E731

            def create_execution_context(self, strategy: Any) -> Context:
                fake.calls.append(("create_execution_context", strategy))
                return Context()

        class Runtime:
            def __init__(self, logger: ILogger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                try:
                    return Engine(json.loads(data))
                except ValueError:
                    return None  # what TensorRT does for a plan of another version or GPU

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


class FakeStream:
    cuda_stream = 1234

    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    return fake


def _onnx(tmp_path: Path, name: str, *, dtype: str = "FLOAT", errors: tuple[str, ...] = (), spec: Any = None) -> Path:
    spec = spec or SPECS[name]
    path = tmp_path / f"{name}.onnx"
    inputs = {t.name: ("INT64" if t.dtype == "int64" else dtype) for t in spec.inputs}
    path.write_text(json.dumps({"inputs": inputs, "outputs": spec.output_names, "errors": list(errors)}))
    return path


def test_build_with_fake_tensorrt(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    cache = tmp_path / "engines" / "timing.cache"
    config = tb.TensorRTBuildConfig(precision="fp16", refittable=True, workspace_gib=2, timing_cache=cache,
                                    builder_optimization_level=1)
    info = tb.build_engine(_onnx(tmp_path, "unet"), tmp_path / "engines" / "unet.plan", spec=spec,
                           profiles=profiles, config=config)
    calls = fake_trt.calls
    assert ("create_network", 0) in calls
    assert ("set_flag", fake_trt.BuilderFlag.FP16) in calls and ("set_flag", fake_trt.BuilderFlag.REFIT) in calls
    assert ("set_memory_pool_limit", fake_trt.MemoryPoolType.WORKSPACE, 2 * 2**30) in calls
    assert ("create_timing_cache", b"") in calls
    set_shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    expected = [a for p in profiles for a in tb.profile_shapes(spec, p)]
    assert set_shapes == [(n, tuple(lo), tuple(opt), tuple(hi)) for n, lo, opt, hi in expected]
    assert all(isinstance(d, fake_trt.Dims) for c in set_shapes for d in c[1:])
    assert cache.read_bytes() == b"timings"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["timing.cache", "unet.plan"]  # no temp files
    assert info["builder_flags"] == ["FP16", "REFIT"] and info["network_flags"] == []
    assert info["tensorrt_version"] == "10.13.0.35" and info["profiles"] == ["1024x1024", "1152x896"]
    assert info["bytes"] == (tmp_path / "engines" / "unet.plan").stat().st_size


def test_tensorrt_builder_builds_each_component_from_its_onnx_source(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """The builder build_engines drives: the plan is named by engine_dir/layout.py, strongly typed when the export
    is fp16 ONNX (the file decides dtypes), the timing cache beside it, the source's INT8 facts kept."""
    from sdxl_trt.engine.options import BuildOptions
    from sdxl_trt.export.result import ExportResult

    class Source:
        def __init__(self, onnx_precision: str) -> None:
            self.export = ExportResult(model={}, model_dims=ModelDims(), pipeline={}, precision=onnx_precision)

        def onnx_for(self, component: str, precision: str) -> tuple[Path, dict[str, Any]]:
            return _onnx(tmp_path, component), ({"int8": {"calibrated": True}} if precision == "int8" else {})

    out = tmp_path / "engines"
    out.mkdir()
    spec = SPECS["unet"]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    built = tb.TensorRTBuilder(Source("fp16"), BuildOptions(refittable=True)).build(
        "unet", precision="fp16", spec=spec, profiles=profiles, out=out)
    assert built.file == "unet.plan" and (out / "unet.plan").is_file()
    assert (out / "timing.cache").read_bytes() == b"timings"
    assert built.info["network_flags"] == ["STRONGLY_TYPED"] and built.info["builder_flags"] == ["REFIT"]
    int8 = tb.TensorRTBuilder(Source("fp32"), BuildOptions()).build(
        "unet", precision="int8", spec=spec, profiles=profiles, out=out)
    assert int8.info["int8"] == {"calibrated": True}
    assert int8.info["builder_flags"] == ["FP16", "INT8"] and int8.info["network_flags"] == []


def test_int8_build_is_weakly_typed_with_fp16_and_int8(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    tb.build_engine(_onnx(tmp_path, "unet"), tmp_path / "unet.plan", spec=spec,
                    profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                    config=tb.TensorRTBuildConfig(precision="int8"))
    assert ("create_network", 0) in fake_trt.calls
    flags = {c[1] for c in fake_trt.calls if c[0] == "set_flag"}
    assert flags == {fake_trt.BuilderFlag.FP16, fake_trt.BuilderFlag.INT8}


def test_int8_strongly_typed_when_asked(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    tb.build_engine(_onnx(tmp_path, "unet", dtype="HALF"), tmp_path / "unet.plan", spec=spec,
                    profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                    config=tb.TensorRTBuildConfig(precision="int8", strongly_typed=True))
    assert ("create_network", 1 << 1) in fake_trt.calls
    assert not [c for c in fake_trt.calls if c[0] == "set_flag"]


def test_parser_errors_name_the_nodes(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["unet"]
    with pytest.raises(BuildError, match=r"node 7 '/down_blocks.0/attn' \(FancyOp\): unsupported operator"):
        tb.build_engine(_onnx(tmp_path, "unet", errors=("/down_blocks.0/attn",)), tmp_path / "out" / "unet.plan",
                        spec=spec, profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig())
    assert not (tmp_path / "out").exists()


def test_failed_build_leaves_no_plan(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    fake_trt.fail_build = True
    spec = SPECS["text_encoder"]
    with pytest.raises(BuildError, match="failed to build"):
        tb.build_engine(_onnx(tmp_path, "text_encoder"), tmp_path / "out" / "text_encoder.plan", spec=spec,
                        profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1),
                        config=tb.TensorRTBuildConfig())
    assert not (tmp_path / "out").exists()


def test_strongly_typed_fp16_vae_is_refused(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    spec = SPECS["vae_decoder"]
    kwargs: dict[str, Any] = dict(spec=spec, profiles=component_profiles(spec, buckets=BUCKETS, max_batch=1))
    onnx = _onnx(tmp_path, "vae_decoder", dtype="HALF")
    with pytest.raises(BuildError, match="overflow to NaN"):
        tb.build_engine(onnx, tmp_path / "vae.plan", config=tb.TensorRTBuildConfig(strongly_typed=True), **kwargs)
    info = tb.build_engine(onnx, tmp_path / "vae.plan",
                           config=tb.TensorRTBuildConfig(strongly_typed=True, vae_fp16_safe=True), **kwargs)
    assert info["network_flags"] == ["STRONGLY_TYPED"]


def _built_plan(tmp_path: Path, name: str) -> tuple[Path, list[Profile]]:
    spec = SPECS[name]
    profiles = component_profiles(spec, buckets=BUCKETS, max_batch=1)
    plan = tmp_path / f"{name}.plan"
    tb.build_engine(_onnx(tmp_path, name), plan, spec=spec, profiles=profiles, config=tb.TensorRTBuildConfig())
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
    assert engine.tensor_dtypes["sample"] == torch.float16

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
        path.write_text(json.dumps({"inputs": {t.name: "FLOAT" for t in spec.inputs}, "outputs": spec.output_names,
                                    "errors": []}))
        plan = tmp_path / f"{name}.plan"
        tb.build_engine(path, plan, spec=spec, profiles=profiles, config=tb.TensorRTBuildConfig())
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
    tb.build_engine(_onnx(tmp_path, spec.name, spec=spec), tmp_path / "unet_shallow.3.plan", spec=spec, profiles=profiles,
                    config=tb.TensorRTBuildConfig(precision="fp16"))
    feature = [c[2:] for c in fake_trt.calls if c[0] == "set_shape" and c[1] == DEEPCACHE_FEATURE]
    sample = [c[2:] for c in fake_trt.calls if c[0] == "set_shape" and c[1] == "sample"]
    assert len(feature) == len(BUCKETS)
    for (lo, opt, hi), (s_lo, s_opt, s_hi) in zip(feature, sample, strict=True):
        for f, s in ((lo, s_lo), (opt, s_opt), (hi, s_hi)):
            assert tuple(f) == (s[0], 640, s[2] // 2, s[3] // 2)
    assert [tuple(f[2]) for f in feature] == [(4, 640, 64, 64), (4, 640, 56, 72)]  # 1024x1024, 1152x896

