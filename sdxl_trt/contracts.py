"""The component contract: the one place that says what each SDXL network takes and returns.

Every component (``text_encoder``, ``text_encoder_2``, ``unet``, ``refiner``, ``vae_decoder``,
``vae_encoder``) is a frozen :class:`ComponentSpec`: ordered input and output tensors with dtypes and
*named* dimensions. export/ reads names and dynamic axes from it, engine/ derives optimization profiles
from it, runtime/ sizes its buffers from it. Nothing else in the project restates a shape.

Named dimensions:

* ``B`` batch (for the UNets the doubled, classifier-free-guidance batch),
* ``S`` context tokens seen by a UNet (77 per prompt chunk: long prompts are chunked, so S = 77 k),
* ``h`` / ``w`` latent height / width (image side / 8).

Optional inputs exist only for the models that have them: a guidance-distilled UNet (``time_cond_proj_dim``
in its config, as LCM-distilled SDXL) takes ``timestep_cond``, the guidance-scale embedding of
``guidance_scale - 1`` (diffusers' ``get_guidance_scale_embedding``), and never runs a CFG batch.

ControlNet: a model built with ``--controlnet`` has ``ModelDims.controlnet_residuals``. Its UNet then takes
the residuals a ControlNet adds (``down_block_res_{i}``, ``mid_block_res``, shapes from the UNet's config), and
each ControlNet engine ``controlnet.NAME`` follows the ``controlnet`` contract: the UNet's inputs plus
``controlnet_cond`` (the control image, B x 3 x 8h x 8w, in [0, 1]) and ``conditioning_scale`` (B x R: one
scale per row and residual, so guess mode's geometric scales and per-step start/end tables are plain data),
returning exactly those residuals, already scaled. A plain build's UNet is unchanged.

Step caching (DeepCache): a model built with ``--deepcache K[,K...]`` has ``ModelDims.deepcache_features``. Its
full UNet then also returns ``deepcache_feature_K`` per branch (B x c x h/f x w/f), and each shallow UNet
``unet_shallow.K`` follows the ``unet_shallow`` contract: the UNet's inputs plus ``deepcache_feature``, returning
``noise_pred`` (export/deepcache.py says which layers it runs). A plain build's UNet is unchanged.

Widths (hidden sizes, context width, number of micro-conditioning numbers) are properties of the model,
not of the contract, so the specs are built from a :class:`ModelDims` read off the model's configs.

Beside the specs live the other facts about components that every stage needs: the components a build makes
(:func:`build_components`), each one's family (:func:`family_of`), the one precision rule
(:func:`component_precision`) and the I/O dtype of each engine precision (:func:`io_dtype`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

CONTRACT_VERSION = 2
"""Bump when a component's inputs or outputs change: exported files and engines become stale. Recorded in
every export and engine manifest; an engine directory of another version is refused at load with its rebuild
command. (2: the UNet's optional ``timestep_cond`` input for guidance-distilled models.)"""

TOKENS_PER_CHUNK = 77
"""CLIP's context length: every text-encoder call sees exactly this many tokens."""

WARMUP_PROMPT_CHUNKS = 2
"""Prompt chunks (of 75 tokens) a default warm-up captures up to, and a ``--compile`` build compiles for: one
is a short prompt, two a prompt of up to 150 tokens (more: ``Pipeline.warmup(prompt_chunks=)``)."""

VAE_SCALE = 8
"""Image pixels per latent pixel, per side (KL-f8)."""

DType = Literal["float", "float32", "int32", "int64"]
"""``float`` follows the engine's precision (fp16 or fp32); the others are fixed."""

COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "unet", "refiner", "vae_decoder", "vae_encoder")
BASE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")

CONTROLNET = "controlnet"
"""The ControlNet contract; each built ControlNet is a component named ``controlnet.NAME``."""

CONTROLNET_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
"""What a ControlNet's NAME may be (it names a file and a request field)."""


UNET_SHALLOW = "unet_shallow"
"""The shallow UNet contract of step caching (DeepCache); each built branch K is a component ``unet_shallow.K``."""

DEEPCACHE_FEATURE = "deepcache_feature"
"""The shallow UNet's feature input; the full UNet of a ``--deepcache`` build returns it per branch K as
``deepcache_feature_K``."""


