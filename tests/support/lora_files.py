"""Tiny LoRA files for tests, written the way real trainers write them, with the deltas they must produce.

Each writer returns the ground truth ``{component: {parameter name: delta}}`` (float64, at scale 1),
computed here from the factors it wrote and its own knowledge of the key layout, never by the code under
test. Key layouts:

* diffusers / peft (``save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B``, text encoders as
  ``text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight``; alpha in the
  ``lora_adapter_metadata`` JSON (``unet.lora_alpha``) or absent (alpha = rank);
* kohya (A1111 / ComfyUI / Civitai): ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` /
  ``alpha``, text encoders as ``lora_te1_text_model_encoder_layers_N_self_attn_q_proj``; SDXL UNet keys in
  the original (sgm) block layout (``input_blocks_4_1_...``) or in diffusers block names;
* LyCORIS in the kohya layout: LoHa (``hada_*``), LoKr (``lokr_*``), DoRA (``dora_scale``);
* diffusers' training-script layout (``to_k.lora.down.weight`` beside ``lora_A``) and its older
  attention-processor layout (``processor.to_k_lora.down.weight``).

Deltas are written out here from their definitions (einsum over named indices, Kronecker products as
index products), never through sdxl_trt.lora's code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Truth = dict[str, dict[str, torch.Tensor]]


def _factors(shape: tuple[int, ...], rank: int, g: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of ``shape``: conv downs carry the kernel, ups are 1x1."""
    down = torch.randn(rank, *shape[1:], generator=g) * std
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * std
    return down, up


def _delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    out_shape = (up.shape[0], *down.shape[1:])
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(out_shape) * scale


def _te_file_name(param: str) -> str:
    """Module name as LoRA files spell it: with CLIP's ``text_model.`` level, whatever transformers does."""
    module = param.removesuffix(".weight")
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _peft_metadata(comp: str, modules: list[str], rank: int, alpha: float, **extra: object) -> dict[str, object]:
    """The ``lora_adapter_metadata`` entries diffusers' ``save_lora_weights`` writes for one component: its
    peft LoraConfig, which diffusers' loader builds the adapter from (``target_modules`` included)."""
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), **extra}
    return {f"{comp}.{k}": v for k, v in config.items()}


def write_diffusers_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                         alpha: float | None = None, seed: int = 0, std: float = 0.2,
                         components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"),
                         only: str | None = None, module_names: bool = False) -> Truth:
    """A peft-keyed LoRA on every Linear/Conv2d weight (``only``: names containing it) of ``components``;
    text-encoder modules under CLIP's ``text_model.`` level, or (``module_names``) as the installed
    transformers names them (what diffusers saves today)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {}
    meta: dict[str, object] = {}
    for comp in components:
        truth[comp] = {}
        for param, shape in shapes[comp].items():
            if only is not None and only not in param:
                continue
            down, up = _factors(shape, rank, g, std)
            module = param.removesuffix(".weight") if comp == "unet" or module_names else _te_file_name(param)
            tensors[f"{comp}.{module}.lora_A.weight"] = down
            tensors[f"{comp}.{module}.lora_B.weight"] = up
            truth[comp][param] = _delta(down, up, (alpha if alpha is not None else rank) / rank)
        if alpha is not None:
            modules = [k.removeprefix(f"{comp}.").removesuffix(".lora_A.weight") for k in tensors
                       if k.startswith(f"{comp}.") and k.endswith(".lora_A.weight")]
            meta.update(_peft_metadata(comp, modules, rank, alpha))
    metadata = {"format": "pt", **({"lora_adapter_metadata": json.dumps(meta)} if meta else {})}
    save_file(tensors, str(path), metadata=metadata)
    return truth


KOHYA_UNET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                       "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
KOHYA_TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection")


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_layers(shapes: Mapping[str, Mapping[str, tuple[int, ...]]]):
    """(component, parameter, kohya layer name, shape) of every layer a kohya/LyCORIS trainer targets, with
    diffusers block names (``lora_unet_down_blocks_1_..._to_q``, ``lora_te1_text_model_encoder_...``)."""
    for comp, suffixes in (("unet", KOHYA_UNET_SUFFIXES), ("text_encoder", KOHYA_TE_SUFFIXES),
                           ("text_encoder_2", KOHYA_TE_SUFFIXES)):
        for param, shape in shapes[comp].items():
            module = param.removesuffix(".weight")
            if not module.endswith(suffixes):
                continue
            name = KOHYA_PREFIXES[comp] + (module if comp == "unet" else _te_file_name(param)).replace(".", "_")
            if comp != "unet" and module.endswith("text_projection"):
                name = KOHYA_PREFIXES[comp] + "text_projection"
            yield comp, param, name, shape


def write_kohya_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                     alpha: float = 2.0, seed: int = 1, std: float = 0.2) -> Truth:
    """A kohya LoRA with diffusers block names (as OneTrainer / ai-toolkit write SDXL), one alpha for all."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for comp, param, name, shape in kohya_layers(shapes):
        down, up = _factors(shape, rank, g, std)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        truth[comp][param] = _delta(down, up, alpha / rank)
    save_file(tensors, str(path))
    return truth


