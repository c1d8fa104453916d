"""Reading LoRA files into the canonical form and fusing them, on the tiny model.

Ground truth: each test file is written by tests/support/lora_files.py, which also returns the delta every
weight must get (float64, from the factors it wrote and its own key layout). Fused weights are checked
against that truth, and against diffusers' own ``load_lora_into_unet`` + ``fuse_lora`` on the same weights
(peft, which diffusers loads LoRAs with, is a test dependency; tests/test_lora_kinds.py compares every kind
with its reference library through images too).

kohya semantics: each layer scales by its own ``alpha / rank`` (what kohya's sd-scripts, A1111 and ComfyUI
do); LyCORIS kinds (LoHa, LoKr, DoRA) merge as A1111 and ComfyUI merge them, checked here against deltas
written out from their definitions and, in tests/test_lora_kinds.py, against peft's and LyCORIS' own layers. diffusers agrees when a file has one alpha for all layers; with per-layer alphas it falls back to the
most common alpha for attention layers, so that comparison uses one alpha.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from support import lora_files as lf

from sdxl_trt.lora import LoraError, LoraSpec, fuse_into_modules, identity_with_loras, lora_weight_shapes
from sdxl_trt.lora.reading import read_lora


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models[0]


@pytest.fixture(scope="module")
def shapes(base):
    return lora_weight_shapes({"unet": base.unet, "text_encoder": base.text_encoder,
                               "text_encoder_2": base.text_encoder_2})


def _read(path: Path, base, shapes):
    return read_lora(path, targets=shapes, unet_config=base.unet.config)


def _assert_matches_truth(lora, truth, scale: float = 1.0) -> None:
    for comp, layers in truth.items():
        assert set(lora.layers.get(comp, {})) == set(layers), comp
        for name, want in layers.items():
            got = lora.layers[comp][name].delta(scale, dtype=torch.float64)
            torch.testing.assert_close(got, want * scale, rtol=0, atol=1e-12, msg=f"{comp}.{name}")


def test_diffusers_format_on_unet_and_both_text_encoders(tmp_path, base, shapes):
    truth = lf.write_diffusers_lora(tmp_path / "d.safetensors", shapes)
    lora = _read(tmp_path / "d.safetensors", base, shapes)
    assert lora.format == "diffusers"
    # Every Linear and Conv2d weight (attention, feed-forward, proj_in/out, resnet and sampler convs,
    # conv_in/out, time and add embeddings, text projection) is reached.
    assert {c: len(v) for c, v in lora.layers.items()} == {c: len(v) for c, v in shapes.items()}
    _assert_matches_truth(lora, truth)


def test_diffusers_format_alpha_from_metadata(tmp_path, base, shapes):
    truth = lf.write_diffusers_lora(tmp_path / "a.safetensors", shapes, rank=4, alpha=8.0, only="attn")
    lora = _read(tmp_path / "a.safetensors", base, shapes)
    assert {f.alpha_scale for v in lora.layers.values() for f in v.values()} == {2.0}
    _assert_matches_truth(lora, truth)


def test_diffusers_format_with_an_alpha_per_layer(tmp_path, base, shapes):
    """Some trainers save peft keys with a ``<layer>.alpha`` tensor each: it scales that layer."""
    from safetensors.torch import load_file, save_file

    truth = lf.write_diffusers_lora(tmp_path / "d.safetensors", shapes, rank=4, only="attn2")
    t = load_file(str(tmp_path / "d.safetensors"))
    for i, key in enumerate(sorted(k for k in t if k.endswith(".lora_A.weight"))):
        alpha = 1.0 + i % 3
        t[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(alpha)
        comp, _, module = key.removesuffix(".lora_A.weight").partition(".")
        name = (module if comp == "unet" else module.removeprefix("text_model.")) + ".weight"
        name = name if name in truth[comp] else f"text_model.{name}"
        truth[comp][name] = truth[comp][name] * alpha / 4
    save_file(t, str(tmp_path / "alphas.safetensors"))
    _assert_matches_truth(_read(tmp_path / "alphas.safetensors", base, shapes), truth)


def test_kohya_format_with_alpha_not_rank(tmp_path, base, shapes):
    truth = lf.write_kohya_lora(tmp_path / "k.safetensors", shapes, rank=4, alpha=2.0)
    lora = _read(tmp_path / "k.safetensors", base, shapes)
    assert lora.format == "kohya"
    assert all(len(truth[c]) > 0 for c in ("unet", "text_encoder", "text_encoder_2"))
    _assert_matches_truth(lora, truth, scale=0.6)


def test_kohya_sgm_block_names_and_per_layer_alphas(tmp_path, base, shapes):
    truth = lf.write_kohya_sgm_lora(tmp_path / "s.safetensors", shapes)
    lora = _read(tmp_path / "s.safetensors", base, shapes)
    _assert_matches_truth(lora, truth)


def test_fusing_changes_exactly_the_lora_weights(tmp_path, base, shapes):
    """Two LoRAs stacked, at their scales: each touched weight is base + sum(scale * delta); nothing else moves."""
    t1 = lf.write_diffusers_lora(tmp_path / "d.safetensors", shapes, only="attn1")
    t2 = lf.write_kohya_lora(tmp_path / "k.safetensors", shapes, alpha=3.0)
    l1, l2 = _read(tmp_path / "d.safetensors", base, shapes), _read(tmp_path / "k.safetensors", base, shapes)
    modules = {"unet": copy.deepcopy(base.unet), "text_encoder": copy.deepcopy(base.text_encoder),
               "text_encoder_2": copy.deepcopy(base.text_encoder_2)}
    fuse_into_modules(modules, [(l1, 0.5), (l2, -1.25)])
    originals = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    for comp, module in modules.items():
        before = dict(originals[comp].named_parameters())
        for name, p in module.named_parameters():
            want = before[name].double()
            for truth, s in ((t1, 0.5), (t2, -1.25)):
                if name in truth.get(comp, {}):
                    want = want + s * truth[comp][name]
            torch.testing.assert_close(p.double(), want, rtol=0, atol=2e-6, msg=f"{comp}.{name}")


def test_fused_unet_equals_diffusers_fuse_lora(tmp_path, base, shapes):
    """diffusers' own path (peft layers, fuse_lora at a scale, unload) on the same weights."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline

    for name, write in (("d", lambda p: lf.write_diffusers_lora(p, shapes)),
                        ("k", lambda p: lf.write_kohya_lora(p, shapes, alpha=2.0))):
        path = tmp_path / f"{name}.safetensors"
        write(path)
        theirs = copy.deepcopy(base.unet)
        sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=theirs.config)
        StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=theirs, adapter_name="a")
        theirs.fuse_lora(lora_scale=0.7)
        theirs.unload_lora()
        ours = copy.deepcopy(base.unet)
        lora = _read(path, base, shapes)
        fuse_into_modules({"unet": ours}, [(lora, 0.7)])
        t, o = dict(theirs.named_parameters()), dict(ours.named_parameters())
        assert set(t) == set(o)
        for k in o:
            torch.testing.assert_close(o[k], t[k], rtol=0, atol=1e-6, msg=k)


