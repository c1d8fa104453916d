"""LoRA files as users bring them, each against the library that defines its kind, through run, build and serve.

Every file is written the way its trainer writes it and merged into copies of the tiny modules by the
reference (tests/support/lora_references.py): diffusers' own ``load_lora_weights`` + ``fuse_lora`` for what
diffusers loads (peft keys, its SDXL training scripts' layout, attention-processor names, kohya LoCon, peft
DoRA), peft's own LoHa and LoKr layers (``merge_and_unload``) for the LyCORIS kinds diffusers cannot load,
and LyCORIS' own network for a LoCon with Tucker cores and DoRA scales. Then:

* the merged weights equal the reference's (fp32 rounding: 1e-5 of the update's size), layer for layer;
* images through ``Pipeline.generate`` / ``sdxl-trt run`` on engines built without LoRAs, through
  ``sdxl-trt build --lora`` (the kinds stacked in order, as A1111 and ComfyUI apply them) and through a real
  ``sdxl-trt serve --lora-dir`` equal the reference pipeline's within 1.5 levels mean (the issue's bound;
  the runtime's own agreement with diffusers is 0.05 mean, tests/test_pipeline.py);
* each file changes the image visibly (at least 3 levels mean, far above the tolerance), so no path passes
  by ignoring a file; ``GET /sdapi/v1/loras`` names each file's kind.

DoRA is compared at weight 1, where diffusers/peft and A1111/ComfyUI agree (elsewhere this project follows
A1111 and ComfyUI: tests/test_lora.py checks those semantics).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from support import lora_files as lf
from support import lora_references as lr
from support.serve_server import auth, decode_png, served
from test_pipeline import run_diffusers_txt2img, to_uint8

from sdxl_trt.lora import fuse_into_modules
from sdxl_trt.lora.reading import read_lora
from sdxl_trt.request import GenerationRequest

log = logging.getLogger(__name__)
pytest.importorskip("peft")
pytest.importorskip("lycoris")

PROMPT = dict(prompt="a lighthouse on a cliff at dusk, oil painting", width=256, height=256, steps=3,
              guidance_scale=5.0, seed=7)
MEAN_LEVELS = 1.5
VISIBLE_LEVELS = 3.0
STACK = (("training", 0.8), ("loha", 1.0), ("dora", 1.0), ("lokr", 1.0), ("lycoris-dora", 1.0))
"""The build's LoRAs, in order (DoRA twice, after other kinds: each renormalises what came before it)."""
PEFT_KINDS = {
    # LoHa with CP cores (hada_t1/t2) on the 3x3 convolutions
    "loha": dict(kind="loha", rank=4, alpha=2.0, std=0.3, seed=16, use_effective_conv2d=True),
    # LoKr in every form peft makes: w1 whole or a product, w2 a product or through a CP core (lokr_t2), both
    # whole where the rank is high (the UNet's to_q at rank 8)
    "lokr": dict(kind="lokr", rank=2, alpha=3.0, std=0.25, seed=16, use_effective_conv2d=True, decompose_both=True,
                 rank_pattern={"to_q": 8}),
}


@dataclass
class KindFile:
    name: str  # the file's stem: its LoRA name for the runtime and the server
    kind: str  # what the reader and GET /sdapi/v1/loras must call it
    path: Path
    reference: dict[str, torch.nn.Module]  # copies of the tiny modules, merged by the reference library


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models[0]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, base) -> dict[str, KindFile]:
    shapes = lr.shapes_of(base)
    weights = {c: {n: p.detach() for n, p in getattr(base, c).named_parameters()} for c in lr.COMPONENTS}
    d = tmp_path_factory.mktemp("kinds")
    out: dict[str, KindFile] = {}

    def through_diffusers(name, kind, write):
        path = d / f"{name}.safetensors"
        write(path)
        modules = lr.copies(base)
        lr.merge_with_diffusers(base, modules, path)
        out[name] = KindFile(name, kind, path, modules)

    through_diffusers("peft", "LoCon", lambda p: lf.write_diffusers_lora(p, shapes, alpha=8.0, std=0.06, seed=11,
                                                                                module_names=True))
    through_diffusers("training", "LoRA", lambda p: lf.write_training_script_lora(p, shapes, std=0.14, seed=12))
    through_diffusers("attn-procs", "LoRA", lambda p: lf.write_attn_procs_lora(p, shapes, std=0.3, seed=13))
    through_diffusers("locon", "LoCon", lambda p: lf.write_kohya_lora(p, shapes, alpha=2.0, std=0.1, seed=14))
    # UNet only: diffusers 0.42 under transformers 5 drops a text encoder's peft DoRA magnitudes (its load
    # report lists them UNEXPECTED/MISSING); text-encoder DoRA is checked against LyCORIS ("lycoris-dora").
    through_diffusers("dora", "DoRA", lambda p: lf.write_peft_dora(p, shapes, weights, std=0.06, seed=15,
                                                                   components=("unet",)))
    for name, kw in PEFT_KINDS.items():
        modules = lr.copies(base)
        lr.peft_lycoris(modules, shapes, path=d / f"{name}.safetensors", **kw)
        out[name] = KindFile(name, "LoHa" if name == "loha" else "LoKr", d / f"{name}.safetensors", modules)
    lr.write_lycoris_locon_dora(lr.copies(base), d / "lycoris-dora.safetensors", seed=17, std=0.1)
    modules = lr.copies(base)
    lr.merge_with_lycoris(modules, d / "lycoris-dora.safetensors")
    out["lycoris-dora"] = KindFile("lycoris-dora", "DoRA", d / "lycoris-dora.safetensors", modules)
    return out


