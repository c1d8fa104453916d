"""Read a LoRA file into the canonical form (:class:`~.canonical.Lora`), checked against the model it is for.

Layer names are converted by diffusers' own code, so a file names the layers here that it names in
``load_lora_weights``: kohya/LyCORIS names go through ``StableDiffusionXLPipeline.lora_state_dict`` (its
kohya and sgm-block conversion) and every name then through diffusers' renaming tables to peft module
names (``convert_unet_state_dict_to_peft``: ``to_k_lora``, ``processor.``, ``lora.down``; the text encoders'
``lora_linear_layer`` and old names). diffusers' kohya conversion knows LoRA factors only, so LyCORIS
layers (LoHa, LoKr, Tucker cores, DoRA scales) are named through stand-in LoRA factors under the same
layer names, found again by identity; the factors themselves are kept and merged as plain tensor math
(:mod:`.kinds`), with each layer's ``alpha / rank`` as A1111 and ComfyUI define it.

Refused, naming the file, its kind and the keys, before any weight changes: a file that is not readable
safetensors (truncated, corrupt, pickled), a kind not merged here (:data:`.layouts.REFUSED`), a network with
one text encoder (SD 1.x/2.x), and any layer that matches no weight of the model, has another shape, or
whose factors do not fit together (mixed ranks). Every layer applies or the file is refused: never a part.

diffusers is imported inside :func:`read_lora` only, so this module costs nothing to import.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from sdxl_trt.identity import file_sha256

from .canonical import LORA_COMPONENTS, Lora, LoraError
from .kinds import LayerUpdate, LohaFactors, LokrFactors, LoraFactors
from .layouts import KOHYA_FACTORS, METADATA_KEY, PEFT_FACTORS, _adapter_metadata, classify

log = logging.getLogger(__name__)

Raw = dict[str, torch.Tensor]
"""One layer's tensors by factor name (:data:`.layouts.KOHYA_FACTORS` values)."""

LORA_FACTORS = {"down", "up", "mid"}
LOHA_FACTORS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_FACTORS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def read_lora(path: str | Path, *, targets: Mapping[str, Mapping[str, tuple[int, ...]]],
              unet_config: Any = None) -> Lora:
    """Read ``path`` (a ``.safetensors`` LoRA, LoCon, LoHa, LoKr or DoRA in the diffusers/peft or the
    kohya/LyCORIS layout) for a model whose LoRA-able weights are ``targets``
    (:func:`~.canonical.lora_weight_shapes`). ``unet_config`` lets kohya files in the original (sgm) block
    layout be renamed to diffusers blocks, as ``load_lora_weights`` does; without it, the UNet's
    ``layers_per_block`` is read off ``targets``."""
    path = Path(path)
    tensors, metadata = _read_file(path)
    what = classify(path, {k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if what.refused:
        raise LoraError(what.refused)
    if what.layout == "kohya":
        layers, problems = _kohya_layers(path, tensors, unet_config or _unet_config(targets))
    else:
        layers, problems = _diffusers_layers(path, tensors, metadata)
        if "DoRA" in what.kind and not any("magnitude" in raw for _, raw in layers.values()):
            raise LoraError(f"DoRA file {path}: its metadata sets use_dora but it holds no lora_magnitude_vector")
    out: dict[str, dict[str, LayerUpdate]] = {c: {} for c in LORA_COMPONENTS}
    for (component, module), (keys, raw) in sorted(layers.items()):
        name = _resolve_parameter(module, targets.get(component, {}))
        if name is None:
            problems.append(f"{component}.{module} matches no layer of the model (keys {keys}.*)")
            continue
        meta = _component_metadata(path, metadata, component)
        alpha_tensor = raw.pop("alpha", None)
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else \
            _metadata_alpha(meta, module) if what.layout == "diffusers" else None
        update = _update(raw, tuple(targets[component][name]), alpha, peft=what.layout == "diffusers",
                         rslora=bool(meta.get("use_rslora")))
        if isinstance(update, str):
            problems.append(f"{component}.{name}: {update} (keys {keys}.*)")
            continue
        out[component][name] = update
    if problems:
        matched = sum(len(v) for v in out.values())
        hint = ("none of its layers is in this model: it is a network for another architecture (SD 1.5, SD 2.x, "
                "another SDXL-like model) or another model size" if matched == 0 else
                f"{matched} of its layers match, the rest do not: it was made for another model")
        raise LoraError(f"{what.kind} file {path} does not fit this SDXL model ({hint}); {len(problems)} problems: "
                        + "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
    if not any(out.values()):
        raise LoraError(f"LoRA file {path} holds no LoRA layers (keys: {', '.join(list(tensors)[:5])})")
    lora = Lora(path=str(path.resolve()), sha256=file_sha256(path), format=what.layout, kind=what.kind,
                layers={c: v for c, v in out.items() if v})
    log.info("LoRA %s (%s, %s keys): %s", path.name, lora.kind, lora.format,
             ", ".join(f"{c} {len(v)} layers" for c, v in lora.layers.items()))
    return lora


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors files are read (a pickled .bin/.pt/.ckpt can run "
                        "code when loaded); convert it to safetensors first")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise LoraError(f"LoRA file {path} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraError(f"LoRA file {path} has NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:3])})")
    return tensors, metadata


