"""Which kind of network a LoRA file holds and in which key layout, from its key names and shapes alone.

Layouts (how keys name a layer and its factors):

* kohya / LyCORIS (A1111, ComfyUI, Civitai, kohya's sd-scripts, LyCORIS): ``lora_unet_<module>``,
  ``lora_te1_<module>``, ``lora_te2_<module>``, each layer's factors after the first dot (:data:`KOHYA_FACTORS`);
* diffusers / peft (``save_lora_weights``, the diffusers training scripts): ``unet.<module>``,
  ``text_encoder.<module>``, ``text_encoder_2.<module>`` with peft factors (``lora_A``/``lora_B``,
  ``lora_magnitude_vector``) or diffusers' older names (``lora.down``/``lora.up``, ``to_k_lora``,
  ``lora_linear_layer``), renamed to peft names by diffusers' own tables (:mod:`.reading`).

Kinds: LoRA, LoCon (LoRA on 3x3 convolutions, optionally with a Tucker core), LoHa, LoKr, and DoRA
(magnitudes on any of them). Kinds refused by name (:data:`REFUSED`) change a weight in ways that are not an
added update or change more than weights (OFT and BOFT rotate it, (IA)^3 scales activations, GLoRA, norm
layers, biases, full-weight differences with bias diffs). No diffusers and no tensor data needed here:
:func:`inspect_file` reads a file's header only (``GET /sdapi/v1/loras`` lists every file with its kind).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .canonical import LORA_COMPONENTS

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
DIFFUSERS_PREFIXES = tuple(f"{c}." for c in LORA_COMPONENTS)
METADATA_KEY = "lora_adapter_metadata"

KOHYA_FACTORS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    **{k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                      "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    "alpha": "alpha", "dora_scale": "magnitude",
}
"""kohya/LyCORIS factor keys (what follows ``lora_unet_<module>.``) -> the factor names of :mod:`.kinds`."""

PEFT_FACTORS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
"""peft key suffixes (after diffusers' renames) -> factor names."""

DIFFUSERS_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
                             "_lora.down.weight", "_lora.up.weight", ".lora_linear_layer.down.weight",
                             ".lora_linear_layer.up.weight", ".lora_magnitude_vector", ".alpha")
"""Every key suffix of the diffusers/peft layout, old diffusers names (``to_k_lora.down.weight``) included."""

REFUSED: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"\.(oft_blocks|oft_diag|oft_r|oft_R|rescale)$"), "OFT",
     "orthogonal finetuning multiplies the weight by a learned rotation"),
    (re.compile(r"\.(boft_R|boft_s)$"), "BOFT", "butterfly orthogonal finetuning multiplies the weight by rotations"),
    (re.compile(r"\.(ia3_l|on_input)$|\.ia3_"), "(IA)^3", "it scales activations, not weights"),
    (re.compile(r"\.[ab][12]\.weight$"), "GLoRA", "its update mixes the weight with its own low-rank products"),
    (re.compile(r"\.(w_norm|b_norm)$"), "a LyCORIS norm-layer network", "it changes normalisation layers"),
    (re.compile(r"\.diff(_b)?$"), "a full-weight difference (LyCORIS 'full')", "it is not low-rank factors"),
    (re.compile(r"\.lora_embedding_[AB]$"), "an embedding adapter", "it changes token embeddings"),
    (re.compile(r"(\.(lora_B|lora_up|lora\.up|lora_linear_layer\.up)\.bias|\.bias)$"), "a LoRA with biases",
     "it also changes the layers' biases, which engines keep as constants"),
)
"""(key pattern, kind, why it is not merged here); checked before anything else."""

@dataclass(frozen=True)
class FileKind:
    """What a file is, by its keys: the layout, the kind, and why it is refused (None when it is read)."""

    layout: str  # "kohya", "diffusers" or "unknown"
    kind: str  # LoRA, LoCon, LoHa, LoKr, DoRA, LoHa+DoRA, ..., or the refused kind (OFT, ...)
    refused: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": self.layout, "kind": self.kind, "supported": self.refused is None,
                **({"refused": self.refused} if self.refused else {})}