def test_training_script_and_attention_processor_layouts(tmp_path, base, shapes):
    """diffusers' SDXL training scripts save peft's factors through diffusers' renames (``to_k.lora.down``
    beside ``conv1.lora_A``, text encoders' ``lora_linear_layer``); older ones saved attention processors
    (``processor.to_k_lora``). Both read as the layers they name, whatever the order of their keys (diffusers'
    own loader renames by the first key only, so it misreads such a file when a resnet's key sorts first)."""
    truth = lf.write_training_script_lora(tmp_path / "pytorch_lora_weights.safetensors", shapes, targets=None)
    lora = _read(tmp_path / "pytorch_lora_weights.safetensors", base, shapes)
    assert (lora.format, lora.kind) == ("diffusers", "LoCon")  # it reaches the 3x3 convolutions too
    assert {c: len(v) for c, v in lora.layers.items()} == {c: len(v) for c, v in shapes.items()}
    _assert_matches_truth(lora, truth)
    truth = lf.write_attn_procs_lora(tmp_path / "procs.safetensors", shapes)
    lora = _read(tmp_path / "procs.safetensors", base, shapes)
    assert lora.kind == "LoRA" and len(lora.layers["unet"]) == len(truth["unet"]) > 0
    _assert_matches_truth(lora, truth, scale=0.5)