# ---------------------------------------------------------------------------------------------- layer names
Layers = dict[tuple[str, str], tuple[str, Raw]]
"""(component, peft module name) -> (the file's name for the layer, its tensors by factor name)."""


def _kohya_layers(path: Path, tensors: Mapping[str, torch.Tensor], unet_config: Any) -> tuple[Layers, list[str]]:
    """kohya/LyCORIS layers, named by diffusers' kohya conversion run on stand-in LoRA factors."""
    raw: dict[str, Raw] = defaultdict(dict)
    for key, tensor in tensors.items():
        layer, _, factor = key.partition(".")
        raw[layer][KOHYA_FACTORS[factor]] = tensor  # classify() refused any other factor
    stand_ins: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    for layer in raw:
        down = torch.empty(0)
        stand_ins[f"{layer}.lora_down.weight"] = down
        stand_ins[f"{layer}.lora_up.weight"] = torch.empty(0)
        by_id[id(down)] = layer

    from diffusers import StableDiffusionXLPipeline

    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(stand_ins, unet_config=unet_config)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError/KeyError/... on keys it cannot place
        raise LoraError(f"LoRA file {path}: diffusers could not place its layer names ({type(e).__name__}: {e}); "
                        "it is not a SDXL network in the kohya layout") from e
    layers: Layers = {}
    for component in LORA_COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in converted.items() if k.startswith(f"{component}.")}
        for key, tensor in _peft_names(component, part).items():
            if key.endswith(".lora_A.weight") and id(tensor) in by_id:
                layer = by_id[id(tensor)]
                layers[(component, key.removesuffix(".lora_A.weight"))] = (layer, dict(raw[layer]))
    placed = {layer for layer, _ in layers.values()}
    dropped = sorted(set(raw) - placed)
    problems = [f"{len(dropped)} layers were dropped by diffusers' key conversion ({', '.join(dropped[:3])})"
                ] if dropped else []
    return layers, problems


def _diffusers_layers(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> tuple[Layers, list[str]]:
    """diffusers/peft layers (old diffusers names included), renamed to peft names by diffusers' tables. A
    layer's own ``alpha`` (some trainers save one) is found through its down tensor: renames keep tensors."""
    alphas = {id(v): tensors[a] for k, v in tensors.items()
              if (a := _alpha_key(k)) is not None and a in tensors}
    layers: Layers = {}
    for component in LORA_COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in tensors.items()
                if k.startswith(f"{component}.") and not k.endswith(".alpha")}
        grouped: dict[str, Raw] = defaultdict(dict)
        stray = []
        for key, tensor in _peft_names(component, part).items():
            suffix = next((s for s in PEFT_FACTORS if key.endswith(s)), None)
            if suffix is None:
                stray.append(key)
                continue
            grouped[key.removesuffix(suffix)][PEFT_FACTORS[suffix]] = tensor
        if stray:
            raise LoraError(f"LoRA file {path}: {component} keys that diffusers' renames do not make LoRA factors: "
                            f"{', '.join(sorted(stray)[:4])}")
        for module, raw in grouped.items():
            if "down" in raw and id(raw["down"]) in alphas:
                raw["alpha"] = alphas[id(raw["down"])]
            layers[(component, module)] = (f"{component}.{module}", raw)
    return layers, []