@pytest.fixture(scope="module")
def lora_dir(kinds) -> Path:
    return next(iter(kinds.values())).path.parent


def _image(base, modules) -> np.ndarray:
    kw = dict(prompt=PROMPT["prompt"], negative="", width=256, height=256, steps=PROMPT["steps"],
              guidance=PROMPT["guidance_scale"], seed=PROMPT["seed"], n=1)
    return to_uint8(run_diffusers_txt2img(lr.diffusers_pipe(base, modules), "euler", **kw))[0]


@pytest.fixture(scope="module")
def images(base, kinds) -> dict[str, np.ndarray]:
    """The reference pipeline's image for each file alone, and for no file ("base")."""
    return {"base": _image(base, lr.copies(base)), **{k: _image(base, f.reference) for k, f in kinds.items()}}


def _check(ours: np.ndarray, name: str, images: dict[str, np.ndarray]) -> None:
    ours = ours.astype(np.int16)
    off = np.abs(ours - images[name]).mean()
    changed = np.abs(ours - images["base"]).mean()
    log.info("%s: %.3f levels mean (max %d) from its reference, %.2f from the base image", name, off,
             np.abs(ours - images[name]).max(), changed)
    assert off <= MEAN_LEVELS, f"{name}: {off:.3f} levels mean from its reference"
    assert changed >= VISIBLE_LEVELS, f"{name}: only {changed:.2f} levels mean from the base image"


def _factors(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k.partition(".")[2] for k in f.keys()}  # noqa: SIM118 - not a mapping


def test_merged_weights_equal_the_reference_libraries(kinds, base):
    """Layer for layer, every weight our merge changes is the reference's, and no other weight moves; the
    LyCORIS files hold every form of their kind (CP/Tucker cores, whole and decomposed LoKr sides)."""
    assert {"hada_t1", "hada_t2", "hada_w1_a"} <= _factors(kinds["loha"].path)
    assert {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lokr_t2"} <= _factors(kinds["lokr"].path)
    assert {"lora_mid.weight", "dora_scale"} <= _factors(kinds["lycoris-dora"].path)
    shapes = lr.shapes_of(base)
    for name, f in kinds.items():
        lora = read_lora(f.path, targets=shapes, unet_config=base.unet.config)
        assert lora.kind == f.kind, name
        ours = lr.copies(base)
        fuse_into_modules(ours, [(lora, 1.0)])
        for comp in lr.COMPONENTS:
            before = dict(getattr(base, comp).named_parameters())
            theirs = dict(f.reference[comp].named_parameters())
            for pname, p in ours[comp].named_parameters():
                update = (theirs[pname] - before[pname]).abs().max()
                assert torch.equal(p, before[pname]) == bool(update == 0), f"{name}: {comp}.{pname} moved alone"
                err = (p - theirs[pname]).abs().max()
                assert err <= 1e-5 * update + 1e-7, f"{name}: {comp}.{pname} off by {err:.2e} of {update:.2e}"


@pytest.mark.parametrize("name", ["peft", "training", "attn-procs", "locon", "dora", "loha", "lokr", "lycoris-dora"])
def test_each_kind_at_run_time_matches_its_reference(name, kinds, images, tiny_engines, lora_dir, run_pipeline):
    result = run_pipeline.generate(GenerationRequest(**PROMPT, loras=((name, 1.0),)))
    _check(np.asarray(result.images[0]), name, images)


@pytest.fixture(scope="module")
def run_pipeline(tiny_engines, lora_dir):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_engines, device="cpu", lora_dirs=[lora_dir])


