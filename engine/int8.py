"""INT8 explicit quantization (Q/DQ ONNX) of the SDXL UNet, calibrated on the UNet's real inputs.

TensorRT builds INT8 engines from ONNX files that carry QuantizeLinear/DequantizeLinear pairs ("explicit
quantization"): the Q/DQ nodes say exactly which tensors are INT8, and TensorRT fuses each DQ -> Conv/MatMul
into an INT8 kernel. This module makes that file from the FP32 UNet ONNX:

1. :func:`collect_calibration_inputs` runs diffusers' ``StableDiffusionXLPipeline`` (built from the loaded
   model's own modules; nothing fetched) on real prompts and records what the UNet actually receives at the
   denoising steps, under the contract's input names. Random inputs would calibrate the wrong ranges: the
   latent's scale changes by two orders of magnitude over the schedule and the text context is far from normal.
2. :func:`quantize_unet` calibrates and inserts Q/DQ with ONNX Runtime's ``quantize_static`` in a
   TensorRT-shaped configuration (see its docstring for the recipe and what stays in high precision).
3. :func:`measure_error` compares the INT8 and FP32 files on held-out real inputs with ONNX Runtime (CPU).

:func:`build_int8_unet` is the one call the build makes. Why ONNX Runtime rather than NVIDIA ModelOpt: ModelOpt's
ONNX INT8 path is itself a patched ``onnxruntime.quantization.quantize_static`` with TensorRT-guided options;
its ``[onnx]`` extra pins ``onnxruntime-gpu`` and ``onnx~=1.21`` and pulls ``cupy-cuda12x``, which clash with
this project's CPU ``onnxruntime`` and newer ``onnx``. The same TensorRT-guided options applied here directly
(symmetric INT8, zero-point 0, per-channel weights, float bias, inputs of weighted ops only) give the same kind
of file with no new dependency, and it runs in CI on the tiny model. (ModelOpt 0.47 does run on a CPU once its
pins are bypassed, but its generic ONNX recipe also quantizes the attention matmuls, norms' inputs, residual adds,
conv_in/conv_out and the time embeddings: 9.7 % relative error on the tiny UNet against about 2.5 % here.)
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from sdxl_trt.errors import BuildError

if TYPE_CHECKING:
    import torch

    from sdxl_trt.export.loading import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_PROMPTS_FILE = Path(__file__).parent / "data" / "calibration_prompts.txt"
"""Shipped calibration prompts: varied subjects, styles and lengths, one per line."""

UNET_INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
"""The UNet contract's input names (``component_specs(dims)["unet"].input_names``); checked at import below."""

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
"""Weighted ops whose inputs get Q/DQ. TensorRT runs these as INT8 kernels; everything else stays high precision."""

EXCLUDED_NAME_PATTERNS: dict[str, str] = {
    "time_embedding": "timestep MLP: negligible compute, and every ResNet block's conditioning flows through it",
    "add_embedding": "pooled-text + micro-conditioning MLP: negligible compute, conditions the whole network",
    "time_emb_proj": "per-ResNet projection of the time embedding: a bias for a whole feature map, tiny compute",
    "conv_in": "first conv: reads the raw latent, whose range swings with the noise level across the schedule",
    "conv_out": "last conv: writes noise_pred itself, so its error reaches the sampler unattenuated",
    "conv_shortcut": "1x1 residual-path conv: carries the skip signal's full range; excluded in NVIDIA's SDXL recipe",
}
"""Node-name substrings (module paths in the exported graph) kept in high precision, with the reason.

These are the layers NVIDIA's SDXL INT8 recipe (TensorRT demo/Diffusion with ModelOpt) leaves unquantized:
they cost almost nothing and quantizing them costs the most accuracy."""

EXTERNAL_DATA_BYTES = 2**31 - 1
"""At this size (graph + weights) ONNX Runtime must load and write the model with external data (protobuf's 2 GB cap)."""

CalibrateMethod = Literal["minmax", "percentile", "entropy"]

_ATTENTION_QKV = re.compile(r"(to_q|to_k|to_v)\b")
_FEED_FORWARD = re.compile(r"ff[./]net")