def _cp64(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker-decomposed kernel [out, in, kh, kw] from core [r, r, kh, kw], [r, out] and [r, in]:
    W[o, i] = sum_ab out_factor[a, o] core[a, b] in_factor[b, i], written out as the definition reads."""
    return torch.einsum("ao,abkl,bi->oikl", out_factor.double(), core.double(), in_factor.double())


def write_loha_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                    alpha: float = 2.0, seed: int = 3, std: float = 0.4, cp: bool = True) -> Truth:
    """A LyCORIS LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, ``alpha``; with ``cp`` the 3x3 convolutions get
    ``hada_t1``/``hada_t2`` cores, their ``a`` factors ``[rank, out]``) on the kohya layers of every component.
    delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, per side through its core where there is one."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for comp, param, name, shape in kohya_layers(shapes):
        sides = []
        for side in (1, 2):
            if cp and len(shape) == 4 and shape[2:] != (1, 1):
                core = torch.randn(rank, rank, *shape[2:], generator=g) * std
                a, b = torch.randn(rank, shape[0], generator=g) * std, torch.randn(rank, shape[1], generator=g) * std
                tensors[f"{name}.hada_t{side}"] = core
                sides.append(_cp64(core, a, b))
            else:
                cols = int(torch.tensor(shape[1:]).prod())
                a, b = torch.randn(shape[0], rank, generator=g) * std, torch.randn(rank, cols, generator=g) * std
                sides.append((a.double() @ b.double()).reshape(shape))
            tensors[f"{name}.hada_w{side}_a"], tensors[f"{name}.hada_w{side}_b"] = a, b
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        truth[comp][param] = sides[0] * sides[1] * (alpha / rank)
    save_file(tensors, str(path))
    return truth