def classify(path: Path, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> FileKind:
    """The layout and kind of a file with these keys (and shapes); ``refused`` says why it cannot be merged
    (the message names the file, the kind and keys), None when :mod:`.reading` reads it."""
    keys = list(shapes)
    for pattern, kind, why in REFUSED:
        hits = [k for k in keys if pattern.search(k)]
        if kind == "OFT" and any(len(shapes[k]) == 4 for k in hits if k.endswith(".oft_blocks")):
            kind, why = "BOFT", "butterfly orthogonal finetuning multiplies the weight by rotations"
        if hits:
            return FileKind(_layout(keys), kind, f"LoRA file {path} is {kind} (keys like {hits[0]!r}): {why}, so it "
                            "cannot be merged into an engine's weights; sdxl-trt merges LoRA, LoCon, LoHa, LoKr and "
                            "DoRA files")
    layout = _layout(keys)
    kind = _kind(layout, shapes, metadata)
    if layout == "unknown":
        others = sorted({k.split(".")[0] for k in keys if not k.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES)})
        return FileKind(layout, kind, f"LoRA file {path} is neither in the diffusers/peft layout (unet.*, "
                        "text_encoder.*, text_encoder_2.*) nor in the kohya/LyCORIS one (lora_unet_*, lora_te1_*, "
                        f"lora_te2_*); other keys start with {', '.join(others[:5])}")
    if layout == "kohya" and (te := [k for k in keys if k.startswith("lora_te_")]):
        return FileKind(layout, kind, f"{kind} file {path} has one text encoder (lora_te_*, keys like {te[0]!r}): it "
                        "is a Stable Diffusion 1.x/2.x network; SDXL networks have lora_te1_* and lora_te2_*")
    if layout == "diffusers":
        lyco = [k for k in keys if not k.endswith(DIFFUSERS_FACTOR_SUFFIXES)]
        if lyco:
            return FileKind(layout, kind, f"{kind} file {path} has keys that are no LoRA factors in the diffusers/peft "
                            f"layout ({', '.join(lyco[:3])}); LyCORIS kinds (LoHa, LoKr) are read in the "
                            "kohya/LyCORIS layout (lora_unet_<module>.hada_w1_a, ...)")
    if layout == "kohya":
        stray = [k for k in keys if k.partition(".")[2] not in KOHYA_FACTORS]
        if stray:
            return FileKind(layout, kind, f"{kind} file {path} has keys that are no factor of LoRA, LoCon, LoHa, LoKr "
                            f"or DoRA ({', '.join(stray[:3])})")
    return FileKind(layout, kind)


def _layout(keys: list[str]) -> str:
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if all(k.startswith(DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    return "unknown"


def _kind(layout: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str:
    """LoRA, LoCon, LoHa, LoKr (joined with '+' when a file mixes them), DoRA for LoRA/LoCon with magnitudes,
    '+DoRA' after the others."""
    kinds: set[str] = set()
    conv = dora = False
    for key, shape in shapes.items():
        factor = key.partition(".")[2] if layout == "kohya" else key
        if "hada_" in factor:
            kinds.add("LoHa")
        elif "lokr_" in factor:
            kinds.add("LoKr")
        elif "dora_scale" in factor or "lora_magnitude_vector" in factor:
            dora = True
        elif factor.endswith("alpha"):
            continue
        else:
            kinds.add("LoRA")
            conv |= factor.endswith("lora_mid.weight") or (len(shape) == 4 and tuple(shape[2:]) != (1, 1))
    meta = _adapter_metadata(metadata)
    dora |= any(meta.get(f"{c}.use_dora") for c in LORA_COMPONENTS)
    if "LoRA" in kinds and conv:
        kinds = (kinds - {"LoRA"}) | {"LoCon"}
    if dora and kinds <= {"LoRA", "LoCon"}:
        return "DoRA"
    name = "+".join(sorted(kinds)) or "LoRA"
    return f"{name}+DoRA" if dora else name


def _adapter_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    try:
        data = json.loads(metadata.get(METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def inspect_file(path: str | Path, *, label: str | None = None) -> FileKind:
    """:func:`classify` from the file's header only (no tensor is read): what ``GET /sdapi/v1/loras`` lists.
    ``label`` names the file in messages instead of its path (a server does not show its paths)."""
    from safetensors import safe_open

    path = Path(path)
    shown = Path(label) if label is not None else path
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a mapping
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        return FileKind("unknown", "unreadable", f"LoRA file {shown} is not a readable .safetensors file: {e}")
    if not shapes:
        return FileKind("unknown", "empty", f"LoRA file {shown} holds no tensors")
    return classify(shown, shapes, metadata)
