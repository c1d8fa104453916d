"""Read a LoRA file into the canonical form (:class:`~.canonical.Lora`), checked against the model it is for.

Key names are converted by diffusers' own code (``StableDiffusionXLPipeline.lora_state_dict``, which runs
``diffusers.loaders.lora_conversion_utils`` on kohya files, then ``diffusers.utils.state_dict_utils`` to peft
names), so a file reads here as it does in ``load_lora_weights``. Nothing of peft is needed: the factors
are kept and merged as plain tensor math.

Refused, naming the file and the reason, before any weight changes: a file that is not readable
safetensors (truncated, corrupt, pickled), a format not merged here (LoHa, LoKr, DoRA, full-weight diffs,
biases on the up projection), a kohya file with one text encoder (SD 1.x/2.x), and any layer that matches
no weight of the model or has another shape. Every layer applies or the file is refused: never a part.

diffusers is imported inside :func:`read_lora` only, so this module costs nothing to import.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.identity import file_sha256

from .canonical import LORA_COMPONENTS, Lora, LoraError, LoraFactors

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
DIFFUSERS_PREFIXES = tuple(f"{c}." for c in LORA_COMPONENTS)
# Keys of the formats this reader does not merge, and what they are.
UNSUPPORTED = (
    (re.compile(r"hada_w[12]_[ab]|hada_t[12]"), "LoHa (LyCORIS Hadamard-product factors)"),
    (re.compile(r"lokr_w[12]|lokr_t2"), "LoKr (LyCORIS Kronecker-product factors)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (weight-decomposed LoRA: a magnitude vector per layer)"),
    (re.compile(r"\.diff(_b)?$"), "a full-weight difference (LyCORIS 'full'), not low-rank factors"),
    (re.compile(r"\.(oft_blocks|oft_diag|lora_embedding_[AB])|\.ia3_"), "OFT / IA3 / embedding adapters"),
    (re.compile(r"(lora_B|lora_up|lora\.up|lora_linear_layer\.up)\.bias$"), "a LoRA with biases on its up projection"),
)
METADATA_KEY = "lora_adapter_metadata"


def read_lora(path: str | Path, *, targets: Mapping[str, Mapping[str, tuple[int, ...]]],
              unet_config: Any = None) -> Lora:
    """Read ``path`` (a ``.safetensors`` LoRA in diffusers/peft or kohya format) for a model whose LoRA-able
    weights are ``targets`` (:func:`~.canonical.lora_weight_shapes`); ``unet_config`` lets kohya files in the
    original (sgm) block layout be renamed to diffusers blocks, as ``load_lora_weights`` does."""
    path = Path(path)
    tensors, metadata = _read_file(path)
    kind = _detect_format(path, tensors, metadata)
    down_ids = {id(v): k for k, v in tensors.items() if _is_down_key(k)}
    # Each layer's own ``alpha`` (kohya always; some diffusers-format trainers too), found through the down
    # tensor itself: diffusers' conversion renames keys but keeps the tensor objects.
    alphas_by_down = {id(v): float(tensors[a].item()) for k, v in tensors.items()
                      if (a := _alpha_key(k)) is not None and a in tensors}

    from diffusers import StableDiffusionXLPipeline

    try:  # a copy: diffusers pops keys from the dict it converts
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(tensors), unet_config=unet_config)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError/KeyError/... on keys it cannot place
        raise LoraError(f"LoRA {path}: diffusers could not read its keys ({type(e).__name__}: {e}); "
                        "it is not a SDXL LoRA in diffusers or kohya format") from e
    peft = _to_peft_names(path, converted)
    layers: dict[str, dict[str, LoraFactors]] = {c: {} for c in LORA_COMPONENTS}
    problems: list[str] = []
    seen_downs: set[int] = set()
    for component, entries in peft.items():
        comp_meta = _component_metadata(metadata, component)
        for module, (down, up) in sorted(entries.items()):
            seen_downs.add(id(down))
            name = _resolve_parameter(module, targets.get(component, {}))
            if name is None:
                problems.append(f"{component}.{module} matches no layer of the model")
                continue
            want = tuple(targets[component][name])
            rank = int(down.shape[0])
            if up.dim() != down.dim() or up.shape[1] != rank or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
                problems.append(f"{component}.{module}: up {tuple(up.shape)} and down {tuple(down.shape)} "
                                "are not the factors of one low-rank update")
                continue
            got = (int(up.shape[0]), *map(int, down.shape[1:]))
            if got != want:
                problems.append(f"{component}.{name}: the file's update is {got}, the model's weight is {want}")
                continue
            alpha = alphas_by_down[id(down)] if id(down) in alphas_by_down else _metadata_alpha(comp_meta, module)
            layers[component][name] = LoraFactors(up=up, down=down, alpha_scale=_alpha_scale(alpha, rank, comp_meta))
    dropped = [k for i, k in down_ids.items() if i not in seen_downs]
    if dropped:
        problems.append(f"{len(dropped)} layers were dropped by diffusers' key conversion ({', '.join(sorted(dropped)[:3])})")
    if problems:
        matched = sum(len(v) for v in layers.values())
        hint = ("none of its layers is in this model: it is a LoRA for another architecture (SD 1.5, SD 2.x, "
                "another SDXL-like model) or another model size" if matched == 0 else
                f"{matched} of its layers match, the rest do not: it was made for another model")
        raise LoraError(f"LoRA {path} does not fit this SDXL model ({hint}); {len(problems)} problems: "
                        + "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
    total = sum(len(v) for v in layers.values())
    if total == 0:
        raise LoraError(f"LoRA {path} holds no LoRA layers (keys: {', '.join(list(tensors)[:5])})")
    lora = Lora(path=str(path.resolve()), sha256=file_sha256(path), format=kind,
                layers={c: v for c, v in layers.items() if v})
    log.info("LoRA %s (%s): %s", path.name, kind, ", ".join(f"{c} {len(v)} layers" for c, v in lora.layers.items()))
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


def _detect_format(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    for pattern, what in UNSUPPORTED:
        hits = [k for k in tensors if pattern.search(k)]
        if hits:
            raise LoraError(f"LoRA file {path} is {what} (keys like {hits[0]!r}); only plain LoRA factors "
                            "(up/down, lora_A/lora_B) are merged: convert or extract it as a LoRA")
    meta = _adapter_metadata(path, metadata)
    if any(meta.get(f"{c}.use_dora") for c in LORA_COMPONENTS):
        raise LoraError(f"LoRA file {path} is DoRA (its metadata sets use_dora); only plain LoRA factors are merged")
    keys = list(tensors)
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        if any(k.startswith("lora_te_") for k in keys):
            raise LoraError(f"LoRA file {path} has one text encoder (lora_te_*): it is a Stable Diffusion 1.x/2.x "
                            "LoRA; SDXL LoRAs have lora_te1_* and lora_te2_*")
        return "kohya"
    if all(k.startswith(DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    others = sorted({k.split(".")[0] for k in keys if not k.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES)})
    raise LoraError(f"LoRA file {path} is neither a diffusers/peft LoRA (unet.*, text_encoder.*, text_encoder_2.*) "
                    f"nor a kohya LoRA (lora_unet_*, lora_te1_*, lora_te2_*); other keys start with "
                    f"{', '.join(others[:5])}")


DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


def _is_down_key(key: str) -> bool:
    return key.endswith(DOWN_SUFFIXES)


def _alpha_key(key: str) -> str | None:
    """``layer.alpha`` for a down key ``layer.lora_down.weight`` (or lora_A, lora.down, ...)."""
    for suffix in DOWN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".alpha"
    return None


def _to_peft_names(path: Path, converted: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{component: {module name: (down, up)}}`` from diffusers' converted state dict, with the renames
    ``load_lora_weights`` applies per component (old diffusers names -> peft names)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for component in LORA_COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in converted.items()
                if k.startswith(f"{component}.") and not k.endswith(".alpha")}
        if not part:
            continue
        try:
            if component == "unet":
                peft = part if any("lora_A" in k for k in part) else convert_unet_state_dict_to_peft(part)
            else:
                peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        except ValueError as e:
            raise LoraError(f"LoRA file {path}: its {component} keys are in no format diffusers knows ({e})") from e
        downs = {k.removesuffix(".lora_A.weight"): v for k, v in peft.items() if k.endswith(".lora_A.weight")}
        ups = {k.removesuffix(".lora_B.weight"): v for k, v in peft.items() if k.endswith(".lora_B.weight")}
        stray = sorted(k for k in peft if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        unpaired = sorted(set(downs) ^ set(ups))
        if stray or unpaired:
            raise LoraError(f"LoRA file {path}: {component} keys that are not LoRA factor pairs: "
                            f"{', '.join((stray + unpaired)[:4])}")
        out[component] = {m: (downs[m], ups[m]) for m in downs}
    return out


def _resolve_parameter(module: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The model parameter a LoRA module name updates. Text-encoder LoRAs keep CLIP's ``text_model.`` level,
    which newer transformers drop (and older ones need)."""
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if f"{candidate}.weight" in shapes:
            return f"{candidate}.weight"
    return None