@pytest.mark.parametrize("cp", [True, False], ids=["cp-cores", "plain"])
def test_loha(tmp_path, base, shapes, cp):
    truth = lf.write_loha_lora(tmp_path / "h.safetensors", shapes, cp=cp)
    lora = _read(tmp_path / "h.safetensors", base, shapes)
    assert (lora.format, lora.kind) == ("kohya", "LoHa")
    assert all(len(truth[c]) > 0 for c in truth)
    _assert_matches_truth(lora, truth, scale=0.7)


def test_lokr_in_every_form_lycoris_writes(tmp_path, base, shapes):
    from safetensors import safe_open

    truth = lf.write_lokr_lora(tmp_path / "k.safetensors", shapes)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        factors = {k.partition(".")[2] for k in f.keys()}  # noqa: SIM118
    assert {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lokr_t2", "alpha"} <= factors
    lora = _read(tmp_path / "k.safetensors", base, shapes)
    assert lora.kind == "LoKr"
    _assert_matches_truth(lora, truth, scale=-0.4)


def _dora_weight(w, delta, magnitude, on_output, scale):
    """A1111 / ComfyUI: W + s * (m * (W + dW) / ||W + dW|| - W), the norm per output row or input column."""
    merged = w + delta
    dims = tuple(d for d in range(merged.dim()) if d != (0 if on_output else 1))
    return w + scale * (merged * magnitude / torch.linalg.vector_norm(merged, dim=dims, keepdim=True) - w)


@pytest.mark.parametrize("on_output", [True, False], ids=["per-output", "per-input"])
def test_dora_renormalises_as_a1111_and_comfyui(tmp_path, base, shapes, on_output):
    """At weight 0 the base bit for bit; at 1 the renormalised weight; between, A1111's blend; stacked after a
    LoRA, DoRA renormalises the weight that LoRA left (one network after another, in order)."""
    originals = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    params = {c: {n: p.detach() for n, p in m.named_parameters()} for c, m in originals.items()}
    truth = lf.write_kohya_dora(tmp_path / "d.safetensors", shapes, params, on_output=on_output)
    lora = _read(tmp_path / "d.safetensors", base, shapes)
    assert lora.kind == "DoRA"
    plain_truth = lf.write_kohya_lora(tmp_path / "k.safetensors", shapes, seed=9, std=0.1)
    plain = _read(tmp_path / "k.safetensors", base, shapes)
    stacks = [[(lora, 0.0)], [(lora, 1.0)], [(lora, 0.6)], [(plain, 0.5), (lora, 0.8)]]
    for stack in stacks if on_output else stacks[1:3]:
        modules = {c: copy.deepcopy(m) for c, m in originals.items()}
        fuse_into_modules(modules, stack)
        for comp, layers in truth.items():
            got = dict(modules[comp].named_parameters())
            for name, (delta, magnitude, axis) in layers.items():
                w = params[comp][name].double()
                for what, s in stack:
                    w = w + s * plain_truth[comp][name] if what is plain else _dora_weight(w, delta, magnitude, axis, s)
                what = [(x.kind, s) for x, s in stack]
                if stack == [(lora, 0.0)]:
                    assert torch.equal(got[name], params[comp][name]), name  # a DoRA at weight 0 is the base
                torch.testing.assert_close(got[name].double(), w, rtol=0, atol=2e-6, msg=f"{comp}.{name} {what}")


REFUSED = [
    (lf.write_sd15_kohya_lora, "LoRA", "Stable Diffusion 1.x/2.x"),
    (lf.write_sd15_unet_only_lora, "LoRA", "none of its layers is in this model"),
    (lf.write_sd15_loha, "LoHa", "Stable Diffusion 1.x/2.x"),
    (lambda p: lf.write_refused_kind(p, "OFT"), "OFT", "rotation"),
    (lambda p: lf.write_refused_kind(p, "BOFT"), "BOFT", "rotations"),
    (lambda p: lf.write_refused_kind(p, "(IA)^3"), "(IA)^3", "scales activations"),
    (lambda p: lf.write_refused_kind(p, "GLoRA"), "GLoRA", "its update mixes"),
    (lambda p: lf.write_refused_kind(p, "full"), "full-weight difference", "not low-rank factors"),
    (lf.write_mixed_rank_loha, "LoHa", r"\(64, 4\) and \(3, 64\) do not fit together \(mixed ranks"),
    (lf.write_unmatched_lokr, "LoKr", "none of its layers.*down_blocks.3.*matches no layer"),
    (lf.write_diffusers_layout_loha, "LoHa", "read in the kohya/LyCORIS layout"),
]


@pytest.mark.parametrize("writer, kind, expected", REFUSED, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(REFUSED)])
def test_refusals_name_the_file_the_kind_and_the_keys(tmp_path, base, shapes, writer, kind, expected):
    """Kinds that are no added update, networks for SD 1.x/2.x, layers that match nothing and factors that do
    not multiply: refused before anything changes, naming the file, the kind and the keys; the header-only
    listing (GET /sdapi/v1/loras) names the same kind."""
    from safetensors import safe_open

    from sdxl_trt.lora.layouts import inspect_file

    path = tmp_path / "bad.safetensors"
    writer(path)
    with pytest.raises(LoraError, match=expected) as e:
        _read(path, base, shapes)
    message = str(e.value)
    with safe_open(str(path), "pt") as f:
        layers = {k.partition(".")[0] if k.startswith("lora_") else k.rpartition(".")[0] for k in f.keys()}  # noqa: SIM118
    assert str(path) in message and kind in message and any(layer in message for layer in layers), message
    listed = inspect_file(path)
    assert kind in listed.kind or listed.kind in message


