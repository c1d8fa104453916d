"""Model loading: every kind of ``--model`` (preset, diffusers directory, single-file checkpoint) loads
exactly the weights it holds, offline, and bad input fails with a ModelLoadError that names the problem.

Export, the engines and the runtime all trust ``load_model``: a silently wrong weight here (a text
encoder given the other encoder's weights, a missing tensor left random) would pass every later check
that compares against the same loaded model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.original_layout import (
    OPEN_CLIP_BASE_PREFIX,
    OPEN_CLIP_REFINER_PREFIX,
    clip_to_original,
    open_clip_to_original,
    to_original_layout,
    unet_to_original,
    vae_to_original,
)

from sdxl_trt.contracts import ModelDims
from sdxl_trt.errors import ModelLoadError
from sdxl_trt.export.loading import LoadedModel, check_diffusers_dir, hash_model_files, load_model, model_dims
from sdxl_trt.presets import PRESETS, SCHEDULER_CONFIG, TINY_VAE, write_tokenizer_dir

# --- a second SDXL-shaped config, different from `tiny` in every width that model_dims reports -------
# Text widths 16 + 40 = context 56; pooled (projection) 16 differs from hidden 40, which exercises the
# OpenCLIP q/k/v split; time ids 6 x 4 + 16 = 40 (refiner: 5 x 4 + 16 = 36).
OTHER_TE1 = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                 projection_dim=16, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
OTHER_TE2 = {**OTHER_TE1, "hidden_size": 40, "intermediate_size": 80, "num_attention_heads": 4,
             "num_hidden_layers": 4, "hidden_act": "gelu"}
OTHER_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[16, 32, 48], attention_head_dim=[2, 4, 6], transformer_layers_per_block=[1, 2, 1],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=56, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=40, use_linear_projection=True,
)
OTHER_REFINER_UNET: dict[str, Any] = {
    **OTHER_UNET,
    "block_out_channels": [16, 32, 32, 48], "attention_head_dim": [2, 4, 4, 6], "transformer_layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 40, "projection_class_embeddings_input_dim": 36,
}
OTHER_VAE: dict[str, Any] = dict(
    block_out_channels=[8, 16, 16, 32], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    sample_size=64, scaling_factor=0.2,
)


@dataclass
class SavedModel:
    """A model written to disk plus the state dicts it was written from (the ground truth)."""

    path: Path
    config_dir: Path
    weights: dict[str, dict[str, torch.Tensor]]


def _state_dicts(modules: Mapping[str, torch.nn.Module | None]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items() if m is not None}


def _assert_weights_equal(model: LoadedModel, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    got = model.modules()
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name].state_dict()
        assert set(have) == set(want), f"{name}: keys differ: {sorted(set(have) ^ set(want))[:5]}"
        for k, v in want.items():
            assert have[k].dtype == v.dtype and torch.equal(have[k], v), f"{name}.{k} differs"


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Nothing here may touch the network. Attempts are recorded as well as refused, so one that a
    library catches and recovers from still fails the module (at teardown)."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args)[:200])
        raise OSError("network access is not allowed in these tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_refiner() -> LoadedModel:
    return load_model("tiny-refiner")


def _save_other_pipeline(out: Path, kind: str) -> SavedModel:
    """A real ``save_pretrained`` directory of an SDXL-shaped model whose widths differ from tiny's."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(7)
    base = kind == "base"
    unet = UNet2DConditionModel(**(OTHER_UNET if base else OTHER_REFINER_UNET))
    vae = AutoencoderKL(**OTHER_VAE)
    te1 = CLIPTextModel(CLIPTextConfig(**OTHER_TE1)) if base else None
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OTHER_TE2))
    write_tokenizer_dir(out.parent / f"{out.name}-tokenizer", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(out.parent / f"{out.name}-tokenizer")
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    if base:
        pipe: Any = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True)
    pipe.save_pretrained(out)
    weights = _state_dicts({"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2})
    return SavedModel(out, out, weights)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    return _save_other_pipeline(tmp_path_factory.mktemp("dirs") / "other-base", "base")


@pytest.fixture(scope="module")
def other_refiner(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    return _save_other_pipeline(tmp_path_factory.mktemp("dirs") / "other-refiner", "refiner")


def _write_single_file(model: LoadedModel, path: Path) -> Path:
    save_file(to_original_layout(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                                 text_encoder_2=model.text_encoder_2), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_file(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    d = tmp_path_factory.mktemp("single")
    path = _write_single_file(tiny, d / "tiny.safetensors")
    config = PRESETS["tiny"].write_config_dir(d / "tiny-config")
    return SavedModel(path, config, _state_dicts(tiny.modules()))


@pytest.fixture(scope="module")
def diffusers_dir_copy(other_base: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Copies of the saved base directory, for tests that break one thing in it."""

    def copy(name: str) -> Path:
        out = tmp_path_factory.mktemp("broken") / name
        shutil.copytree(other_base.path, out)
        return out

    return copy


# --- 1. presets ----------------------------------------------------------------------------------------


def test_tiny_presets_have_the_documented_widths(tiny: LoadedModel, tiny_refiner: LoadedModel) -> None:
    """The contract's shapes for the embedded default model come from these numbers."""
    assert (tiny.kind, tiny_refiner.kind) == ("base", "refiner")
    assert tiny_refiner.text_encoder is None
    assert model_dims(tiny, tiny_refiner) == ModelDims(
        text_hidden_1=32, text_hidden_2=32, pooled_dim=32, unet_context=64, unet_time_ids=6, latent_channels=4,
        refiner_context=32, refiner_time_ids=5, refiner_pooled_dim=32, unet_downsamples=2, refiner_downsamples=3,
    )
    assert model_dims(tiny).refiner_downsamples == 0
    assert tiny.vae_scaling_factor == TINY_VAE["scaling_factor"]
    assert tiny.options == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
    assert tiny_refiner.options["requires_aesthetics_score"] is True
    unet_config = json.loads((tiny.config_dir / "unet" / "config.json").read_text())  # copied next to engines
    assert unet_config["block_out_channels"] == list(tiny.unet.config.block_out_channels)


@pytest.mark.parametrize("name", ["tiny", "tiny-refiner"])
def test_presets_are_deterministic(name: str, tiny: LoadedModel, tiny_refiner: LoadedModel) -> None:
    """Engines built yesterday must match today's export of the same preset: same seed, same weights."""
    first = tiny if name == "tiny" else tiny_refiner
    again = load_model(name)
    _assert_weights_equal(again, _state_dicts(first.modules()))
    assert again.identity_hash == first.identity_hash
    assert again.config_dir == first.config_dir == PRESETS[name].config_dir()  # written once per process
    for m in again.modules().values():
        assert not m.training and not any(p.requires_grad for p in m.parameters())


_SCRATCH_SCRIPT = """
import os, sys
from sdxl_trt.presets import PRESETS
tiny = PRESETS["tiny"].config_dir()
assert PRESETS["tiny"].config_dir() == tiny and (tiny / "tokenizer" / "vocab.json").is_file()
assert PRESETS["tiny-refiner"].config_dir().parent == tiny.parent
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a forked child runs the exit hooks it inherited
os.waitpid(pid, 0)
assert tiny.is_dir(), "a forked child removed its parent's scratch folder"
print(tiny.parent)
"""


def test_preset_configs_are_written_once_per_process_and_removed_at_exit(tmp_path: Path) -> None:
    """Every load of a preset reads its weightless configs from a folder the process wrote: one per process, not one
    per load, gone when the process exits (a service or script that loads presets again and again once left a
    3 MB folder in /tmp per load)."""
    run = subprocess.run([sys.executable, "-c", _SCRATCH_SCRIPT], env={**os.environ, "TMPDIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    root = Path(run.stdout.strip())
    assert root.parent == tmp_path and root.name.startswith("sdxl-trt-")
    assert list(tmp_path.iterdir()) == [], "the scratch root outlived its process"


def test_refiner_shares_the_base_text_encoder_2(tiny: LoadedModel, tiny_refiner: LoadedModel) -> None:
    """As in SDXL 1.0, the refiner's OpenCLIP encoder is the base's; the ensemble mode relies on it."""
    base, ref = tiny.text_encoder_2.state_dict(), tiny_refiner.text_encoder_2.state_dict()
    assert all(torch.equal(base[k], ref[k]) for k in base)


def test_preset_in_half_precision_is_the_fp32_preset_rounded(tiny: LoadedModel) -> None:
    """Half-precision engines are checked against the fp32 model: a bf16 load must be the same model."""
    half = load_model("tiny", dtype=torch.bfloat16)
    for name, m in half.modules().items():
        ref = tiny.modules()[name].state_dict()
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].bfloat16()), f"{name}.{k}"


# --- 2. diffusers-format directories ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_diffusers_dir_loads_saved_weights(which: str, other_base: SavedModel, other_refiner: SavedModel) -> None:
    saved = other_base if which == "base" else other_refiner
    assert check_diffusers_dir(saved.path)[0] == which
    model = load_model(saved.path)
    assert model.kind == which and model.source["type"] == "diffusers"
    assert (model.text_encoder is None) == (which == "refiner")
    _assert_weights_equal(model, saved.weights)
    assert model.vae_scaling_factor == pytest.approx(0.2)
    assert model.options["requires_aesthetics_score"] is (which == "refiner")
    assert model.identity_hash == hash_model_files(saved.path)


def test_diffusers_dir_widths_follow_its_configs(other_base: SavedModel, other_refiner: SavedModel) -> None:
    """Nothing about the tiny or full-size widths is assumed: model_dims reads them from the directory."""
    dims = model_dims(load_model(other_base.path), load_model(other_refiner.path))
    assert dims == ModelDims(
        text_hidden_1=16, text_hidden_2=40, pooled_dim=16, unet_context=56, unet_time_ids=6, latent_channels=4,
        refiner_context=40, refiner_time_ids=5, refiner_pooled_dim=16, unet_downsamples=2, refiner_downsamples=3,
    )


def test_diffusers_dir_fp16_variant_only(other_refiner: SavedModel, tmp_path: Path) -> None:
    """Hub downloads often hold only ``*.fp16.safetensors``; they load without naming the variant."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(other_refiner.path, local_files_only=True)
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert list((tmp_path / "fp16" / "unet").glob("*.fp16.safetensors"))
    model = load_model(tmp_path / "fp16")
    want = {name: {k: v.half().float() for k, v in sd.items()} for name, sd in other_refiner.weights.items()}
    _assert_weights_equal(model, want)


# --- 3. single-file checkpoints -----------------------------------------------------------------------


def _example_inputs(model: LoadedModel) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    unet = model.unet.config
    te2 = model.text_encoder_2.config
    time_ids = (unet.projection_class_embeddings_input_dim - te2.projection_dim) // unet.addition_time_embed_dim
    return dict(
        ids=torch.randint(0, 49408, (2, 77), generator=g),
        latents=torch.randn(2, 4, 16, 16, generator=g),
        context=torch.randn(2, 77, unet.cross_attention_dim, generator=g),
        pooled=torch.randn(2, te2.projection_dim, generator=g),
        time_ids=torch.randn(2, time_ids, generator=g),
        image=torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
    )


def _outputs(model: LoadedModel, x: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {
        "unet": model.unet(x["latents"], torch.tensor([500, 20]), encoder_hidden_states=x["context"],
                           added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}).sample,
        "vae_decode": model.vae.decode(x["latents"][:1]).sample,
        "vae_encode": model.vae.encode(x["image"]).latent_dist.mean,
        "text_encoder_2": model.text_encoder_2(x["ids"]).text_embeds,
    }
    if model.text_encoder is not None:
        out["text_encoder"] = model.text_encoder(x["ids"], output_hidden_states=True).hidden_states[-2]
    return out


@torch.no_grad()
@pytest.mark.parametrize("source", ["tiny", "tiny-refiner", "other-base", "other-refiner"])
def test_single_file_round_trip(
    source: str, tiny: LoadedModel, tiny_refiner: LoadedModel, other_base: SavedModel, other_refiner: SavedModel,
    tmp_path: Path,
) -> None:
    """A model written in the original Stability layout loads back to identical weights and outputs.

    tiny's two text encoders have the same width, the case where diffusers' own pipeline loader hands
    text_encoder_2 the first encoder's weights; the "other" configs have unequal widths and a
    projection narrower than the hidden size."""
    if source.startswith("tiny"):
        original = tiny if source == "tiny" else tiny_refiner
        config = PRESETS[source].write_config_dir(tmp_path / "config")
    else:
        saved = other_base if source == "other-base" else other_refiner
        original, config = load_model(saved.path), saved.path  # a full diffusers dir serves as config too
    path = _write_single_file(original, tmp_path / "model.safetensors")

    loaded = load_model(path, config=config)

    assert loaded.kind == original.kind and loaded.source["type"] == "single_file"
    _assert_weights_equal(loaded, _state_dicts(original.modules()))
    x = _example_inputs(original)
    want, got = _outputs(original, x), _outputs(loaded, x)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert loaded.identity_hash == hash_model_files(path)
    assert loaded.config_dir == Path(config)


def test_single_file_ckpt(tiny_file: SavedModel, tmp_path: Path) -> None:
    """Older ``.ckpt`` files (tensors under ``state_dict``) load like safetensors ones."""
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file.path)), "global_step": 1}, path)
    _assert_weights_equal(load_model(path, config=tiny_file.config_dir), tiny_file.weights)


def test_single_file_loads_in_bf16(tiny_file: SavedModel) -> None:
    model = load_model(tiny_file.path, config=tiny_file.config_dir, dtype=torch.bfloat16)
    for name, m in model.modules().items():
        ref = tiny_file.weights[name]
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].bfloat16()), f"{name}.{k}"


@pytest.mark.parametrize("name", ["sdxl-base-1.0", "sdxl-refiner-1.0", "tiny", "tiny-refiner"])
def test_original_layout_inverts_diffusers_converters(name: str) -> None:
    """The test converter is exact at full SDXL size too: diffusers' converters map its output back to
    every key at every shape (checked on meta tensors, so the 2.6 B-parameter UNet costs nothing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = PRESETS[name]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(p.unet), AutoencoderKL.from_config(p.vae)
        te1 = CLIPTextModel(CLIPTextConfig(**p.text_encoder)) if p.text_encoder else None
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**p.text_encoder_2))

    def same(back: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == want

    same(convert_ldm_unet_checkpoint(unet_to_original(unet.state_dict(), unet.config), dict(unet.config)), unet)
    same(convert_ldm_vae_checkpoint(vae_to_original(vae.state_dict(), vae.config), dict(vae.config)), vae)
    prefix = OPEN_CLIP_BASE_PREFIX if te1 is not None else OPEN_CLIP_REFINER_PREFIX
    same(convert_open_clip_checkpoint(te2, open_clip_to_original(te2.state_dict(), prefix), prefix=prefix), te2)
    if te1 is not None:
        back = convert_ldm_clip_checkpoint(clip_to_original(te1.state_dict()))
        same({k.removeprefix("text_model."): v for k, v in back.items()}, te1)
    if name == "sdxl-base-1.0":  # names and shapes known from sd_xl_base_1.0.safetensors
        keys = unet_to_original(unet.state_dict(), unet.config) | vae_to_original(vae.state_dict(), vae.config)
        assert tuple(keys["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
        for k in ("model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.2.conv.weight",
                  "model.diffusion_model.output_blocks.8.0.skip_connection.weight", "model.diffusion_model.label_emb.0.0.weight",
                  "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight",
                  "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"):
            assert k in keys, k


# --- 4. bad input -------------------------------------------------------------------------------------


def test_nonexistent_path_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "nope")
    for name in PRESETS:
        assert name in str(e.value)
    assert "nope" in str(e.value)


def test_directory_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path)


def test_directory_holding_one_single_file_suggests_it(tiny_file: SavedModel, tmp_path: Path) -> None:
    shutil.copy(tiny_file.path, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"pass .*model\.safetensors"):
        load_model(tmp_path)


def test_directory_missing_unet(diffusers_dir_copy: Callable[[str], Path]) -> None:
    d = diffusers_dir_copy("no-unet")
    shutil.rmtree(d / "unet")
    with pytest.raises(ModelLoadError, match=r"missing unet/"):
        load_model(d)


def test_malformed_component_config_names_the_file(diffusers_dir_copy: Callable[[str], Path]) -> None:
    d = diffusers_dir_copy("bad-json")
    (d / "vae" / "config.json").write_text('{"block_out_channels": [8, 16,')
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert str(d / "vae" / "config.json") in str(e.value) and "not valid JSON" in str(e.value)


def test_component_config_without_weights(diffusers_dir_copy: Callable[[str], Path]) -> None:
    d = diffusers_dir_copy("no-weights")
    for f in (d / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"text_encoder_2 has a config but no weights"):
        load_model(d)


def test_component_weights_missing_a_tensor(diffusers_dir_copy: Callable[[str], Path]) -> None:
    """The libraries would leave the tensor random and only warn; we refuse and name it."""
    d = diffusers_dir_copy("missing-tensor")
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    del sd["conv_in.weight"]
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match=r"unet.*1 weights missing \(conv_in.weight\)"):
        load_model(d)


def test_component_config_disagreeing_with_weights(diffusers_dir_copy: Callable[[str], Path]) -> None:
    d = diffusers_dir_copy("wrong-config")
    cfg = json.loads((d / "text_encoder" / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the weights have 2 layers
    (d / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"text_encoder.*config has no place for.*layers\.1\."):
        load_model(d)


def test_components_that_do_not_fit_together(diffusers_dir_copy: Callable[[str], Path]) -> None:
    """Each folder loads, but a text encoder of another width makes the UNet's context wrong: refused
    at load, naming the widths, not as a shape error deep inside export."""
    from transformers import CLIPTextConfig, CLIPTextModel

    d = diffusers_dir_copy("context")
    shutil.rmtree(d / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**{**OTHER_TE1, "hidden_size": 24})).save_pretrained(d / "text_encoder")
    with pytest.raises(ModelLoadError, match=r"cross_attention_dim 56 is not the text encoders' hidden sizes 24 \+ 40"):
        load_model(d)


def test_not_sdxl_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match=r"not an SDXL checkpoint.*model\.diffusion_model.*lora_unet_down"):
        load_model(path)


def test_diffusers_component_file_is_not_a_single_file(other_base: SavedModel) -> None:
    with pytest.raises(ModelLoadError, match="diffusers layout"):
        load_model(other_base.path / "unet" / "diffusion_pytorch_model.safetensors")


def test_sd15_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match=r"Stable Diffusion 1\.x/2\.x"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(damage: str, tiny_file: SavedModel, tmp_path: Path) -> None:
    data = tiny_file.path.read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 4096)
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors is not a readable \.safetensors file"):
        load_model(path, config=tiny_file.config_dir)


def test_corrupt_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match=r"broken\.ckpt is not a readable PyTorch checkpoint"):
        load_model(path)


def test_single_file_missing_a_tensor(tiny_file: SavedModel, tmp_path: Path) -> None:
    sd = load_file(str(tiny_file.path))
    del sd["model.diffusion_model.out.2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError, match=r"unet weights do not match .*1 weights missing \(conv_out.weight\)"):
        load_model(path, config=tiny_file.config_dir)


def test_single_file_without_config_of_another_shape(tiny_file: SavedModel) -> None:
    """The default configs are SDXL 1.0's; a smaller file is refused with a pointer to config=."""
    with pytest.raises(ModelLoadError, match=r"unet weights do not match the shipped sdxl-base-1\.0 unet config: .*"
                       r"conv_in\.weight: 32x4x3x3 in the file, 320x4x3x3 in the config.*--model-config"):
        load_model(tiny_file.path)


def test_single_file_config_of_the_other_kind(tiny_file: SavedModel, tmp_path: Path) -> None:
    config = PRESETS["tiny-refiner"].write_config_dir(tmp_path / "refiner-config")
    with pytest.raises(ModelLoadError, match=r"SDXL base checkpoint but the configs .* describe an SDXL refiner"):
        load_model(tiny_file.path, config=config)


def test_single_file_config_that_is_not_a_directory(tiny_file: SavedModel, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config .*missing-config is not a directory"):
        load_model(tiny_file.path, config=tmp_path / "missing-config")


def test_config_for_a_preset_is_refused(tiny_file: SavedModel) -> None:
    with pytest.raises(ModelLoadError, match="only applies to single-file checkpoints"):
        load_model("tiny", config=tiny_file.config_dir)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"unknown suffix '\.onnx'.*\.safetensors"):
        load_model(path)


def test_model_dims_needs_a_base_first(tiny: LoadedModel, tiny_refiner: LoadedModel) -> None:
    with pytest.raises(ModelLoadError, match=r"'tiny-refiner' is an SDXL refiner.*--model needs an SDXL base"):
        model_dims(tiny_refiner)
    with pytest.raises(ModelLoadError, match=r"'tiny' is an SDXL base model .* not a refiner"):
        model_dims(tiny, tiny)


# --- hash_model_files ---------------------------------------------------------------------------------


def test_hash_changes_with_one_weight_byte(other_base: SavedModel, tmp_path: Path) -> None:
    """Engines are rebuilt when the weights change: one flipped weight byte must change the identity,
    of the file and of the directory holding it; an unchanged copy elsewhere keeps it."""
    copy = tmp_path / "model"
    shutil.copytree(other_base.path, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    before_file, before_dir = hash_model_files(weights), hash_model_files(copy)
    assert (hash_model_files(weights), hash_model_files(copy)) == (before_file, before_dir)
    assert before_file == hash_model_files(other_base.path / "unet" / "diffusion_pytorch_model.safetensors")
    assert before_dir == hash_model_files(other_base.path)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data, well past the header
    weights.write_bytes(bytes(data))
    assert hash_model_files(weights) != before_file
    assert hash_model_files(copy) != before_dir


def test_hash_sees_a_change_anywhere_in_a_large_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte counts (a merged LoRA edits the middle of a checkpoint), also for files over 8 MiB."""
    monkeypatch.setenv("SDXL_TRT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "big.bin"
    data = bytearray(9 << 20)
    path.write_bytes(bytes(data))
    before = hash_model_files(path)
    for where in (0, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[where] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert hash_model_files(path) != before, where


def test_full_hashes_are_cached_by_size_mtime_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A settled file is read once; an edited one (new mtime) is read again; a just-written one is never cached."""
    import os

    from sdxl_trt import identity

    monkeypatch.setenv("SDXL_TRT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    identity.file_sha256(path)
    assert not (tmp_path / "cache" / "file-hashes.json").exists()  # too fresh to trust
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    first = identity.file_sha256(path)
    reads = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    weight_reads = lambda: [r for r in reads if r.name == path.name]  # noqa: E731 - the cache file is read too
    assert identity.file_sha256(path) == first and not weight_reads()  # from the cache
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert identity.file_sha256(path) != first and weight_reads()


def test_hash_of_a_directory(other_base: SavedModel, tmp_path: Path) -> None:
    """A copied model directory keeps its identity; editing one config changes it."""
    copy = tmp_path / "copy"
    shutil.copytree(other_base.path, copy)
    assert hash_model_files(copy) == hash_model_files(other_base.path)
    cfg = json.loads((copy / "vae" / "config.json").read_text())
    cfg["scaling_factor"] = 0.3
    (copy / "vae" / "config.json").write_text(json.dumps(cfg))
    assert hash_model_files(copy) != hash_model_files(other_base.path)