# --------------------------------------------------------------------------------------------------------------
# Calibration data: the UNet's real inputs from the denoising loop
# --------------------------------------------------------------------------------------------------------------


def read_prompts(path: Path | str | None = None) -> list[str]:
    """Non-empty, stripped lines of a prompts file (the shipped one by default); ``#`` lines are comments."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS_FILE
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BuildError(f"calibration prompts file {p} does not exist; pass an existing text file, one prompt a line") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BuildError(f"calibration prompts file {p} has no prompts; write one prompt per line")
    return prompts


def _picked_steps(prompt_index: int, steps: int, per_prompt: int) -> set[int]:
    """``per_prompt`` evenly spaced step indices of ``steps``, with a phase that differs per prompt.

    The golden-ratio phase shifts each prompt's picks, so together the prompts cover the whole schedule instead of
    every prompt landing on the same few timesteps."""
    if per_prompt >= steps:
        return set(range(steps))
    phase = (prompt_index * 0.6180339887498949) % 1.0
    return {min(steps - 1, int((j + phase) * steps / per_prompt)) for j in range(per_prompt)}


def _build_pipeline(model: LoadedModel) -> Any:
    """diffusers' SDXL pipeline over the loaded modules, tokenizers and scheduler config from ``model.config_dir``."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    if model.kind != "base" or model.text_encoder is None:
        raise BuildError(
            f"INT8 calibration needs an SDXL base model with both text encoders; {model.name!r} is a {model.kind} "
            "model (calibrate the refiner UNet with an img2img pipeline, not supported yet)"
        )
    cfg_dir = Path(model.config_dir)
    sched_cfg_path = cfg_dir / "scheduler" / "scheduler_config.json"
    try:
        sched_cfg = json.loads(sched_cfg_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise BuildError(f"cannot read the scheduler config {sched_cfg_path}: {e}; the model directory is incomplete") from e
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name", "EulerDiscreteScheduler")), None)
    if sched_cls is None:
        raise BuildError(f"{sched_cfg_path} names scheduler {sched_cfg.get('_class_name')!r}, which diffusers does not have")
    tokenizers = []
    for sub in ("tokenizer", "tokenizer_2"):
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(str(cfg_dir / sub), local_files_only=True))
        except Exception as e:  # noqa: BLE001 - transformers raises many types; name the folder
            raise BuildError(f"cannot load the CLIP tokenizer from {cfg_dir / sub}: {e}") from e
    pipe: Any = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=model.unet,
        scheduler=sched_cls.from_config(sched_cfg),
        force_zeros_for_empty_prompt=bool(model.options.get("force_zeros_for_empty_prompt", True)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu").float().numpy().copy()


def _unet_call_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The contract's five inputs from one ``UNet2DConditionModel.forward`` call (positional or keyword)."""
    import torch

    names = ("sample", "timestep", "encoder_hidden_states")
    got = {n: (args[i] if i < len(args) else kwargs.get(n)) for i, n in enumerate(names)}
    added = kwargs.get("added_cond_kwargs") or {}
    got["text_embeds"] = added.get("text_embeds")
    got["time_ids"] = added.get("time_ids")
    missing = [n for n, v in got.items() if v is None]
    if missing:
        raise BuildError(f"the UNet was called without {missing}; is this an SDXL (text_time-conditioned) pipeline?")
    batch = int(got["sample"].shape[0])  # type: ignore[union-attr]
    t = torch.as_tensor(got["timestep"]).reshape(-1)
    if t.numel() not in (1, batch):
        raise BuildError(f"UNet timestep has {t.numel()} values for batch {batch}; expected 1 or {batch}")
    out = {n: _as_numpy(got[n]) for n in ("sample", "encoder_hidden_states", "text_embeds", "time_ids")}
    out["timestep"] = np.broadcast_to(_as_numpy(t).astype(np.float32), (batch,)).copy()
    return {n: out[n] for n in UNET_INPUT_NAMES}


def collect_calibration_inputs(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    steps: int,
    width: int,
    height: int,
    guidance_scale: float = 5.0,
    seed: int = 0,
    max_samples: int,
    negative_prompt: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Record the UNet's actual inputs while diffusers' SDXL pipeline denoises ``prompts``.

    One pipeline call per prompt (batch 1, so each recorded call is B = 2 with classifier-free guidance, the shape
    served most). A forward pre-hook on the UNet copies (sample, timestep, encoder_hidden_states, text_embeds,
    time_ids) at evenly spaced steps, each prompt at a different phase, so at most ``max_samples`` calls are kept
    and together they span the schedule. The timestep is broadcast to shape [B] float32 as in the contract.
    Latents are not decoded (``output_type="latent"``): the VAE plays no part in UNet calibration.
    """
    import torch

    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise BuildError("no calibration prompts given; pass at least one non-empty prompt")
    if steps < 1:
        raise BuildError(f"calibration steps must be at least 1, got {steps}")
    if max_samples < 1:
        raise BuildError(f"max_samples must be at least 1, got {max_samples}")
    multiple = 8 * 2 ** (len(model.unet.config.block_out_channels) - 1)  # VAE factor x UNet downsamplings
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise BuildError(
            f"calibration size {width}x{height} must be positive multiples of {multiple} for this UNet; use e.g. 1024x1024"
        )
    if len(prompts) > max_samples:
        log.info("using the first %d of %d prompts (one sample each fills max_samples)", max_samples, len(prompts))
        prompts = prompts[:max_samples]
    base, extra = divmod(max_samples, len(prompts))  # the first `extra` prompts give one sample more

    pipe = _build_pipeline(model)
    device = next(model.unet.parameters()).device
    records: list[dict[str, np.ndarray]] = []
    step, keep = 0, set[int]()

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal step
        if step in keep:
            records.append(_unet_call_inputs(args, kwargs))
        step += 1

    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            step, keep = 0, _picked_steps(i, steps, max(1, base + (i < extra)))
            generator = torch.Generator(device=device).manual_seed(seed + i)
            with torch.inference_mode():
                pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    guidance_scale=guidance_scale,
                    generator=generator,
                    output_type="latent",
                )
            if step != steps:
                log.warning("prompt %d: the UNet ran %d times for %d steps", i, step, steps)
            log.info(
                "calibration prompt %d/%d done: %d samples so far (%.1f s)",
                i + 1, len(prompts), len(records), time.perf_counter() - t0,
            )
    finally:
        handle.remove()
    if not records:
        raise BuildError(
            f"no UNet calls were recorded for {len(prompts)} prompts x {steps} steps; "
            f"guidance_scale {guidance_scale} and the pipeline must call model.unet"
        )
    return records[:max_samples]


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    """What :func:`quantize_unet` did and how far the INT8 file is from FP32 (JSON-serializable via to_json)."""

    fp32_onnx: str
    int8_onnx: str
    tool: str
    calibrate_method: str
    quant_level: float
    calibration_samples: int
    seconds: float  # calibration + quantization + checks (not collecting the inputs)
    quantized_nodes: dict[str, int]  # op type -> nodes whose inputs are INT8 (DQ-fed)
    excluded_nodes: dict[str, str]  # node name -> why it stays high precision (Conv/MatMul/Gemm with weights)
    qdq_nodes: dict[str, int]  # QuantizeLinear / DequantizeLinear counts
    error: dict[str, Any] | None = None  # measure_error on held-out inputs
    settings: dict[str, Any] = field(default_factory=dict)
    collection_seconds: float = 0.0  # running the pipeline to record the inputs (set by build_int8_unet)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def summary(self) -> str:
        err = ""
        if self.error:
            err = f", noise_pred rel. L2 {self.error['relative_l2_mean']:.4f} (max {self.error['relative_l2_max']:.4f})"
        q = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized_nodes.items()))
        return (
            f"INT8 UNet: quantized {q}; {len(self.excluded_nodes)} weighted nodes kept high precision; "
            f"{self.calibration_samples} calibration samples, {self.seconds:.1f} s{err}"
        )


class _CalibrationReader(CalibrationDataReader):
    """ONNX Runtime's CalibrationDataReader over recorded inputs, cast to the float32 the FP32 graph takes.

    ``__len__`` and ``set_range`` let ORT stream the samples in strides (``CalibStridedMinMax``), so its
    calibrator holds one sample's activations at a time instead of every sample's."""

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> None:
        self._samples = samples
        self._names = list(input_names)
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._samples[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        s = next(self._it, None)
        return None if s is None else {n: np.ascontiguousarray(s[n], dtype=np.float32) for n in self._names}

    def rewind(self) -> None:
        self._it = iter(self._samples)


def _check_inputs(samples: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str], what: str) -> None:
    if not samples:
        raise BuildError(f"{what} is empty; collect inputs with collect_calibration_inputs first")
    for i, s in enumerate(samples):
        missing = [n for n in input_names if n not in s]
        if missing:
            raise BuildError(f"{what}[{i}] lacks input(s) {missing}; the model's inputs are {list(input_names)}")


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


def _weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/MatMul/Gemm nodes whose second input (the weight) is a constant initializer."""
    inits = _initializer_names(model)
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and n.input[1] in inits]


def plan_exclusions(
    model: onnx.ModelProto,
    *,
    quant_level: float = 3.0,
    patterns: Mapping[str, str] = EXCLUDED_NAME_PATTERNS,
) -> dict[str, str]:
    """Weighted nodes that stay high precision, with the reason; every other weighted node is quantized.

    ``quant_level`` follows NVIDIA's SDXL recipe: 3 quantizes every Conv and Linear; 2.5 keeps the attention output
    and projection-in/out linears high precision (only Q/K/V and feed-forward linears INT8); 2 quantizes only the
    feed-forward linears of the transformer blocks. Convolutions are quantized at every level. Besides the name
    patterns, the Conv reading a graph input and any node writing a graph output are excluded structurally, so the
    rule holds for graphs whose node names are not module paths.
    """
    if quant_level not in (2.0, 2.5, 3.0):
        raise BuildError(f"quant_level must be 2, 2.5 or 3 (NVIDIA's SDXL levels), got {quant_level}")
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    compiled = [(re.compile(p), p, why) for p, why in patterns.items()]
    out: dict[str, str] = {}
    matched_any = False
    for n in _weighted_nodes(model):
        reason = None
        for rx, p, why in compiled:
            if rx.search(n.name):
                reason, matched_any = f"{p}: {why}", True
                break
        if reason is None and n.input[0] in graph_inputs and n.op_type == "Conv":
            reason = "conv_in: " + EXCLUDED_NAME_PATTERNS["conv_in"].split(": ", 1)[-1]
        elif reason is None and any(o in graph_outputs for o in n.output):
            label = "conv_out" if n.op_type == "Conv" else "output layer"
            reason = f"{label}: " + EXCLUDED_NAME_PATTERNS["conv_out"].split(": ", 1)[-1]
        elif reason is None and n.op_type in ("MatMul", "Gemm") and quant_level < 3.0:
            keep = bool(_FEED_FORWARD.search(n.name)) or (quant_level >= 2.5 and bool(_ATTENTION_QKV.search(n.name)))
            if not keep:
                reason = f"quant_level {quant_level}: only {'Q/K/V and ' if quant_level >= 2.5 else ''}feed-forward linears are INT8"
        if reason is not None:
            out[n.name] = reason
    if patterns and not matched_any:
        log.warning(
            "no node name matched the exclusion patterns %s: the graph's node names are not module paths, so only "
            "conv_in/conv_out were found structurally and the time-embedding layers will be quantized",
            list(patterns),
        )
    return out


def _restrict_dq_to(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Rewire every consumer of an activation's DQ output that is not in ``quantized`` back to the float tensor.

    ONNX Runtime gives a tensor one shared Q/DQ pair and points *all* its consumers at the DQ output (its
    ``DedicatedQDQPair`` only applies when two or more consumers are quantized), so a ResNet output that feeds both
    a quantized downsampling conv and the skip-connection Concat would reach the Concat, and through it the up
    path's GroupNorm, quantized. TensorRT honours Q/DQ exactly where they are, so only the ops meant to run in INT8
    may read a DQ output. Returns how many inputs were rewired; Q/DQ nodes left without consumers are removed."""
    q_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_of = {
        n.output[0]: q_source[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in q_source
    }
    rewired = 0
    for n in model.graph.node:
        if n.name in quantized:
            continue
        for i, name in enumerate(n.input):
            if name in float_of:
                n.input[i] = float_of[name]
                rewired += 1
    graph_outputs = {o.name for o in model.graph.output}
    while True:  # drop DQ then Q nodes that nothing reads any more
        used = {name for n in model.graph.node for name in n.input} | graph_outputs
        dead = [
            n for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    return rewired


def _weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a weighted node's constant weight: what per-channel scales must run along."""
    if node.op_type == "Conv":
        return 0  # [Cout, Cin, kh, kw]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul B is [K, N]: N output channels


def check_tensorrt_qdq(model: onnx.ModelProto, *, high_precision: Collection[str] = ()) -> list[str]:
    """Problems that would stop TensorRT from building this Q/DQ graph as intended (empty list: none).

    TensorRT's explicit quantization is symmetric: INT8 with zero-point 0, activations per tensor, weights per
    output channel in [-127, 127], float bias (no INT32 bias DQ), and DQ only on the inputs of the ops that should
    run in INT8 (Conv/MatMul/Gemm not named in ``high_precision``)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    high_precision = set(high_precision)
    problems: list[str] = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if zp_name:
            zp = inits.get(zp_name)
            if zp is None or zp.data_type != onnx.TensorProto.INT8:
                problems.append(f"{n.name}: zero point {zp_name!r} is not a constant INT8 tensor")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{n.name}: zero point is not 0 (asymmetric)")
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale {n.input[1]!r} is not a constant")
        else:
            s = numpy_helper.to_array(scale)
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                problems.append(f"{n.name}: scale has non-positive or non-finite values")
        if n.op_type != "DequantizeLinear":
            continue
        src = inits.get(n.input[0])
        if src is not None and src.data_type == onnx.TensorProto.INT32:
            problems.append(f"{n.name}: INT32 (bias) dequantization; TensorRT wants float bias")
        for c in consumers.get(n.output[0], []):
            if c.op_type not in QUANTIZED_OP_TYPES or c.name in high_precision:
                problems.append(f"{n.name}: feeds {c.op_type} {c.name!r}, which should stay high precision")
            elif src is not None:
                w = numpy_helper.to_array(src)
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if scale is not None and scale.dims and int(np.prod(scale.dims)) > 1 and axis != _weight_axis(c):
                    problems.append(f"{n.name}: per-channel axis {axis} is not {c.op_type}'s output-channel axis {_weight_axis(c)}")
                if w.dtype == np.int8 and int(w.min(initial=0)) < -127:
                    problems.append(f"{n.name}: weight uses -128; TensorRT's INT8 weights are in [-127, 127]")
    return problems


def _quantized_counts(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = Counter(
        n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.input and n.input[0] in dq_out
    )
    qdq = Counter(n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return dict(quantized), dict(qdq)


def _onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize_unet(
    fp32_onnx: Path,
    out_onnx: Path,
    *,
    calibration: Sequence[Mapping[str, np.ndarray]],
    calibrate_method: CalibrateMethod = "minmax",
    quant_level: float = 3.0,
    exclude_patterns: Mapping[str, str] = EXCLUDED_NAME_PATTERNS,
    eval_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    providers: Sequence[str] | None = None,
) -> QuantizationReport:
    """Insert TensorRT-compatible Q/DQ into the FP32 UNet ONNX, calibrated on ``calibration``.

    Recipe (ONNX Runtime ``quantize_static``, ``QuantFormat.QDQ``, with the options NVIDIA ModelOpt uses for
    TensorRT):

    * INT8 activations and weights, symmetric (``ActivationSymmetric``/``WeightSymmetric``; zero-point 0, weights in
      [-127, 127]). Activations per tensor; weights per output channel (Conv axis 0, MatMul [K, N] axis 1). Weights
      are stored as INT8 initializers with a DequantizeLinear, which TensorRT accepts as pre-quantized weights and
      which makes the file about 4x smaller than FP32.
    * Only the inputs of Conv and of MatMul/Gemm with constant weights (linear projections: proj_in/out, Q/K/V,
      attention output, feed-forward) are quantized; outputs are not (``OpTypesToExcludeOutputQuantization``), bias
      stays float (``QuantizeBias`` off), and each Q/DQ pair feeds only quantized consumers. This is TensorRT's rule
      for Q/DQ placement: quantize the inputs of weighted ops and let it fuse DQ -> op.
    * Kept in high precision: GroupNorm (exported as InstanceNormalization), LayerNorm, Softmax, SiLU/GELU, residual
      adds and resizes are never quantized (not in the op list). The attention matmuls QK^T and softmax x V have no
      constant weight and are skipped (``MatMulConstBOnly``): INT8 softmax probabilities lose the small weights that
      matter, and TensorRT runs that path as fused FP16 attention. By name (``exclude_patterns``): the time and
      micro-conditioning embeddings, each ResNet's ``time_emb_proj``, ``conv_in``, ``conv_out`` and the 1x1
      ``conv_shortcut`` layers, as in NVIDIA's SDXL INT8 recipe. ``quant_level`` 2.5 / 2 narrows the linears further.
    * Calibration streams one sample at a time through ORT's calibrator (``CalibStridedMinMax`` = 1; ranges and
      histograms merge across passes), so memory holds one sample's activations. ``minmax`` (default) takes each
      tensor's largest magnitude over all samples: no clipping, and the reductions run inside ONNX Runtime (on the
      GPU with the CUDA provider). ``percentile`` (99.999 %) and ``entropy`` copy every activation to the host and
      bin it with numpy: on the tiny UNet percentile gave 0.022 against minmax's 0.024 relative error, but at
      1024x1024 that is gigabytes per sample. (ORT's ``CalibMaxIntermediateOutputs`` is not used: in 1.32 it drops
      each batch without merging it.)
    * Everything not quantized stays FP32 in the file (calibration runs in FP32). A strongly typed TensorRT network
      would run those layers in FP32: build the engine with the FP16 flag (weak typing), or first convert the
      high-precision part to FP16 (opset 19 Q/DQ with FP16 scales, as ModelOpt's ``high_precision_dtype`` does).

    ``eval_inputs`` (held-out real inputs, not the calibration ones) fill the report's error figures.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if not fp32_onnx.is_file():
        raise BuildError(f"FP32 UNet ONNX {fp32_onnx} does not exist; export the UNet in fp32 first")
    if fp32_onnx.resolve() == out_onnx.resolve():
        raise BuildError(f"out_onnx {out_onnx} would overwrite the FP32 input; choose another path")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if calibrate_method not in methods:
        raise BuildError(f"calibrate_method must be one of {sorted(methods)}, got {calibrate_method!r}")

    t0 = time.perf_counter()
    graph_only = onnx.load(str(fp32_onnx), load_external_data=False)
    input_names = [i.name for i in graph_only.graph.input]
    _check_inputs(calibration, input_names, "calibration")
    excluded = plan_exclusions(graph_only, quant_level=quant_level, patterns=exclude_patterns)
    to_quantize = {n.name for n in _weighted_nodes(graph_only)} - set(excluded)
    inits = _initializer_names(graph_only)
    activation_matmuls = sum(
        1 for n in graph_only.graph.node if n.op_type == "MatMul" and not any(i in inits for i in n.input)
    )
    if not to_quantize:
        raise BuildError(f"{fp32_onnx} has no Conv/MatMul/Gemm with constant weights left to quantize; is it the UNet?")
    large = _onnx_bytes(fp32_onnx) >= EXTERNAL_DATA_BYTES
    del graph_only

    extra_options: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        "MatMulConstBOnly": True,
        "QuantizeBias": False,
        "DedicatedQDQPair": False,
        "AddQDQPairToWeight": False,
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "MatMul": 1},
        "CalibStridedMinMax": 1,  # one sample per calibrator pass: bounded memory (histograms merge across passes)
    }
    if calibrate_method == "percentile":
        extra_options["CalibPercentile"] = 99.999
    settings = {
        "quant_format": "QDQ",
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "per_channel": True,
        "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
        "extra_options": dict(extra_options),
        "exclude_patterns": dict(exclude_patterns),
        "not_quantized": "every op but Conv/MatMul/Gemm (norms, softmax, activations, adds, concats, resizes)",
        "attention_matmuls_not_quantized": activation_matmuls,
    }
    log.info(
        "quantizing %s -> %s: %d calibration samples, %s calibration, quant level %s, %d weighted nodes kept high precision",
        fp32_onnx, out_onnx, len(calibration), calibrate_method, quant_level, len(excluded),
    )
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdxl-trt-int8-", dir=out_onnx.parent) as tmp:
        raw = Path(tmp) / "qdq.onnx"
        try:
            quantize_static(
                str(fp32_onnx),
                str(raw),
                _CalibrationReader(calibration, input_names),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(excluded),
                use_external_data_format=large,
                calibrate_method=methods[calibrate_method],
                calibration_providers=list(providers) if providers else ["CPUExecutionProvider"],
                extra_options=extra_options,
            )
        except Exception as e:  # noqa: BLE001 - ORT raises many types; say which step failed
            raise BuildError(f"ONNX Runtime quantization of {fp32_onnx} failed: {e}") from e
        model = onnx.load(str(raw), load_external_data=True)
        rewired = _restrict_dq_to(model, to_quantize)
        problems = check_tensorrt_qdq(model, high_precision=set(excluded))
        if problems:
            raise BuildError(
                f"the quantized UNet is not TensorRT-compatible ({len(problems)} problems), first: {problems[:3]}"
            )
        from sdxl_trt.export.onnx_export import save_onnx

        save_onnx(model, out_onnx)
    quantized, qdq = _quantized_counts(model)
    del model
    try:
        onnx.checker.check_model(str(out_onnx))
    except onnx.checker.ValidationError as e:
        raise BuildError(f"the quantized UNet {out_onnx} fails onnx.checker: {e}") from e
    log.info("rewired %d non-quantized consumers off DQ outputs; quantized %s", rewired, quantized)

    report = QuantizationReport(
        fp32_onnx=str(fp32_onnx),
        int8_onnx=str(out_onnx),
        tool=f"onnxruntime.quantization {ort.__version__}",
        calibrate_method=calibrate_method,
        quant_level=float(quant_level),
        calibration_samples=len(calibration),
        seconds=0.0,
        quantized_nodes=quantized,
        excluded_nodes=excluded,
        qdq_nodes=qdq,
        settings=settings,
    )
    report.seconds = round(time.perf_counter() - t0, 3)
    if eval_inputs:
        report.error = measure_error(fp32_onnx, out_onnx, eval_inputs, providers=providers)
    log.info("%s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------------------
# Error against FP32
# --------------------------------------------------------------------------------------------------------------


def measure_error(
    fp32_onnx: Path,
    int8_onnx: Path,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """noise_pred of the INT8 file against the FP32 file on the same inputs (ONNX Runtime, CPU by default).

    Per input: relative L2 error ||int8 - fp32|| / ||fp32|| and cosine similarity of the flattened outputs. Returns
    their mean / worst over the inputs, the worst absolute error and whether every output was finite. Use held-out
    inputs (not the calibration ones) so the figure is not flattered by ranges fitted to the same data."""
    import onnxruntime as ort

    def session(path: Path) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=list(providers) if providers else ["CPUExecutionProvider"])

    ref, q = session(Path(fp32_onnx)), session(Path(int8_onnx))
    names = [i.name for i in ref.get_inputs()]
    _check_inputs(inputs, names, "inputs")
    out_name = ref.get_outputs()[0].name
    rel, cos, max_abs = [], [], 0.0
    finite = True
    for s in inputs:
        feed = {n: np.ascontiguousarray(s[n], dtype=np.float32) for n in names}
        a = np.asarray(ref.run([out_name], feed)[0], dtype=np.float64).ravel()
        b = np.asarray(q.run([out_name], feed)[0], dtype=np.float64).ravel()
        finite = finite and bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        rel.append(float(np.linalg.norm(b - a)) / max(na, 1e-30))
        cos.append(float(a @ b) / max(na * nb, 1e-30))
        max_abs = max(max_abs, float(np.abs(b - a).max()))
    return {
        "samples": len(inputs),
        "relative_l2_mean": float(np.mean(rel)),
        "relative_l2_max": float(np.max(rel)),
        "cosine_mean": float(np.mean(cos)),
        "cosine_min": float(np.min(cos)),
        "max_abs_error": max_abs,
        "finite": finite,
    }


# --------------------------------------------------------------------------------------------------------------
# The build's entry point
# --------------------------------------------------------------------------------------------------------------


def build_int8_unet(
    model: LoadedModel,
    fp32_unet_onnx: Path,
    out_onnx: Path,
    *,
    prompts_file: Path | str | None = None,
    num_prompts: int,
    steps: int,
    width: int,
    height: int,
    num_eval_prompts: int = 2,
    max_samples: int | None = None,
    guidance_scale: float = 5.0,
    seed: int = 0,
    calibrate_method: CalibrateMethod = "minmax",
    quant_level: float = 3.0,
    providers: Sequence[str] | None = None,
) -> QuantizationReport:
    """Calibrate on ``num_prompts`` prompts, quantize, and measure the error on ``num_eval_prompts`` other prompts.

    The prompts are the file's first ``num_prompts`` lines; the held-out ones are the next ``num_eval_prompts``, run
    with another seed, so the error is measured on inputs the ranges were not fitted to. ``max_samples`` caps the
    recorded UNet calls (default: 2 per prompt, spread over the schedule across prompts)."""
    prompts = read_prompts(prompts_file)
    if num_prompts < 1:
        raise BuildError(f"num_prompts must be at least 1, got {num_prompts}")
    if num_eval_prompts < 0:
        raise BuildError(f"num_eval_prompts must be 0 or more, got {num_eval_prompts}")
    need = num_prompts + num_eval_prompts
    if len(prompts) < need:
        raise BuildError(
            f"{prompts_file or DEFAULT_PROMPTS_FILE} has {len(prompts)} prompts; {num_prompts} calibration + "
            f"{num_eval_prompts} held-out need {need}: lower num_prompts or add prompts"
        )
    cap = max_samples if max_samples is not None else 2 * num_prompts
    t0 = time.perf_counter()
    calib = collect_calibration_inputs(
        model, prompts[:num_prompts], steps=steps, width=width, height=height,
        guidance_scale=guidance_scale, seed=seed, max_samples=cap,
    )
    held_out: list[dict[str, np.ndarray]] = []
    if num_eval_prompts:
        held_out = collect_calibration_inputs(
            model, prompts[num_prompts:need], steps=steps, width=width, height=height,
            guidance_scale=guidance_scale, seed=seed + 10_000, max_samples=max(1, math.ceil(steps / 4)) * num_eval_prompts,
        )
    collected = time.perf_counter() - t0
    report = quantize_unet(
        Path(fp32_unet_onnx), Path(out_onnx), calibration=calib, calibrate_method=calibrate_method,
        quant_level=quant_level, eval_inputs=held_out or None, providers=providers,
    )
    report.collection_seconds = round(collected, 3)
    return report


def _check_contract_names() -> None:
    from sdxl_trt.contracts import ModelDims, component_specs

    names = tuple(component_specs(ModelDims())["unet"].input_names)
    if names != UNET_INPUT_NAMES:  # pragma: no cover - a contract change must update this module
        raise ImportError(f"engine/int8.py records UNet inputs {UNET_INPUT_NAMES}, the contract now says {names}")


_check_contract_names()
