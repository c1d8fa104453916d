"""ControlNet in the pipeline (ONNX Runtime engines of tiny + two tiny ControlNets) against diffusers' own
StableDiffusionXLControlNetPipeline, its MultiControlNet form and its img2img pipeline, built from the same
PyTorch weights with the same seeds. Tolerance as tests/test_pipeline.py (at most 2 uint8 levels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora_build import lora_files  # noqa: F401 - the module fixture of the LoRA test
from test_pipeline import assert_close, generators

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import ControlNetUnit, GenerationRequest


def control_image(seed: int, size: tuple[int, int] = (200, 168)) -> Image.Image:
    """A blocky random RGB image (edges and flat areas, like a preprocessed control map), not bucket-sized, so
    both sides resize it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.NEAREST)


@pytest.fixture(scope="module")
def cn_pipeline(tiny_controlnet_engines):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_controlnet_engines, device="cpu")


@pytest.fixture(scope="module")
def controlnet_modules():
    from support.controlnet_files import load_tiny_controlnet

    return {"edges": load_tiny_controlnet("tiny-controlnet"), "depth": load_tiny_controlnet("tiny-controlnet-small")}


@pytest.fixture(scope="module")
def reference(tiny_models, controlnet_modules):
    """diffusers' SDXL ControlNet pipelines over the tiny PyTorch modules."""
    import diffusers
    from transformers import CLIPTokenizer

    base, _ = tiny_models
    common = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                  tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
                  tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=base.unet,
                  scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
                  add_watermarker=False)

    def make(kind: str, names: list[str]):
        nets = [controlnet_modules[n] for n in names]
        controlnet = nets[0] if len(nets) == 1 else diffusers.models.controlnets.MultiControlNetModel(nets)
        cls = {"txt2img": diffusers.StableDiffusionXLControlNetPipeline,
               "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline}[kind]
        pipe = cls(controlnet=controlnet, **common)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def _diffusers(pipe, *, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int, n: int = 1,
               **kw) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generators(seed, n), num_images_per_prompt=n, output_type="np", **kw).images


def test_one_controlnet_at_scale_07_matches_diffusers(cn_pipeline, reference) -> None:
    cond = control_image(1)
    req = GenerationRequest(prompt="a castle on a hill", width=256, height=256, steps=4, guidance_scale=5.0, seed=21,
                            controlnets=(ControlNetUnit("edges", cond, scale=0.7),))
    ours = cn_pipeline.generate(req).images
    theirs = _diffusers(reference("txt2img", ["edges"]), prompt=req.prompt, width=256, height=256, steps=4,
                        guidance=5.0, seed=21, image=cond, controlnet_conditioning_scale=0.7)
    assert_close(ours, theirs)
    # The ControlNet acts: the same request without it is a different image.
    plain = cn_pipeline.generate(GenerationRequest(prompt=req.prompt, width=256, height=256, steps=4,
                                                   guidance_scale=5.0, seed=21)).images
    assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(ours[0], np.int16)).mean() > 1.0


def test_no_controlnet_on_controlnet_engines_matches_plain_diffusers(cn_pipeline, tiny_models) -> None:
    """A ControlNet-built UNet asked for none takes zero residuals: the plain SDXL pipeline's image."""
    import diffusers
    from transformers import CLIPTokenizer

    base, _ = tiny_models
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=base.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    req = GenerationRequest(prompt="a quiet lake", width=256, height=256, steps=3, guidance_scale=5.0, seed=5)
    assert_close(cn_pipeline.generate(req).images,
                 _diffusers(pipe, prompt=req.prompt, width=256, height=256, steps=3, guidance=5.0, seed=5))