def _split(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor not above sqrt(n) (how LyCORIS factorises a LoKr dimension)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def write_lokr_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 2,
                    alpha: float = 3.0, seed: int = 4, std: float = 0.3) -> Truth:
    """A LyCORIS LoKr on the kohya layers, its layers taking turns between the forms LyCORIS writes: w1 whole
    or ``lokr_w1_a/b``; w2 whole, ``lokr_w2_a/b`` or (3x3 convolutions) through a ``lokr_t2`` core.
    delta = kron(w1, w2) * alpha / rank, with no alpha scaling when both sides are whole (as LyCORIS, A1111 and
    ComfyUI: such a layer has no rank)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for i, (comp, param, name, shape) in enumerate(kohya_layers(shapes)):
        (o1, o2), (i1, i2) = _split(shape[0]), _split(shape[1])
        kernel = tuple(shape[2:])
        if i % 2:
            w1a, w1b = torch.randn(o1, rank, generator=g) * std, torch.randn(rank, i1, generator=g) * std
            tensors[f"{name}.lokr_w1_a"], tensors[f"{name}.lokr_w1_b"] = w1a, w1b
            w1 = w1a.double() @ w1b.double()
        else:
            w1 = torch.randn(o1, i1, generator=g) * std
            tensors[f"{name}.lokr_w1"] = w1
        form = i % 3
        if form == 0:
            w2 = torch.randn(o2, i2, *kernel, generator=g) * std
            tensors[f"{name}.lokr_w2"] = w2
        elif form == 2 and kernel not in ((), (1, 1)):
            core = torch.randn(rank, rank, *kernel, generator=g) * std
            a, b = torch.randn(rank, o2, generator=g) * std, torch.randn(rank, i2, generator=g) * std
            tensors[f"{name}.lokr_t2"], tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"] = core, a, b
            w2 = _cp64(core, a, b)
        else:
            cols = i2 * int(torch.tensor(kernel).prod()) if kernel else i2
            a, b = torch.randn(o2, rank, generator=g) * std, torch.randn(rank, cols, generator=g) * std
            tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"] = a, b
            w2 = (a.double() @ b.double()).reshape(o2, i2, *kernel)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        whole = f"{name}.lokr_w1" in tensors and f"{name}.lokr_w2" in tensors
        w1 = w1.double().reshape(o1, i1, *([1] * len(kernel)))
        delta = torch.einsum("ab...,cd...->acbd...", w1, w2.double()).reshape(shape)  # kron, written out
        truth[comp][param] = delta * (1.0 if whole else alpha / rank)
    save_file(tensors, str(path))
    return truth


DoraTruth = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, bool]]]


def _trained_magnitudes(merged: torch.Tensor, on_output: bool, g: torch.Generator) -> torch.Tensor:
    """DoRA magnitudes as training leaves them: the norms of base + delta per output row (``[out, 1, ...]``)
    or input column (``[1, in, ...]``), each scaled by 0.7..1.3."""
    ones = [1] * (merged.dim() - 2)
    if on_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], 1, *ones)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(1, merged.shape[1], *ones)
    return (norm * (0.7 + 0.6 * torch.rand(norm.shape, generator=g, dtype=torch.float64))).float()


def write_kohya_dora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                     base: Mapping[str, Mapping[str, torch.Tensor]], *, rank: int = 4, alpha: float = 2.0,
                     seed: int = 5, std: float = 0.2, on_output: bool = True) -> DoraTruth:
    """A kohya/LyCORIS DoRA: LoRA factors plus ``dora_scale`` per layer, ``[out, 1, ...]`` per output channel
    (LyCORIS' default) or ``[1, in, ...]`` per input channel (older kohya files). The magnitudes are the norms
    of ``base`` + delta scaled by 0.7..1.3 per channel, as training moves them. Returns {component: {parameter:
    (delta, magnitude, on_output)}} (float64, magnitude shaped to broadcast against the weight)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: DoraTruth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for comp, param, name, shape in kohya_layers(shapes):
        down, up = _factors(shape, rank, g, std)
        delta = _delta(down, up, alpha / rank)
        magnitude = _trained_magnitudes(base[comp][param].double() + delta, on_output, g)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        tensors[f"{name}.dora_scale"] = magnitude
        truth[comp][param] = (delta, magnitude.double(), on_output)
    save_file(tensors, str(path))
    return truth


def write_peft_dora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                    base: Mapping[str, Mapping[str, torch.Tensor]], *, rank: int = 4, alpha: float = 8.0, seed: int = 8,
                    std: float = 0.2, only: str | None = None,
                    components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")) -> DoraTruth:
    """A DoRA as diffusers saves a peft ``use_dora`` adapter: ``lora_A``/``lora_B`` plus ``lora_magnitude_vector``
    per layer (``[out]``, convolutions ``[1, out, 1, 1]``: peft's shapes, always per output channel), module
    names as the installed libraries name them, alpha in ``lora_adapter_metadata``. Magnitudes as
    :func:`write_kohya_dora`; returns the same kind of truth (per output channel)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: DoraTruth = {}
    for comp in components:
        truth[comp] = {}
        for param, shape in shapes[comp].items():
            if only is not None and only not in param:
                continue
            down, up = _factors(shape, rank, g, std)
            delta = _delta(down, up, alpha / rank)
            magnitude = _trained_magnitudes(base[comp][param].double() + delta, True, g)  # [out, 1, ...]
            stem = f"{comp}.{param.removesuffix('.weight')}"
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down, up
            tensors[f"{stem}.lora_magnitude_vector"] = magnitude.reshape(1, -1, 1, 1) if len(shape) == 4 \
                else magnitude.flatten()
            truth[comp][param] = (delta, magnitude.double(), True)
    meta = {}
    for c, layers in truth.items():
        meta.update(_peft_metadata(c, [n.removesuffix(".weight") for n in layers], rank, alpha, use_dora=True))
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return truth


SCRIPT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "q_proj", "k_proj", "v_proj",
                  "out_proj", "fc1", "fc2")
"""The training scripts' attention layers plus the feed-forwards (their ``--lora_layers``-style choice)."""


def write_training_script_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                               seed: int = 6, std: float = 0.2,
                               targets: tuple[str, ...] | None = SCRIPT_TARGETS) -> Truth:
    """A LoRA saved as diffusers' SDXL LoRA training scripts save it:
    ``StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(
    get_peft_model_state_dict(unet)), text_encoder_lora_layers=..., ...)``: peft's state dict (``lora_A``/``lora_B``)
    through diffusers' own renaming, so attention layers read ``to_k.lora.down.weight`` (text encoders
    ``q_proj.lora_linear_layer.down.weight``) beside ``conv1.lora_A.weight``; module names as the installed
    transformers names them (peft's state dict does); no alpha (alpha = rank). ``targets``: the modules
    trained (None: every Linear/Conv2d layer)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    g = torch.Generator().manual_seed(seed)
    truth: Truth = {}
    layers = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        peft_sd, truth[comp] = {}, {}
        for param, shape in shapes[comp].items():
            module = param.removesuffix(".weight")
            if targets is not None and not module.endswith(targets):
                continue
            down, up = _factors(shape, rank, g, std)
            peft_sd[f"{module}.lora_A.weight"], peft_sd[f"{module}.lora_B.weight"] = down, up
            truth[comp][param] = _delta(down, up, 1.0)
        layers[comp] = convert_state_dict_to_diffusers(peft_sd)
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=path.name)
    return truth


def write_attn_procs_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                          seed: int = 7, std: float = 0.2) -> Truth:
    """A LoRA of diffusers' attention-processor days (before peft): attention layers only, keys
    ``unet.<block>.attn1.processor.to_k_lora.down.weight`` and ``text_encoder.<layer>.self_attn.to_k_lora.up.weight``."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
             "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for comp in truth:
        for param, shape in shapes[comp].items():
            module = param.removesuffix(".weight") if comp == "unet" else _te_file_name(param)
            head, _, last = module.rpartition(".")
            if module.endswith("to_out.0"):
                head, last = module.removesuffix(".to_out.0"), "to_out.0"
            if last not in names or (comp == "unet" and ".attn" not in module):
                continue
            down, up = _factors(shape, rank, g, std)
            stem = f"{comp}.{head}.processor.{names[last]}" if comp == "unet" else f"{comp}.{head}.{names[last]}"
            tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
            truth[comp][param] = _delta(down, up, 1.0)
    save_file(tensors, str(path))
    return truth