def shallow_component(branch: int) -> str:
    """The component (engine) name of the shallow UNet of cache branch ``branch``."""
    return f"{UNET_SHALLOW}.{branch}"


def deepcache_feature_name(branch: int) -> str:
    """The full UNet's output that feeds the shallow UNet of ``branch``."""
    return f"{DEEPCACHE_FEATURE}_{branch}"


def shallow_branches(components: Iterable[str]) -> list[int]:
    """The cache branches among component names (``unet_shallow.3`` -> 3), ascending."""
    return sorted(int(c[len(UNET_SHALLOW) + 1:]) for c in components if c.startswith(UNET_SHALLOW + "."))


def controlnet_component(name: str) -> str:
    """The component (engine) name of the ControlNet called ``name``."""
    return f"{CONTROLNET}.{name}"


def contract_of(component: str) -> str:
    """The contract a component follows: ``controlnet.edges`` -> ``controlnet``, ``unet_shallow.0`` ->
    ``unet_shallow``; others are their own."""
    for family in (CONTROLNET, UNET_SHALLOW):
        if component.startswith(family + "."):
            return family
    return component


def controlnet_names(components: Iterable[str]) -> list[str]:
    """The ControlNet NAMEs among component names, in their order."""
    return [c[len(CONTROLNET) + 1:] for c in components if contract_of(c) == CONTROLNET and c != CONTROLNET]


def build_components(*, refiner: bool = False, controlnets: Sequence[str] = (),
                     deepcache: Sequence[int] = ()) -> list[str]:
    """The components a build exports and builds, in build order: the base model's, the refiner's UNet if
    asked, one ``controlnet.NAME`` per ControlNet, then one ``unet_shallow.K`` per cache branch."""
    return [*BASE_COMPONENTS, *(["refiner"] if refiner else []), *(controlnet_component(n) for n in controlnets),
            *(shallow_component(k) for k in sorted(set(deepcache)))]


# --------------------------------------------------------------------------- component facts
# What kind of network each component is and which precision it is built in: export/, engine/ and runtime/
# read these here, never restate them.

Family = Literal["text_encoder", "unet", "vae", "controlnet"]
FAMILIES: Mapping[str, Family] = {
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "unet", "refiner": "unet",
    "vae_decoder": "vae", "vae_encoder": "vae", CONTROLNET: "controlnet", UNET_SHALLOW: "unet",
}
"""Each contract's family. UNets and ControlNets run once per denoising step, beside each other (a guided
batch, ``S`` context tokens, one profile per bucket); text encoders once per prompt chunk; VAEs once per image."""

VAE_COMPONENTS = tuple(c for c, f in FAMILIES.items() if f == "vae")
STEP_FAMILIES: tuple[Family, ...] = ("unet", "controlnet")
"""Families called in every denoising step: their batch doubles under classifier-free guidance."""


def family_of(component: str) -> Family:
    """``unet`` and ``refiner`` -> ``unet``; ``controlnet.edges`` -> ``controlnet``; ``vae_decoder`` -> ``vae``."""
    family = FAMILIES.get(contract_of(component))
    if family is None:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENT_NAMES} or {CONTROLNET}.NAME")
    return family


Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
BUILD_PRECISIONS = ("fp16", "int8", "fp8", "fp32")
"""What a build may ask for (``--precision``); bf16 is only ever chosen per component, by the rule below."""
QDQ_PRECISIONS = ("int8", "fp8")
"""Precisions carried by QuantizeLinear/DequantizeLinear nodes in the base UNet (engine/int8/)."""
TYPED_BACKENDS = (None, "tensorrt")
"""Where the ONNX's tensor types are the engine's precision (TensorRT builds strongly typed networks only, and
10.x and 11.x alike take every kernel's precision from the file); None: an ONNX export, which writes the files a
TensorRT build of that precision parses."""

IO_DTYPES: Mapping[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float16",
                                "fp8": "float16"}
"""The dtype of an engine's ``float`` inputs and outputs, per its precision. A Q/DQ UNet's on a typed backend
(TensorRT) is float16: its Q/DQ nodes sit in the fp16 UNet, the remainder runs fp16. INT8 on ONNX Runtime keeps
the fp32 graph (its CPU kernels lack fp16): :func:`io_dtype` with ``backend``."""

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
"""FP8 (E4M3) tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0) and newer."""