def test_two_controlnets_with_different_scales_match_multicontrolnet(cn_pipeline, reference) -> None:
    edges, depth = control_image(2), control_image(3, (256, 256))
    req = GenerationRequest(prompt="a harbour at dusk", width=256, height=256, steps=4, guidance_scale=6.0, seed=8,
                            controlnets=[ControlNetUnit("edges", edges, scale=0.6),
                                         ControlNetUnit("depth", depth, scale=1.3)])
    ours = cn_pipeline.generate(req).images
    theirs = _diffusers(reference("txt2img", ["edges", "depth"]), prompt=req.prompt, width=256, height=256,
                        steps=4, guidance=6.0, seed=8, image=[edges, depth], controlnet_conditioning_scale=[0.6, 1.3])
    assert_close(ours, theirs)


def test_guidance_start_and_end_match_diffusers(cn_pipeline, reference) -> None:
    """start 0.2, end 0.8 over 5 steps: the ControlNet's per-step scale table is 0 on steps 0 and 4."""
    cond = control_image(4)
    req = GenerationRequest(prompt="a red bicycle", width=256, height=256, steps=5, guidance_scale=5.0, seed=3,
                            controlnets=[ControlNetUnit("edges", cond, scale=0.9, start=0.2, end=0.8)])
    ours = cn_pipeline.generate(req).images
    theirs = _diffusers(reference("txt2img", ["edges"]), prompt=req.prompt, width=256, height=256, steps=5,
                        guidance=5.0, seed=3, image=cond, controlnet_conditioning_scale=0.9,
                        control_guidance_start=0.2, control_guidance_end=0.8)
    assert_close(ours, theirs)


def test_guess_mode_matches_diffusers(cn_pipeline, reference) -> None:
    cond = control_image(5)
    req = GenerationRequest(prompt="a tower", width=256, height=256, steps=3, guidance_scale=4.0, seed=12,
                            controlnets=[ControlNetUnit("depth", cond, scale=0.8, guess_mode=True)])
    theirs = _diffusers(reference("txt2img", ["depth"]), prompt=req.prompt, width=256, height=256, steps=3,
                        guidance=4.0, seed=12, image=cond, controlnet_conditioning_scale=0.8, guess_mode=True)
    assert_close(cn_pipeline.generate(req).images, theirs)


def test_img2img_with_a_controlnet_matches_diffusers(cn_pipeline, reference) -> None:
    init = control_image(6, (256, 256)).convert("RGB")
    cond = control_image(7)
    req = GenerationRequest(prompt="an oil painting of a barn", width=256, height=256, steps=5, guidance_scale=5.0,
                            seed=4, init_image=init, strength=0.6,
                            controlnets=[ControlNetUnit("edges", cond, scale=0.7)])
    ours = cn_pipeline.generate(req).images
    theirs = _diffusers(reference("img2img", ["edges"]), prompt=req.prompt, width=256, height=256, steps=5,
                        guidance=5.0, seed=4, image=init, control_image=cond, strength=0.6,
                        controlnet_conditioning_scale=0.7)
    assert_close(ours, theirs)


def test_non_square_bucket_with_two_images_matches_diffusers(cn_pipeline, reference) -> None:
    cond = control_image(8, (300, 150))
    req = GenerationRequest(prompt="a long train", width=384, height=192, steps=3, guidance_scale=5.0, seed=30,
                            num_images=2, controlnets=[ControlNetUnit("edges", cond, scale=0.7)])
    ours = cn_pipeline.generate(req).images
    theirs = _diffusers(reference("txt2img", ["edges"]), prompt=req.prompt, width=384, height=192, steps=3,
                        guidance=5.0, seed=30, n=2, image=cond, controlnet_conditioning_scale=0.7)
    assert_close(ours, theirs)