# The tiny UNet (layers_per_block 2; DownBlock2D, CrossAttnDownBlock2D x2) in the original sgm layout,
# worked out by hand from SDXL's block structure: input_blocks 1-2 = down block 0's resnets, 3 its
# downsampler, 4-5 down block 1 (resnet .0, attention .1), 6 its downsampler, 7-8 down block 2; output_blocks
# 0-2 = up block 0, whose third also holds the upsampler (.2).
SGM_TINY = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks_8_1_transformer_blocks_1_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "out_2": "conv_out",
}


def write_kohya_sgm_lora(path: Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, rank: int = 4,
                         seed: int = 2, std: float = 0.2) -> Truth:
    """A kohya SDXL LoRA in the sgm block layout (what kohya's sd-scripts write), an alpha per layer."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    truth: Truth = {"unet": {}}
    for i, (sgm, module) in enumerate(SGM_TINY.items()):
        shape = shapes["unet"][f"{module}.weight"]
        down, up = _factors(shape, rank, g, std)
        alpha = 1.0 + i % 4  # 1..4: per-layer alphas, as kohya defines them
        tensors[f"lora_unet_{sgm}.lora_down.weight"] = down
        tensors[f"lora_unet_{sgm}.lora_up.weight"] = up
        tensors[f"lora_unet_{sgm}.alpha"] = torch.tensor(alpha)
        truth["unet"][f"{module}.weight"] = _delta(down, up, alpha / rank)
    save_file(tensors, str(path))
    return truth


def _write_plain_kohya(path: Path, layers: Mapping[str, tuple[int, int]], rank: int = 4) -> None:
    t = {}
    for name, (o, i) in layers.items():
        t[f"{name}.lora_down.weight"] = torch.randn(rank, i)
        t[f"{name}.lora_up.weight"] = torch.randn(o, rank)
        t[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(t, str(path))


def write_sd15_kohya_lora(path: Path) -> None:
    """An SD 1.5 kohya LoRA's key layout and widths (one text encoder of width 768, 320-wide UNet)."""
    _write_plain_kohya(path, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)})


