"""Each kind of LoRA file, written the way its trainer writes it, and merged into copies of the tiny modules by
the library that defines the kind (never by sdxl_trt.lora):

* diffusers' own ``load_lora_weights`` + ``fuse_lora`` + ``unload_lora_weights`` for what diffusers loads
  (peft-keyed LoRAs, its training scripts' layout, attention-processor names, kohya LoCon, peft DoRA);
* peft's own LoHa and LoKr layers (``LoHaConfig`` / ``LoKrConfig``, ``get_peft_model``, ``merge_and_unload``),
  whose trained-looking random factors are then written in the kohya/LyCORIS key layout (diffusers loads
  neither kind);
* LyCORIS' own kohya network (``lycoris.kohya``: ``create_network``, ``save_weights``,
  ``create_network_from_weights``, ``merge_to``) for a LoCon with Tucker cores and DoRA scales.

``merge_*`` functions change the modules they are given in place, so kinds can be stacked in order (as a
build fuses them). Factors are drawn with fixed seeds; ``std`` was picked so each file changes the tiny
model's image clearly (tens of levels here and there) without saturating it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import lora_files as lf

Modules = dict[str, torch.nn.Module]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def copies(base) -> Modules:
    return {c: copy.deepcopy(getattr(base, c)) for c in COMPONENTS}


def shapes_of(base) -> dict[str, dict[str, tuple[int, ...]]]:
    out = {}
    for c in COMPONENTS:
        out[c] = {f"{n}.weight": tuple(m.weight.shape) for n, m in getattr(base, c).named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return out


def diffusers_pipe(base, modules: Modules):
    import diffusers
    from transformers import CLIPTokenizer

    pipe = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=modules["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def merge_with_diffusers(base, modules: Modules, path: Path, scale: float = 1.0) -> None:
    """diffusers' own loading and fusing of ``path`` into ``modules`` (in place)."""
    pipe = diffusers_pipe(base, modules)
    pipe.load_lora_weights(str(path), adapter_name="ref_" + path.stem.replace(".", "_").replace("-", "_"))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()


def _randomize(module: torch.nn.Module, markers: tuple[str, ...], g: torch.Generator, std: float) -> None:
    """Trained-looking factors: peft starts one factor at zero (no change); training moves them all."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(m in name for m in markers):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _kohya_names(comp: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, str]:
    """Module name (as peft names it) -> kohya layer name, for the layers kohya/LyCORIS trainers target."""
    return {param.removesuffix(".weight"): name for c, param, name, _ in lf.kohya_layers(shapes) if c == comp}


def peft_lycoris(modules: Modules, shapes, kind: str, path: Path, *, seed: int, std: float, rank: int,
                 alpha: float, **config) -> None:
    """peft's own ``kind`` ("loha" or "lokr") layers on every kohya-targeted layer of ``modules``, given random
    factors (the same for the same seed, whatever the modules' weights), written to ``path`` in the
    kohya/LyCORIS layout, then merged by peft (``merge_and_unload``; ``modules`` updated in place). peft scales
    every layer by its ``alpha / r``; LyCORIS (and A1111, ComfyUI) leave a LoKr layer whose two sides are whole
    unscaled (it has no rank), so such a layer's scale goes into its ``lokr_w1``."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model, get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    config_cls, marker = (LoHaConfig, "hada_") if kind == "loha" else (LoKrConfig, "lokr_")
    tensors: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        names = _kohya_names(comp, shapes)
        cfg = {k: v for k, v in config.items() if comp == "unet" or k != "rank_pattern"}  # UNet module names
        model = get_peft_model(modules[comp], config_cls(r=rank, alpha=alpha, target_modules=list(names), **cfg))
        _randomize(model, (marker,), g, std)
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in get_peft_model_state_dict(model).items():
            module, _, factor = key.removeprefix("base_model.model.").rpartition(".")
            layers.setdefault(module, {})[factor] = value.detach().clone()
        for module, factors in layers.items():
            layer = model.base_model.model.get_submodule(module)
            if {"lokr_w1", "lokr_w2"} <= set(factors):
                factors["lokr_w1"] = factors["lokr_w1"] * layer.scaling["default"]
            for factor, value in factors.items():
                tensors[f"{names[module]}.{factor}"] = value.contiguous()
            tensors[f"{names[module]}.alpha"] = torch.tensor(float(layer.alpha["default"]))
        modules[comp] = model.merge_and_unload()
    save_file(tensors, str(path))


def write_lycoris_locon_dora(base_modules: Modules, path: Path, *, seed: int, std: float) -> None:
    """LyCORIS' own kohya network on copies of ``base_modules``: LoCon with Tucker cores on the 3x3
    convolutions and DoRA scales per output channel, on the UNet and both text encoders, given random factors
    and magnitudes 0.7..1.3 times LyCORIS' initial ones (the base norms), saved by LyCORIS to ``path``."""
    from lycoris.kohya import LycorisNetworkKohya

    g = torch.Generator().manual_seed(seed)
    te = [copy.deepcopy(base_modules["text_encoder"]), copy.deepcopy(base_modules["text_encoder_2"])]
    unet = copy.deepcopy(base_modules["unet"])
    # SD's block classes only: LyCORIS' default list also names TimestepEmbedding (another model's), which
    # would target time_embedding twice.
    LycorisNetworkKohya.apply_preset({
        "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
        "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
        "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"]})
    with torch.no_grad():
        network = LycorisNetworkKohya(te, unet, multiplier=1.0, lora_dim=4, conv_lora_dim=4, alpha=2.0, conv_alpha=2.0,
                                      use_tucker=True, network_module="locon", weight_decompose=True, wd_on_out=True)
        network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)  # registers its modules
        for lora in network.unet_loras + network.text_encoder_loras:
            for name, p in lora.named_parameters():
                if name == "dora_scale":
                    p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
                elif "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        network.save_weights(str(path), torch.float32, {})


def merge_with_lycoris(modules: Modules, path: Path) -> None:
    """LyCORIS' own loading and merging of a kohya-layout file into ``modules`` (in place)."""
    from lycoris.kohya import create_network_from_weights

    te = [modules["text_encoder"], modules["text_encoder_2"]]
    with torch.no_grad():
        network, weights = create_network_from_weights(1.0, str(path), None, te, modules["unet"], for_inference=True)
        network.merge_to(te, modules["unet"], weights, torch.float32, "cpu")