def component_precision(component: str, requested: str, *, backend: str | None, bf16_device: bool = False,
                        vae_fp16_safe: bool = False) -> Precision:
    """The precision ``component`` is built in when the model is asked for in ``requested`` on ``backend``
    (None: an ONNX export, which writes the files a TensorRT build parses). The one rule; engine/ and export/
    call it.

    * fp32 is fp32 for every component.
    * The SDXL VAE overflows in fp16 (NaN, black images): fp32, unless its weights are fp16-safe
      (``vae_fp16_safe``: e.g. sdxl-vae-fp16-fix) -> fp16, or the torch backend builds on a device with bf16
      (``bf16_device``) -> bf16, fp32's range at 16-bit speed.
    * int8 / fp8 mean Q/DQ nodes from calibrating the base UNet (engine/int8/). TensorRT builds strongly typed
      networks only (the only kind 11.x has), so precision is in the ONNX: the Q/DQ nodes go into the fp16 UNet
      and every other component is an fp16 file (the MLPerf SDXL recipe: FP8/INT8 UNet, fp16 text encoders).
      ONNX Runtime (INT8 only) keeps them fp32 (its CPU kernels lack fp16).
    * Otherwise the requested precision.
    """
    family = family_of(component)
    if requested not in BUILD_PRECISIONS:
        raise ValueError(f"precision must be one of {BUILD_PRECISIONS}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    if family == "vae":
        if vae_fp16_safe:
            return "fp16"
        return "bf16" if backend == "torch" and bf16_device else "fp32"
    if requested in QDQ_PRECISIONS:
        if contract_of(component) == "unet":
            return "int8" if requested == "int8" else "fp8"
        return "fp16" if backend in TYPED_BACKENDS else "fp32"
    return "fp16"


def onnx_precision(requested: str, backend: str | None = None) -> Literal["fp32", "fp16"]:
    """The precision of the ONNX export a build of ``requested`` on ``backend`` is made from (each component's
    file then follows :func:`component_precision` with ``backend=None``, or is fp32 everywhere): on TensorRT
    fp16 for fp16, int8 and fp8 (their Q/DQ nodes go into the fp16 UNet; calibration reads an fp32 UNet of its
    own); fp32 otherwise, ONNX Runtime's INT8 included (Q/DQ in the fp32 UNet)."""
    if requested == "fp16" or (requested in QDQ_PRECISIONS and backend in TYPED_BACKENDS):
        return "fp16"
    return "fp32"


def io_dtype(precision: str, backend: str | None = None) -> torch.dtype:
    """The torch dtype of an engine's ``float`` tensors when it is built in ``precision`` on ``backend``
    (None or tensorrt: the typed files; an INT8 UNet on ONNX Runtime keeps float32 I/O)."""
    import torch

    if precision not in IO_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(IO_DTYPES)}")
    if precision in QDQ_PRECISIONS:
        return torch.float16 if backend in TYPED_BACKENDS else torch.float32
    return getattr(torch, IO_DTYPES[precision])


@dataclass(frozen=True)
class Dim:
    """A named dimension, optionally scaled: ``Dim("h", 8)`` is an image height of 8 latent rows each;
    ``Dim("h", div=4)`` is a UNet feature map's height after two downsamplings (h must divide)."""

    name: str
    scale: int = 1
    div: int = 1

    def __str__(self) -> str:
        text = self.name if self.scale == 1 else f"{self.scale}{self.name}"
        return text if self.div == 1 else f"{text}/{self.div}"

    def of(self, value: int) -> int:
        """This axis's size when the named dimension is ``value``."""
        if value * self.scale % self.div:
            raise ValueError(f"dimension {self.name}={value} must be a multiple of {self.div} for an axis {self}")
        return value * self.scale // self.div