def write_sd15_unet_only_lora(path: Path) -> None:
    """An SD 1.5 UNet LoRA (no text encoder): its layers name attention blocks SDXL's tiny UNet lacks
    (``down_blocks.0.attentions``) and widths it does not have."""
    _write_plain_kohya(path, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v": (320, 768)})


ATTN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def write_refused_kind(path: Path, kind: str) -> None:
    """A file of a LyCORIS/peft kind that is no added update (OFT, BOFT, (IA)^3, GLoRA, full), as its trainer
    keys it, on one tiny attention layer (64 x 64)."""
    n = ATTN
    layers = {
        "OFT": {f"{n}.oft_blocks": torch.randn(4, 16, 16), f"{n}.alpha": torch.tensor(1.0)},
        "BOFT": {f"{n}.oft_blocks": torch.randn(2, 4, 16, 16), f"{n}.alpha": torch.tensor(1.0)},
        "(IA)^3": {f"{n}.weight": torch.randn(64), f"{n}.on_input": torch.tensor(False)},
        "GLoRA": {f"{n}.a1.weight": torch.randn(4, 64), f"{n}.a2.weight": torch.randn(64, 4),
                  f"{n}.b1.weight": torch.randn(4, 64), f"{n}.b2.weight": torch.randn(64, 4)},
        "full": {f"{n}.diff": torch.randn(64, 64), f"{n}.diff_b": torch.randn(64)},
    }
    save_file(layers[kind], str(path))


def write_sd15_loha(path: Path) -> None:
    """An SD 1.5 LoHa: one text encoder (lora_te_*)."""
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.randn(768, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_b": torch.randn(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_a": torch.randn(768, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b": torch.randn(4, 768)}, str(path))


def write_mixed_rank_loha(path: Path) -> None:
    """A LoHa layer whose factors do not multiply (hada_w1_a rank 4, hada_w1_b rank 3)."""
    save_file({f"{ATTN}.hada_w1_a": torch.randn(64, 4), f"{ATTN}.hada_w1_b": torch.randn(3, 64),
               f"{ATTN}.hada_w2_a": torch.randn(64, 4), f"{ATTN}.hada_w2_b": torch.randn(4, 64)}, str(path))


def write_unmatched_lokr(path: Path) -> None:
    """A LoKr naming a block the tiny UNet lacks (down_blocks.3)."""
    n = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.lokr_w1": torch.randn(8, 8), f"{n}.lokr_w2": torch.randn(8, 8)}, str(path))


def write_diffusers_layout_loha(path: Path) -> None:
    """LoHa factors under diffusers' ``unet.`` names, which no trainer writes and no reader maps."""
    n = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{n}.hada_w1_a": torch.randn(64, 4), f"{n}.hada_w1_b": torch.randn(4, 64),
               f"{n}.hada_w2_a": torch.randn(64, 4), f"{n}.hada_w2_b": torch.randn(4, 64)}, str(path))


def truncate(src: Path, dst: Path, *, keep: float = 0.6) -> None:
    """``src`` cut short, as an interrupted download leaves it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