def _adapter_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"LoRA file {path}: its {METADATA_KEY} metadata is not JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _component_metadata(metadata: Mapping[str, str], component: str) -> dict[str, Any]:
    """The peft LoraConfig values diffusers saved for ``component`` (``unet.lora_alpha``, ...)."""
    raw = metadata.get(METADATA_KEY)
    data = json.loads(raw) if raw else {}
    return {k.removeprefix(f"{component}."): v for k, v in data.items() if k.startswith(f"{component}.")}


def _metadata_alpha(meta: Mapping[str, Any], module: str) -> float | None:
    """peft's alpha for ``module``: an ``alpha_pattern`` entry naming it (or a suffix of it), else ``lora_alpha``."""
    for key, value in (meta.get("alpha_pattern") or {}).items():
        k = key.lstrip("^")
        if module == k or module.endswith("." + k) or re.fullmatch(k, module):
            return float(value)
    alpha = meta.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def _alpha_scale(alpha: float | None, rank: int, meta: Mapping[str, Any]) -> float:
    """alpha / rank (alpha / sqrt(rank) for rsLoRA); 1.0 when the file gives no alpha, as diffusers assumes."""
    if alpha is None:
        return 1.0
    return alpha / (rank ** 0.5 if meta.get("use_rslora") else rank)