DimLike = Dim | int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    dims: tuple[DimLike, ...]

    def shape(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given named-dimension values (``{"B": 2, "h": 128, ...}``)."""
        out = []
        for d in self.dims:
            if isinstance(d, int):
                out.append(d)
            else:
                if d.name not in values:
                    raise KeyError(f"tensor {self.name!r} needs a value for dimension {d.name!r}")
                out.append(d.of(values[d.name]))
        return tuple(out)

    @property
    def named_dims(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims if isinstance(d, Dim))

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic-axis map (axis index -> symbolic name)."""
        return {i: str(d) for i, d in enumerate(self.dims) if isinstance(d, Dim)}

    def torch_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        """This tensor's torch dtype in an engine whose ``float`` tensors are ``float_dtype``
        (:func:`io_dtype` of its precision); the fixed dtypes are their own."""
        import torch

        return float_dtype if self.dtype == "float" else getattr(torch, self.dtype)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"component {self.name!r} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    @property
    def named_dims(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.inputs:
            for n in t.named_dims:
                seen[n] = None
        return tuple(seen)

    def shapes(self, values: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(values) for t in self.tensors}


@dataclass(frozen=True)
class ModelDims:
    """The widths of one SDXL model, read off its component configs."""

    text_hidden_1: int = 768  # CLIP ViT-L/14 hidden size
    text_hidden_2: int = 1280  # OpenCLIP ViT-bigG/14 hidden size
    pooled_dim: int = 1280  # text_encoder_2 projection
    unet_context: int = 2048  # = text_hidden_1 + text_hidden_2
    unet_time_ids: int = 6  # original (h, w), crop (top, left), target (h, w)
    latent_channels: int = 4
    refiner_context: int = 1280  # the refiner conditions on text_encoder_2 alone
    refiner_time_ids: int = 5  # original (h, w), crop (top, left), aesthetic score
    refiner_pooled_dim: int = 1280
    vae_scale_factor: int = VAE_SCALE
    unet_downsamples: int = 2  # latent sides must be divisible by 2**unet_downsamples
    refiner_downsamples: int = 3  # 0 when the model has no refiner
    unet_time_cond_dim: int = 0  # time_cond_proj_dim of a guidance-distilled UNet; 0: none (no timestep_cond)
    # (channels, downscale) of each residual a ControlNet adds to the base UNet: the down blocks' in order,
    # the mid block's last. Empty: built without --controlnet (the UNet takes no residual inputs).
    controlnet_residuals: tuple[tuple[int, int], ...] = ()
    # (branch, channels, downscale) of each step-caching (DeepCache) feature the full UNet returns and a shallow
    # UNet takes. Empty: built without --deepcache (the UNet returns the noise prediction alone).
    deepcache_features: tuple[tuple[int, int, int], ...] = ()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ModelDims:
        values = dict(data)
        values["controlnet_residuals"] = tuple(tuple(r) for r in values.get("controlnet_residuals", ()))
        values["deepcache_features"] = tuple(tuple(r) for r in values.get("deepcache_features", ()))
        return cls(**values)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this for every UNet the model has."""
        return 2 ** max(self.unet_downsamples, self.refiner_downsamples)


B, S, H, W = Dim("B"), Dim("S"), Dim("h"), Dim("w")


def residual_specs(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """The residuals a ControlNet returns and a ControlNet-built UNet takes, in diffusers' order."""
    *down, mid = dims.controlnet_residuals
    out = [TensorSpec(f"down_block_res_{i}", "float", (B, c, Dim("h", div=f), Dim("w", div=f)))
           for i, (c, f) in enumerate(down)]
    c, f = mid
    return (*out, TensorSpec("mid_block_res", "float", (B, c, Dim("h", div=f), Dim("w", div=f))))


def feature_spec(name: str, channels: int, downscale: int) -> TensorSpec:
    """A step-caching feature: B x channels x h/f x w/f (B the UNet's, doubled under guidance)."""
    return TensorSpec(name, "float", (B, channels, Dim("h", div=downscale), Dim("w", div=downscale)))


def component_specs(dims: ModelDims, controlnets: Sequence[str] = ()) -> dict[str, ComponentSpec]:
    """The component contracts for a model of the given widths (with ``controlnet_residuals``: also the
    ``controlnet`` contract, and one spec per ControlNet engine named in ``controlnets``)."""
    t = TOKENS_PER_CHUNK
    c = dims.latent_channels
    f = dims.vae_scale_factor
    latent = (B, c, H, W)
    image = (B, 3, Dim("h", f), Dim("w", f))

    residuals = residual_specs(dims) if dims.controlnet_residuals else ()

    def unet_like(name: str, context: int, pooled: int, time_ids: int, doc: str, time_cond: int = 0,
                  extra: tuple[TensorSpec, ...] = (), outputs: tuple[TensorSpec, ...] = ()) -> ComponentSpec:
        return ComponentSpec(
            name,
            inputs=(
                TensorSpec("sample", "float", latent),
                TensorSpec("timestep", "float32", (B,)),
                TensorSpec("encoder_hidden_states", "float", (B, S, context)),
                TensorSpec("text_embeds", "float", (B, pooled)),
                TensorSpec("time_ids", "float", (B, time_ids)),
                *((TensorSpec("timestep_cond", "float", (B, time_cond)),) if time_cond else ()),
                *extra,
            ),
            outputs=(TensorSpec("noise_pred", "float", latent), *outputs),
            doc=doc,
        )

    specs = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", (B, t)),),
            outputs=(TensorSpec("hidden_states", "float", (B, t, dims.text_hidden_1)),),
            doc="CLIP ViT-L/14: penultimate hidden states",
        ),
        "text_encoder_2": ComponentSpec(
            "text_encoder_2",
            inputs=(TensorSpec("input_ids", "int64", (B, t)),),
            outputs=(
                TensorSpec("hidden_states", "float", (B, t, dims.text_hidden_2)),
                TensorSpec("text_embeds", "float", (B, dims.pooled_dim)),
            ),
            doc="OpenCLIP ViT-bigG/14: penultimate hidden states and the projected EOS token",
        ),
        "unet": unet_like(
            "unet", dims.unet_context, dims.pooled_dim, dims.unet_time_ids, "SDXL base UNet: predicts noise",
            time_cond=dims.unet_time_cond_dim, extra=residuals,
            outputs=tuple(feature_spec(deepcache_feature_name(k), ch, f) for k, ch, f in dims.deepcache_features),
        ),
        "refiner": unet_like(
            "refiner",
            dims.refiner_context,
            dims.refiner_pooled_dim,
            dims.refiner_time_ids,
            "SDXL refiner UNet: predicts noise on the low-noise end",
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", "float", latent),),
            outputs=(TensorSpec("images", "float", image),),
            doc="VAE decoder: unscaled latents -> images in [-1, 1]",
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("images", "float", image),),
            outputs=(TensorSpec("latent_parameters", "float", (B, 2 * c, H, W)),),
            doc="VAE encoder: images in [-1, 1] -> mean and log-variance of the latent distribution",
        ),
    }
    for k, ch, down in dims.deepcache_features:
        specs[shallow_component(k)] = unet_like(
            shallow_component(k), dims.unet_context, dims.pooled_dim, dims.unet_time_ids,
            f"SDXL base UNet's shallow part at cache branch {k} (DeepCache): noise from the cached feature",
            time_cond=dims.unet_time_cond_dim, extra=(feature_spec(DEEPCACHE_FEATURE, ch, down),))
    if residuals:
        specs[CONTROLNET] = ComponentSpec(
            CONTROLNET,
            inputs=(
                TensorSpec("sample", "float", latent),
                TensorSpec("timestep", "float32", (B,)),
                TensorSpec("encoder_hidden_states", "float", (B, S, dims.unet_context)),
                TensorSpec("text_embeds", "float", (B, dims.pooled_dim)),
                TensorSpec("time_ids", "float", (B, dims.unet_time_ids)),
                TensorSpec("controlnet_cond", "float", (B, 3, Dim("h", f), Dim("w", f))),
                TensorSpec("conditioning_scale", "float32", (B, len(residuals))),
            ),
            outputs=residuals,
            doc="SDXL ControlNet: the scaled residuals its control image adds to the base UNet's blocks",
        )
        for name in controlnets:
            specs[controlnet_component(name)] = replace(specs[CONTROLNET], name=controlnet_component(name))
    elif controlnets:
        raise ValueError(f"ControlNets {list(controlnets)} need a model built with controlnet_residuals")
    return specs
