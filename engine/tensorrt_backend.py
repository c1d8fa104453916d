"""TensorRT build side: one ONNX file -> one serialized plan, written to the Python API of TensorRT 10.8+
and 11.x alike (type-checked against both: mypy.ini, tests/test_tensorrt.py).

TensorRT is an optional extra (``pip install 'sdxl-trt[tensorrt]'``, NVIDIA GPU and driver). It is imported
only inside the functions that need it, so the pure parts (build config, flag mapping, profile translation)
import and test anywhere. :class:`TensorRTBuilder` is this backend's :class:`~.builder.Builder`. Rules of this
module:

* ``require_tensorrt()`` runs before anything is written: a machine without TensorRT gets one clear
  error and no half-written files.
* A plan is built in the precision its config names: which precision a component gets is the one rule in
  ``contracts.component_precision``, applied by the caller (``build_engines``), never again here.
* Every network is strongly typed: the tensor types in the ONNX decide every kernel's precision (fp16 files,
  INT8/FP8 as Q/DQ nodes in the fp16 UNet). TensorRT 11 has nothing else; 10.x gets ``STRONGLY_TYPED`` set.
  No precision flag (``FP16``, ``INT8``, ``FP8``, ...) is ever touched: 11 removed them. The file's float I/O
  dtypes are checked against the precision asked for, so an fp32 ONNX never silently builds an "fp16" plan.
* Which builder and network flags a config means is decided by the pure :func:`flag_names`; the build
  only translates names to enums.
* The plan and the timing cache are written atomically (``sdxl_trt.files``).
* Progress goes to ``logging``; TensorRT's own messages are forwarded there too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

from sdxl_trt.contracts import FP8_MIN_COMPUTE_CAPABILITY, ComponentSpec, family_of
from sdxl_trt.engine_dir.layout import TIMING_CACHE_NAME, engine_file_name
from sdxl_trt.engine_dir.profiles import Profile, validate_shapes
from sdxl_trt.errors import BackendUnavailableError, BuildError, ProfileError
from sdxl_trt.files import write_atomic
from sdxl_trt.tensorrt_support import (
    INSTALL_HINT,
    logger_bridge,
    needs_strongly_typed_flag,
    tensorrt_major,
    tensorrt_status,
)

from .builder import BuiltEngine, OnnxFiles
from .options import BuildOptions

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

Precision = Literal["fp16", "int8", "fp8", "fp32"]

BUILDER_FLAG_NAMES = ("REFIT", "REFIT_IDENTICAL", "WEIGHT_STREAMING")
"""Every ``trt.BuilderFlag`` name :func:`flag_names` can return: none is a precision flag (11 removed them)."""
NETWORK_FLAG_NAMES = ("STRONGLY_TYPED",)
"""Every ``trt.NetworkDefinitionCreationFlag`` name :func:`flag_names` can return (10.x only)."""
ONNX_FLOAT_TYPE: dict[str, str] = {"fp32": "FLOAT", "fp16": "HALF", "int8": "HALF", "fp8": "HALF"}
"""The ``trt.DataType`` name of a strongly typed network's float inputs and outputs, per precision: fp16 files
for fp16, and INT8/FP8 Q/DQ nodes in the fp16 UNet (``contracts.io_dtype(p, "tensorrt")``)."""
MAX_OPTIMIZATION_LEVEL = 5


def require_tensorrt() -> None:
    """Raise :class:`BackendUnavailableError` saying how to install TensorRT unless it can build here."""
    ok, reason = tensorrt_status()
    if not ok:
        raise BackendUnavailableError(f"the TensorRT backend is unavailable: {reason}; {INSTALL_HINT}")


@dataclass(frozen=True)
class TensorRTBuildConfig:
    """How to build a plan. Saved beside the engine (``to_json``) so a rebuild can repeat it."""

    precision: Precision = "fp16"
    """What the ONNX is, checked at parse (the network is strongly typed, so the file decides every kernel):
    fp16: an fp16 file, FP16 tensor-core kernels, about 2x fp32's speed and half its plan size (the VAE stays an
    fp32 file unless ``vae_fp16_safe``: ``contracts.component_precision``). int8 / fp8: the fp16 UNet with
    calibrated Q/DQ nodes (engine/int8/): the quantized convolutions and linears run INT8 / FP8 E4M3, the
    remainder fp16 (fp8 needs compute capability 8.9+). fp32: the slowest; reference numerics."""

    workspace_gib: float | None = None
    """Cap on the builder's workspace pool (``MemoryPoolType.WORKSPACE``). None: TensorRT's default (the
    whole device). A cap lets builds share a GPU but can rule out the fastest tactics."""

    timing_cache: Path | None = None
    """Tactic timings, loaded before and saved after each build: cuts a UNet rebuild from tens of minutes
    to a few. A cache from another GPU or TensorRT version is dropped with a warning, never trusted."""

    refittable: bool | Literal["identical"] = False
    """True (``REFIT``): all weights stay in the plan and any can be replaced later with a Refitter, e.g.
    a fused LoRA without a rebuild; costs some speed (no constant folding across weights).
    "identical" (``REFIT_IDENTICAL``): refit only with the very weights built with (weight-stripped
    plans); near full speed but takes no LoRA. False: fastest, weights frozen."""

    weight_streaming: bool = False
    """``WEIGHT_STREAMING``: the runtime may keep part of the weights in host memory
    (``weight_streaming_budget_v2``), fitting a UNet into less GPU memory at the price of host-to-device
    traffic on every step. Needs a strongly typed network."""

    builder_optimization_level: int | None = None
    """0..5 (TensorRT's default 3). Higher tries more tactics: much longer builds for a few percent at
    best; 0-1 build fast for tests."""

    vae_fp16_safe: bool = False
    """The VAE ONNX is an fp16-safe VAE (e.g. sdxl-vae-fp16-fix), so fp16 is allowed for it. Otherwise the
    VAE is built in fp32: about 2x its fp16 time and memory, but SDXL's VAE overflows to NaN in fp16."""

    def __post_init__(self) -> None:
        if self.precision not in get_args(Precision):
            raise BuildError(f"precision must be one of {get_args(Precision)}, got {self.precision!r}")
        if self.refittable not in (False, True, "identical"):
            raise BuildError(f"refittable must be False, True (any weights, e.g. LoRA) or 'identical', got {self.refittable!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise BuildError(f"workspace_gib must be positive (GiB) or None for TensorRT's default, got {self.workspace_gib}")
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
            raise BuildError(f"builder_optimization_level must be 0..{MAX_OPTIMIZATION_LEVEL} (default 3), got {level}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["timing_cache"] = None if self.timing_cache is None else str(self.timing_cache)
        return out


class FlagNames(NamedTuple):
    builder: list[str]  # trt.BuilderFlag names
    network: list[str]  # trt.NetworkDefinitionCreationFlag names


def flag_names(config: TensorRTBuildConfig, *, strongly_typed_flag: bool = True) -> FlagNames:
    """The TensorRT flags a (per-component) config means, by name. Pure: testable without TensorRT.

    ``strongly_typed_flag``: whether this TensorRT needs ``STRONGLY_TYPED`` to build a strongly typed network
    (10.x yes; 11.x no: every network is, and the flag is deprecated and ignored). Precision is never a flag."""
    builder: list[str] = []
    network: list[str] = ["STRONGLY_TYPED"] if strongly_typed_flag else []
    if config.refittable == "identical":
        builder.append("REFIT_IDENTICAL")
    elif config.refittable is True:
        builder.append("REFIT")
    if config.weight_streaming:
        builder.append("WEIGHT_STREAMING")
    return FlagNames(builder, network)


def profile_shapes(spec: ComponentSpec, profile: Profile) -> list[tuple[str, list[int], list[int], list[int]]]:
    """``IOptimizationProfile.set_shape`` arguments ``(input name, min, opt, max)``, in contract order.

    The shapes are checked against the contract first (ProfileError names the tensors that disagree).
    """
    extra = sorted(set(profile.shapes) - set(spec.input_names))
    if extra:
        raise ProfileError(f"{spec.name}: profile {profile.name!r} has shapes for unknown input(s) {extra}; "
                           f"the contract's inputs are {spec.input_names}")
    validate_shapes(spec, profile.shapes)
    out = []
    for name in spec.input_names:
        lo, opt, hi = profile.shapes[name]
        out.append((name, list(lo), list(opt), list(hi)))
    return out


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    spec: ComponentSpec,
    profiles: Sequence[Profile],
    config: TensorRTBuildConfig,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` (external data next to it is found); return build info."""
    require_tensorrt()
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise BuildError(f"{spec.name}: ONNX file {onnx_path} does not exist; export the component first")
    if not profiles:
        raise ProfileError(f"{spec.name}: no optimization profiles given; TensorRT needs at least one")
    shapes = [profile_shapes(spec, p) for p in profiles]
    vae = family_of(spec.name) == "vae"
    if vae and config.precision != "fp32" and not config.vae_fp16_safe:
        raise BuildError(
            f"{spec.name}: a {config.precision} VAE would run in fp16 and overflow to NaN; build it with "
            "precision='fp32' from an fp32 VAE ONNX (contracts.component_precision picks it), or set "
            "vae_fp16_safe=True for an fp16-safe VAE (e.g. sdxl-vae-fp16-fix)"
        )
    flags = flag_names(config, strongly_typed_flag=needs_strongly_typed_flag(trt))

    trt_logger = logger_bridge(log)
    builder = trt.Builder(trt_logger)
    network_flags = 0
    for name in flags.network:
        network_flags |= 1 << int(_network_flags()[name])
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    log.info("%s: parsing %s", spec.name, onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(f"{spec.name}: TensorRT could not parse {onnx_path}:\n{_parser_errors(parser)}")
    _check_network_io(network, spec, onnx_path)
    _check_network_dtypes(network, spec, onnx_path, config.precision)

    builder_config = builder.create_builder_config()
    table = _builder_flags()
    for name in flags.builder:
        builder_config.set_flag(table[name])
    if config.workspace_gib is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
    if config.builder_optimization_level is not None:
        builder_config.builder_optimization_level = config.builder_optimization_level
    for profile, args in zip(profiles, shapes, strict=True):
        opt_profile = builder.create_optimization_profile()
        for name, lo, opt, hi in args:
            opt_profile.set_shape(name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
        if builder_config.add_optimization_profile(opt_profile) < 0:
            raise BuildError(f"{spec.name}: TensorRT rejected optimization profile {profile.name!r}: {args}")
    if config.timing_cache is not None:
        _attach_timing_cache(builder_config, config.timing_cache)

    log.info("%s: building %s plan (builder flags %s, network flags %s, %d profile(s))",
             spec.name, config.precision, flags.builder, flags.network, len(profiles))
    start = time.perf_counter()
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, builder_config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise BuildError(
            f"{spec.name}: TensorRT failed to build {onnx_path} after {seconds:.0f} s; its errors are logged above "
            f"(logger {__name__}). Common fixes: a larger workspace_gib, narrower profiles, or another precision"
        )
    if config.timing_cache is not None:
        write_atomic(config.timing_cache, memoryview(builder_config.get_timing_cache().serialize()))
    log.info("%s: built in %.1f s; writing %s", spec.name, seconds, plan_path)
    write_atomic(plan_path, memoryview(serialized))
    return {
        "component": spec.name,
        "plan": str(plan_path),
        "seconds": round(seconds, 2),
        "bytes": plan_path.stat().st_size,
        "precision": config.precision,
        "strongly_typed": True,
        "builder_flags": flags.builder,
        "network_flags": flags.network,
        "profiles": [p.name for p in profiles],
        "tensorrt_version": trt.__version__,
        "tensorrt_major": tensorrt_major(trt),
        "config": config.to_json(),
    }


def _builder_flags() -> dict[str, trt.BuilderFlag]:
    import tensorrt as trt

    return {
        "REFIT": trt.BuilderFlag.REFIT,
        "REFIT_IDENTICAL": trt.BuilderFlag.REFIT_IDENTICAL,
        "WEIGHT_STREAMING": trt.BuilderFlag.WEIGHT_STREAMING,
    }


def _network_flags() -> dict[str, trt.NetworkDefinitionCreationFlag]:
    import tensorrt as trt

    return {"STRONGLY_TYPED": trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED}


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        error: trt.ParserError = parser.get_error(i)
        lines.append(f"  node {error.node()} {error.node_name()!r} ({error.node_operator()}): {error.desc()}")
    return "\n".join(lines) or "  (the parser reported no details)"


def _check_network_io(network: trt.INetworkDefinition, spec: ComponentSpec, onnx_path: Path) -> None:
    """The ONNX's inputs and outputs must be the contract's, or the runtime would bind the wrong buffers."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    if inputs != set(spec.input_names) or outputs != set(spec.output_names):
        raise BuildError(
            f"{spec.name}: {onnx_path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, but the contract "
            f"says {spec.input_names} and {spec.output_names}; re-export the component"
        )


def _check_network_dtypes(network: trt.INetworkDefinition, spec: ComponentSpec, onnx_path: Path,
                          precision: str) -> None:
    """A strongly typed network runs in the file's types, so the file must be the precision asked for: an fp32
    ONNX asked to build fp16 would build an fp32 plan (what a weak FP16 flag used to paper over, and 11 refuses),
    and the runtime would hand it fp16 buffers. Fixed-type tensors (token ids, the fp32 timestep) are the
    contract's own."""
    import tensorrt as trt

    want = ONNX_FLOAT_TYPE[precision]
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    wrong = []
    for t in tensors:
        if spec.tensor(t.name).dtype != "float":
            continue
        if t.dtype != getattr(trt.DataType, want):
            wrong.append(f"{t.name} ({t.dtype.name})")
    if wrong:
        fix = (f"export it with `sdxl-trt export --precision {precision}`" if precision != "fp32"
               else "export it in fp32")
        vae = " (an SDXL VAE overflows in fp16 unless vae_fp16_safe)" if family_of(spec.name) == "vae" else ""
        raise BuildError(
            f"{spec.name}: {onnx_path} has float tensors {wrong} but a {precision} build needs {want}: TensorRT "
            f"builds strongly typed networks only (the ONNX's types are the kernels' precision){vae}; {fix}"
        )


def check_fp8_device(device_name: str, capability: tuple[int, int]) -> None:
    """Refuse FP8 on a GPU without FP8 tensor cores (compute capability under 8.9), naming it."""
    if tuple(capability) < FP8_MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_COMPUTE_CAPABILITY))
        raise BuildError(
            f"--precision fp8 needs FP8 tensor cores (compute capability {need} or newer: Ada, Hopper, Blackwell), "
            f"but {device_name} has compute capability {capability[0]}.{capability[1]}; use --precision int8 or fp16"
        )


def require_fp8_gpu() -> None:
    """:func:`check_fp8_device` on the current CUDA GPU (TensorRT builds for the GPU it runs on)."""
    import torch

    check_fp8_device(torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability()))


def _attach_timing_cache(builder_config: trt.IBuilderConfig, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made on another GPU or TensorRT version; starting an empty one", path)
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    else:
        log.info("timing cache: %s (%d bytes)", path, len(data))


@dataclass(frozen=True)
class TensorRTBuilder:
    """Plans from the ONNX source, one per component, sharing the directory's timing cache."""

    source: OnnxFiles
    opts: BuildOptions

    def build(self, component: str, *, precision: str, spec: ComponentSpec, profiles: Sequence[Profile],
              out: Path) -> BuiltEngine:
        src, extra = self.source.onnx_for(component, precision)
        config = TensorRTBuildConfig(
            precision=precision,  # type: ignore[arg-type]
            workspace_gib=self.opts.workspace_gib, timing_cache=out / TIMING_CACHE_NAME,
            refittable=self.opts.refittable, weight_streaming=self.opts.weight_streaming,
        )
        plan = out / engine_file_name(component, "tensorrt")
        info = build_engine(src, plan, spec=spec, profiles=profiles, config=config)
        return BuiltEngine(plan.name, {**extra, **info})