def test_partly_matching_file_is_refused_whole(tmp_path, base, shapes):
    """One layer of another width among good ones: refused, naming the layer, nothing applied."""
    from safetensors.torch import load_file, save_file

    lf.write_kohya_lora(tmp_path / "k.safetensors", shapes)
    t = load_file(str(tmp_path / "k.safetensors"))
    key = next(k for k in t if k.endswith("attn2_to_k.lora_down.weight"))
    t[key] = torch.randn(4, 768)
    save_file(t, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraError, match=r"of its layers match.*attn2.to_k.weight: the file's update is \(64, 768\)"):
        _read(tmp_path / "mixed.safetensors", base, shapes)


def test_corrupt_files_are_refused(tmp_path, base, shapes):
    lf.write_kohya_lora(tmp_path / "k.safetensors", shapes)
    lf.truncate(tmp_path / "k.safetensors", tmp_path / "cut.safetensors")
    with pytest.raises(LoraError, match=r"cut.safetensors is not a readable .safetensors file \(truncated"):
        _read(tmp_path / "cut.safetensors", base, shapes)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(LoraError, match="junk.safetensors is not a readable"):
        _read(tmp_path / "junk.safetensors", base, shapes)
    (tmp_path / "x.bin").write_bytes(b"pickle")
    with pytest.raises(LoraError, match="only .safetensors files are read"):
        _read(tmp_path / "x.bin", base, shapes)


def test_lora_spec_parsing(tmp_path):
    f = tmp_path / "style.safetensors"
    f.write_bytes(b"")
    assert LoraSpec.parse(str(f)) == LoraSpec(f, 1.0)
    assert LoraSpec.parse(f"{f}:0.8") == LoraSpec(f, 0.8)
    assert LoraSpec.parse(f"{f}:-2") == LoraSpec(f, -2.0)
    for bad, why in ((f"{f}:nan", "not a number in"), (f"{f}:11", "not a number in"),
                     (str(tmp_path / "missing.safetensors"), "does not exist")):
        with pytest.raises(LoraError, match=why):
            LoraSpec.parse(bad)


def test_identity_changes_with_loras_and_not_without():
    assert identity_with_loras("abc", []) == "abc"
    a = identity_with_loras("abc", [("f1", 1.0)])
    assert a != "abc"
    assert a != identity_with_loras("abc", [("f1", 0.5)])
    assert a != identity_with_loras("abc", [("f2", 1.0)])
    assert identity_with_loras("abc", [("f1", 1.0), ("f2", 1.0)]) != identity_with_loras("abc", [("f2", 1.0),
                                                                                                 ("f1", 1.0)])