def test_requests_with_the_same_controlnets_share_a_batch(cn_pipeline, monkeypatch) -> None:
    """Two requests naming the same ControlNet with their own images and scales run as one batch, and each
    image equals the one generated alone (per-row scale tables and control images)."""
    a = GenerationRequest(prompt="a dog", width=256, height=256, steps=2, seed=1,
                          controlnets=[ControlNetUnit("edges", control_image(9), scale=0.5)])
    b = GenerationRequest(prompt="a cat", width=256, height=256, steps=2, seed=2,
                          controlnets=[ControlNetUnit("edges", control_image(10), scale=1.1, end=0.5)])
    alone = [cn_pipeline.generate(r).images[0] for r in (a, b)]
    calls = []
    original = cn_pipeline.runner.run
    monkeypatch.setattr(cn_pipeline.runner, "run", lambda batch: calls.append(len(batch)) or original(batch))
    together = cn_pipeline.generate_batch([a, b])
    assert calls == [2]
    for one, res in zip(alone, together, strict=True):
        assert_close([one], res.images)


def test_bad_controlnet_requests_are_refused_and_the_next_is_fine(cn_pipeline, tiny_pipeline) -> None:
    cond = control_image(11)

    def refused(pipeline, match: str, **kw) -> None:
        with pytest.raises(InvalidRequestError, match=match):
            pipeline.generate(GenerationRequest(prompt="x", width=256, height=256, steps=1, seed=0, **kw))

    refused(cn_pipeline, "unknown ControlNet 'pose'.*edges, depth", controlnets=[ControlNetUnit("pose", cond)])
    refused(cn_pipeline, "needs a control image", controlnets=[ControlNetUnit("edges", None)])
    refused(cn_pipeline, "scale must be a finite number", controlnets=[ControlNetUnit("edges", cond, scale=float("nan"))])
    refused(cn_pipeline, "start .* must be below its end", controlnets=[ControlNetUnit("edges", cond, start=0.8, end=0.8)])
    refused(cn_pipeline, "named once", controlnets=[ControlNetUnit("edges", cond), ControlNetUnit("edges", cond)])
    refused(cn_pipeline, "must be a PIL image", controlnets=[ControlNetUnit("edges", b"not an image")])  # type: ignore[arg-type]
    refused(tiny_pipeline, "built without ControlNet.*--controlnet PATH:NAME", controlnets=[ControlNetUnit("edges", cond)])
    ok = cn_pipeline.generate(GenerationRequest(prompt="x", width=256, height=256, steps=1, seed=0,
                                                controlnets=[ControlNetUnit("edges", cond)]))
    assert ok.images[0].size == (256, 256) and ok.parameters["controlnets"][0]["name"] == "edges"


def test_runtime_loras_with_a_controlnet_match_diffusers_with_them_fused(tiny_controlnet_engines, tiny_models,
                                                                         controlnet_modules, request) -> None:
    """Two stacked LoRAs switched into a ControlNet build's engines (the UNet with residual inputs, through its
    weight map) plus a ControlNet: diffusers' ControlNet pipeline over the same modules with the LoRAs fused."""
    import diffusers
    from test_lora_build import SCALES, _fused_reference
    from transformers import CLIPTokenizer

    from sdxl_trt.runtime.pipeline import Pipeline

    files = request.getfixturevalue("lora_files")
    (style, _), _ = files
    pipe = Pipeline.load(tiny_controlnet_engines, device="cpu", lora_dirs=[style.parent])
    cond = control_image(12)
    req = GenerationRequest(prompt="a watercolor of a harbour", width=256, height=256, steps=3, guidance_scale=5.0,
                            seed=9, loras=(("style", SCALES[0]), ("detail", SCALES[1])),
                            controlnets=[ControlNetUnit("edges", cond, scale=0.7)])
    ours = pipe.generate(req).images
    base = tiny_models[0]
    fused = _fused_reference(base, files)
    reference = diffusers.StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=fused["text_encoder"], text_encoder_2=fused["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=fused["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
        controlnet=controlnet_modules["edges"], add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = _diffusers(reference, prompt=req.prompt, width=256, height=256, steps=3, guidance=5.0, seed=9,
                        image=cond, controlnet_conditioning_scale=0.7)
    assert_close(ours, theirs)