def _peft_names(component: str, part: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``component``'s keys (without the ``component.`` prefix) renamed to peft names by diffusers' own
    tables, as ``load_lora_weights`` renames them. The UNet is always renamed (diffusers decides by the first
    key alone, but its training script mixes ``to_k.lora.down`` with ``conv1.lora_A``); the text encoders
    through the old and the new diffusers tables in turn (a part holding only one of them defeats
    diffusers' guess of which it is)."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    return convert_state_dict(convert_state_dict(part, DIFFUSERS_OLD_TO_PEFT), DIFFUSERS_TO_PEFT)


def _alpha_key(key: str) -> str | None:
    """``layer.alpha`` for a down key ``layer.lora_A.weight`` (or lora.down, lora_linear_layer.down, ...)."""
    for suffix in (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".alpha"
    return None


def _unet_config(targets: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Any:
    """What diffusers' sgm-block renaming reads of a UNet config (``layers_per_block``), from the weight names
    of a model known only by its weight map (a runtime)."""
    resnets = [int(m.group(1)) for n in targets.get("unet", {})
               if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))]
    return SimpleNamespace(layers_per_block=max(resnets) + 1) if resnets else None


def _resolve_parameter(module: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The model parameter a LoRA module name updates. Text-encoder LoRAs keep CLIP's ``text_model.`` level,
    which newer transformers drop (and older ones need)."""
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if f"{candidate}.weight" in shapes:
            return f"{candidate}.weight"
    return None


# ---------------------------------------------------------------------------------------------- factors
def _update(raw: Raw, want: tuple[int, ...], alpha: float | None, *, peft: bool, rslora: bool) -> LayerUpdate | str:
    """The layer update of ``raw``'s kind for a weight of shape ``want``, or why the factors do not fit it."""
    magnitude = raw.pop("magnitude", None)
    present = set(raw)
    if present <= LORA_FACTORS and {"down", "up"} <= present:
        fit = _lora_shape(raw)
        rank = int(raw["down"].shape[0])
    elif present <= LOHA_FACTORS and {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= present:
        fit = _loha_shape(raw)
        rank = int(raw["hada_w1_b"].shape[0])
    elif present <= LOKR_FACTORS and ({"lokr_w1"} <= present or {"lokr_w1_a", "lokr_w1_b"} <= present) \
            and ({"lokr_w2"} <= present or {"lokr_w2_a", "lokr_w2_b"} <= present):
        fit = _lokr_shape(raw)
        b = raw.get("lokr_w2_b", raw.get("lokr_w1_b"))  # the rank of a decomposed side (w2's first, as A1111)
        rank = int(b.shape[0]) if b is not None else 0
    else:
        return f"factors {sorted(present)} are no complete layer of LoRA, LoHa or LoKr"
    if isinstance(fit, str):
        return fit
    if not _fits(fit, want):
        return f"the file's update is {fit}, the model's weight is {want}"
    scale = 1.0 if alpha is None or rank == 0 else alpha / (math.sqrt(rank) if rslora else rank)
    dora: dict[str, Any] = {}
    if magnitude is not None:
        on_output = _magnitude_axis(magnitude, want, peft=peft)
        if on_output is None:
            return f"its DoRA magnitude has shape {tuple(magnitude.shape)}, which fits no channel of {want}"
        dora = {"magnitude": magnitude.flatten(), "magnitude_on_output": on_output}
    t = raw
    if present <= LORA_FACTORS:
        return LoraFactors(shape=want, alpha_scale=scale, up=t["up"], down=t["down"], mid=t.get("mid"), **dora)
    if present <= LOHA_FACTORS:
        return LohaFactors(shape=want, alpha_scale=scale, w1a=t["hada_w1_a"], w1b=t["hada_w1_b"], w2a=t["hada_w2_a"],
                           w2b=t["hada_w2_b"], t1=t.get("hada_t1"), t2=t.get("hada_t2"), **dora)
    return LokrFactors(shape=want, alpha_scale=scale, w1=t.get("lokr_w1"), w1a=t.get("lokr_w1_a"),
                       w1b=t.get("lokr_w1_b"), w2=t.get("lokr_w2"), w2a=t.get("lokr_w2_a"), w2b=t.get("lokr_w2_b"),
                       t2=t.get("lokr_t2"), **dora)


def _mismatch(what: str, *shapes: torch.Tensor) -> str:
    return f"{what} {' and '.join(str(tuple(s.shape)) for s in shapes)} do not fit together (mixed ranks?)"


def _lora_shape(raw: Raw) -> tuple[int, ...] | str:
    down, up, mid = raw["down"], raw["up"], raw.get("mid")
    rank = down.shape[0]
    if up.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        return _mismatch("up and down", up, down)
    if mid is None:
        return (int(up.shape[0]), *map(int, down.shape[1:]))
    if mid.dim() != 4 or tuple(mid.shape[:2]) != (up.shape[1], rank) or down.shape[2:] not in ((), (1, 1)):
        return _mismatch("up, Tucker core and down", up, mid, down)
    return int(up.shape[0]), int(down.shape[1]), *map(int, mid.shape[2:])


def _side(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None, what: str) -> tuple[int, ...] | str:
    """The shape of ``a @ b``, or of a CP core with its output factor ``a`` ``[r, out]`` and input ``b``."""
    if core is None:
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            return _mismatch(what, a, b)
        return int(a.shape[0]), math.prod(map(int, b.shape[1:]))
    if core.dim() != 4 or a.dim() != 2 or b.dim() != 2 or tuple(core.shape[:2]) != (a.shape[0], b.shape[0]):
        return _mismatch(f"{what} and CP core", a, b, core)
    return int(a.shape[1]), int(b.shape[1]), *map(int, core.shape[2:])


def _loha_shape(raw: Raw) -> tuple[int, ...] | str:
    one = _side(raw["hada_w1_a"], raw["hada_w1_b"], raw.get("hada_t1"), "hada_w1_a and hada_w1_b")
    two = _side(raw["hada_w2_a"], raw["hada_w2_b"], raw.get("hada_t2"), "hada_w2_a and hada_w2_b")
    if isinstance(one, str):
        return one
    if isinstance(two, str):
        return two
    if _flat(one) != _flat(two):
        return f"its two Hadamard factors are {one} and {two}"
    return one if len(one) >= len(two) else two


def _lokr_shape(raw: Raw) -> tuple[int, ...] | str:
    one = tuple(raw["lokr_w1"].shape) if "lokr_w1" in raw else _side(
        raw["lokr_w1_a"], raw["lokr_w1_b"], None, "lokr_w1_a and lokr_w1_b")
    two = tuple(raw["lokr_w2"].shape) if "lokr_w2" in raw else _side(
        raw["lokr_w2_a"], raw["lokr_w2_b"], raw.get("lokr_t2"), "lokr_w2_a and lokr_w2_b")
    if isinstance(one, str):
        return one
    if isinstance(two, str):
        return two
    if len(one) != 2 or len(two) not in (2, 4):
        return f"its Kronecker factors {one} and {two} are not a matrix and a matrix or kernel"
    return (one[0] * two[0], one[1] * two[1], *two[2:])


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """An update of shape ``got`` applies to a weight of shape ``want``: equal, or flattened over the kernel
    (LyCORIS stores non-CP convolution factors as ``[rank, in * kh * kw]``; A1111 reshapes them)."""
    return got == want or (len(got) == 2 and _flat(got) == _flat(want))


def _magnitude_axis(magnitude: torch.Tensor, want: tuple[int, ...], *, peft: bool) -> bool | None:
    """True for a magnitude per output channel, False per input channel, None when it fits neither. peft's
    are per output channel always ([out], or [1, out, 1, 1] for convolutions); kohya/LyCORIS files store
    ``[out, 1, ...]`` (per output channel, LyCORIS' default) or ``[1, in, ...]`` (per input, older files)."""
    shape, n = tuple(magnitude.shape), magnitude.numel()
    if peft:
        return True if n == want[0] else None
    if n == want[0] and (len(shape) == 1 or shape[0] == want[0]):
        return True
    if len(want) > 1 and n == want[1] and len(shape) > 1 and shape[0] == 1 and shape[1] == want[1]:
        return False
    return None


# ---------------------------------------------------------------------------------------------- alphas
def _component_metadata(path: Path, metadata: Mapping[str, str], component: str) -> dict[str, Any]:
    """The peft LoraConfig values diffusers saved for ``component`` (``unet.lora_alpha``, ...)."""
    data = _adapter_metadata(metadata)
    if metadata.get(METADATA_KEY) and not data:
        raise LoraError(f"LoRA file {path}: its {METADATA_KEY} metadata is not a JSON object")
    return {k.removeprefix(f"{component}."): v for k, v in data.items() if k.startswith(f"{component}.")}


def _metadata_alpha(meta: Mapping[str, Any], module: str) -> float | None:
    """peft's alpha for ``module``: an ``alpha_pattern`` entry naming it (or a suffix of it), else ``lora_alpha``."""
    for key, value in (meta.get("alpha_pattern") or {}).items():
        k = key.lstrip("^")
        if module == k or module.endswith("." + k) or re.fullmatch(k, module):
            return float(value)
    alpha = meta.get("lora_alpha")
    return float(alpha) if alpha is not None else None