@pytest.fixture(scope="module")
def stacked_reference(base, kinds, tmp_path_factory) -> np.ndarray:
    """STACK merged in order by the references: diffusers fuses at its scale, peft's layers are made again
    from the same seeds (checked: the same file) and merged, LyCORIS merges its file."""
    shapes = lr.shapes_of(base)
    modules = lr.copies(base)
    again = tmp_path_factory.mktemp("again")
    for name, scale in STACK:
        f = kinds[name]
        if name in PEFT_KINDS:
            lr.peft_lycoris(modules, shapes, path=again / f.path.name, **PEFT_KINDS[name])
            assert _sha(again / f.path.name) == _sha(f.path)
        elif name == "lycoris-dora":
            lr.merge_with_lycoris(modules, f.path)
        else:
            lr.merge_with_diffusers(base, modules, f.path, scale)
    return _image(base, modules)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_stack(ours: np.ndarray, reference: np.ndarray, images: dict[str, np.ndarray]) -> None:
    off = np.abs(ours.astype(np.int16) - reference).mean()
    changed = np.abs(ours.astype(np.int16) - images["base"]).mean()
    log.info("stack: %.3f levels mean (max %d) from the reference, %.2f from the base image", off,
             np.abs(ours.astype(np.int16) - reference).max(), changed)
    assert off <= MEAN_LEVELS, f"stack: {off:.3f} levels mean from the reference"
    assert changed >= VISIBLE_LEVELS


def test_sdxl_trt_run_stacks_the_kinds_in_order(kinds, stacked_reference, images, tiny_engines, tmp_path):
    from PIL import Image

    from sdxl_trt.cli import main

    out = tmp_path / "stack.png"
    args = ["-q", "run", "--engines", str(tiny_engines), "--prompt", PROMPT["prompt"], "--width", "256", "--height",
            "256", "--steps", str(PROMPT["steps"]), "--guidance", str(PROMPT["guidance_scale"]), "--seed",
            str(PROMPT["seed"]), "--out", str(out)]
    for name, scale in STACK:
        args += ["--lora", f"{kinds[name].path}:{scale}"]
    assert main(args) == 0
    _assert_stack(np.asarray(Image.open(out).convert("RGB")), stacked_reference, images)


def test_build_fuses_the_kinds_in_order(kinds, stacked_reference, images, tmp_path):
    from sdxl_trt.cli import main
    from sdxl_trt.engine_dir.manifest import Manifest
    from sdxl_trt.runtime.pipeline import Pipeline

    out = tmp_path / "engines"
    args = ["-q", "build", "--model", "tiny", "--out", str(out), "--backend", "onnxruntime", "--precision", "fp32",
            "--buckets", "256x256"]
    for name, scale in STACK:
        args += ["--lora", f"{kinds[name].path}:{scale}"]
    assert main(args) == 0
    recorded = Manifest.load(out).model["loras"]
    assert [(lo["kind"], lo["scale"]) for lo in recorded] == [(kinds[n].kind, s) for n, s in STACK]
    ours = Pipeline.load(out, device="cpu").generate(GenerationRequest(**PROMPT)).images[0]
    _assert_stack(np.asarray(ours), stacked_reference, images)


@pytest.fixture(scope="module")
def server(tiny_engines: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from served(tiny_engines, tmp_path_factory.mktemp("serve-kinds") / "server.log",
                      "--lora-dir", str(lora_dir), "--warmup", "none", "--batch-window-ms", "0")


def test_a_real_server_lists_and_serves_every_kind(server, kinds, images):
    listed = httpx.get(f"{server.url}/sdapi/v1/loras", headers=auth(), timeout=60).json()
    assert {x["name"]: x["kind"] for x in listed} == {n: f.kind for n, f in kinds.items()}
    assert all(x["supported"] and "/" not in x["path"] for x in listed)
    for name in kinds:
        if name == "lokr":  # the OpenAI API's loras field
            body = {"prompt": PROMPT["prompt"], "size": "256x256", "seed": PROMPT["seed"], "steps": PROMPT["steps"],
                    "guidance_scale": PROMPT["guidance_scale"], "loras": [{"name": name, "scale": 1.0}]}
            r = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(), timeout=300)
            png = r.json()["data"][0]["b64_json"] if r.status_code == 200 else None
        else:  # A1111's prompt tag
            body = {"prompt": f"{PROMPT['prompt']}<lora:{name}:1>", "width": 256, "height": 256, "seed": PROMPT["seed"],
                    "steps": PROMPT["steps"], "cfg_scale": PROMPT["guidance_scale"], "sampler_name": "Euler"}
            r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=auth(), timeout=300)
            png = r.json()["images"][0] if r.status_code == 200 else None
        assert png is not None, (name, r.status_code, r.text[:300])
        _check(decode_png(png), name, images)
