"""The whole pipeline (ONNX Runtime engines of the tiny model) against diffusers' own SDXL pipelines
built from the same PyTorch weights, with the same seeds and settings.

Tolerance: images are compared as uint8 arrays. Our engines run the ONNX export of the same float32
weights through ONNX Runtime, whose kernels differ from PyTorch's by ~1e-6 relative (see the export
verification); over a few denoising steps and the VAE that stays far below one 8-bit level, so we
allow at most 2 levels anywhere and a mean difference below 0.05 levels. A wrong seed order, timestep,
micro-conditioning number or guidance formula moves pixels by tens of levels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest
from sdxl_trt.samplers import OWN_TIMESTEPS, SCHEDULERS, sampler

MAX_LEVELS = 2
MEAN_LEVELS = 0.05

# Our samplers, each against diffusers' class from its record (sdxl_trt.samplers); those that choose their own
# timesteps (LCM, TCD: few-step samplers) are test_fewstep's.
PIPELINE_SAMPLERS = [name for name in SCHEDULERS if name not in OWN_TIMESTEPS]


def diffusers_scheduler(name: str, _config=None):
    """A fresh diffusers scheduler from the model's own scheduler config (never from another class's config,
    which would carry e.g. use_karras_sigmas over)."""
    import diffusers

    from sdxl_trt.presets import SCHEDULER_CONFIG

    record = sampler(name)
    return getattr(diffusers, record.diffusers_class).from_config(SCHEDULER_CONFIG, **record.kwargs)


@pytest.fixture(scope="module")
def reference(tiny_models):
    """diffusers' SDXL pipelines over the tiny PyTorch modules (text2img, img2img, inpaint, refiner)."""
    import diffusers
    from transformers import CLIPTokenizer

    base, refiner = tiny_models
    tok = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2"))
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler"))
    common = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=tok,
                  tokenizer_2=tok2, unet=base.unet, scheduler=sched)
    pipes = {
        "txt2img": diffusers.StableDiffusionXLPipeline(**common, force_zeros_for_empty_prompt=True, add_watermarker=False),
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline(**common, add_watermarker=False),
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline(**common, add_watermarker=False),
        "refiner": diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoder_2, tokenizer=None,
            tokenizer_2=tok2, unet=refiner.unet, scheduler=sched, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def to_uint8(images) -> np.ndarray:
    if isinstance(images, list) and isinstance(images[0], Image.Image):
        return np.stack([np.asarray(im) for im in images]).astype(np.int16)
    return (np.asarray(images) * 255).round().astype(np.int16)


def assert_close(ours, theirs) -> None:
    a, b = to_uint8(ours), to_uint8(theirs)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b)
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, f"max {diff.max()}, mean {diff.mean():.4f}"


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def run_diffusers_txt2img(pipe, sched_name: str, *, prompt, negative, width, height, steps, guidance, seed, n,
                          **kw):
    pipe.scheduler = diffusers_scheduler(sched_name, pipe.scheduler.config)
    return pipe(prompt=prompt, negative_prompt=negative or None, width=width, height=height,
                num_inference_steps=steps, guidance_scale=guidance, generator=generators(seed, n),
                num_images_per_prompt=n, output_type="np", **kw).images


@pytest.mark.parametrize("scheduler", PIPELINE_SAMPLERS)
def test_txt2img_matches_diffusers_for_every_scheduler(tiny_pipeline, reference, scheduler):
    """Every scheduler runs from the fixed max_steps tables (what a captured step reads) and equals diffusers."""
    req = GenerationRequest(prompt="a red fox in the snow, photograph", width=256, height=256, steps=6,
                            guidance_scale=6.0, scheduler=scheduler, seed=11)
    ours = tiny_pipeline.generate(req).images
    theirs = run_diffusers_txt2img(reference["txt2img"], scheduler, prompt=req.prompt, negative="", width=256,
                                   height=256, steps=6, guidance=6.0, seed=11, n=1)
    assert_close(ours, theirs)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_sde", "unipc"])
def test_step_counts_share_the_fixed_tables(tiny_pipeline, reference, scheduler):
    """One pipeline runs 6, then 1, then 3 steps of a sampler through the same fixed tables (what one captured
    step reads): each equals diffusers, so rows left over from a longer schedule are never read, and a
    one-step schedule runs (it once crashed the CUDA context reading a second row)."""
    for steps in (6, 1, 3):
        req = GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=steps, guidance_scale=5.0,
                                scheduler=scheduler, seed=steps)
        ours = tiny_pipeline.generate(req)
        assert ours.steps_run == {"unet": steps}
        theirs = run_diffusers_txt2img(reference["txt2img"], scheduler, prompt=req.prompt, negative="", width=256,
                                       height=256, steps=steps, guidance=5.0, seed=steps, n=1)
        assert_close(ours.images, theirs)


def test_img2img_at_low_strength_runs_one_step(tiny_pipeline, reference):
    image = init_image(256, 256, seed=3)
    req = GenerationRequest(prompt="a watercolor", init_image=image, strength=0.3, steps=4, guidance_scale=5.0,
                            seed=9)
    result = tiny_pipeline.generate(req)
    assert result.steps_run == {"unet": 1}  # int(4 * 0.3) = 1
    pipe = reference["img2img"]
    pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler.config)
    theirs = pipe(prompt=req.prompt, image=image, strength=0.3, num_inference_steps=4, guidance_scale=5.0,
                  generator=generators(9, 1), output_type="np").images
    assert_close(result.images, theirs)


def test_non_square_bucket_batch_and_negative_prompt(tiny_pipeline, reference):
    req = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", width=384,
                            height=192, steps=5, guidance_scale=7.5, seed=3, num_images=2)
    result = tiny_pipeline.generate(req)
    assert [im.size for im in result.images] == [(384, 192)] * 2
    assert result.seeds == [3, 4]
    theirs = run_diffusers_txt2img(reference["txt2img"], "euler", prompt=req.prompt, negative=req.negative_prompt,
                                   width=384, height=192, steps=5, guidance=7.5, seed=3, n=2)
    assert_close(result.images, theirs)
    # The negative prompt matters: zeroed negative embeddings give another image.
    plain = tiny_pipeline.generate(GenerationRequest(prompt=req.prompt, width=384, height=192, steps=5,
                                                     guidance_scale=7.5, seed=3)).images[0]
    assert np.abs(to_uint8([plain]) - to_uint8(result.images[:1])).max() > 5


def test_micro_conditioning_is_passed(tiny_pipeline, reference):
    req = GenerationRequest(prompt="portrait of a cat", width=256, height=320, steps=4, guidance_scale=5.0, seed=5,
                            original_size=(512, 384), crop_top_left=(16, 8), target_size=(320, 256))
    ours = tiny_pipeline.generate(req).images
    theirs = run_diffusers_txt2img(reference["txt2img"], "euler", prompt=req.prompt, negative="", width=256,
                                   height=320, steps=4, guidance=5.0, seed=5, n=1, original_size=(512, 384),
                                   crops_coords_top_left=(16, 8), target_size=(320, 256))
    assert_close(ours, theirs)


def init_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 128 / (width + height)], -1)
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_img2img_matches_diffusers(tiny_pipeline, reference):
    image = init_image(256, 256)
    req = GenerationRequest(prompt="an oil painting", init_image=image, strength=0.6, steps=8, guidance_scale=5.0,
                            seed=21)
    ours = tiny_pipeline.generate(req).images
    pipe = reference["img2img"]
    pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler.config)
    theirs = pipe(prompt=req.prompt, image=image, strength=0.6, num_inference_steps=8, guidance_scale=5.0,
                  generator=generators(21, 1), output_type="np").images
    assert_close(ours, theirs)


def test_inpainting_matches_diffusers(tiny_pipeline, reference):
    image = init_image(256, 256, seed=1)
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 96:224] = 255
    mask_image = Image.fromarray(mask)
    req = GenerationRequest(prompt="a blue door", init_image=image, mask_image=mask_image, strength=0.9, steps=8,
                            guidance_scale=5.0, seed=8)
    ours = tiny_pipeline.generate(req).images
    pipe = reference["inpaint"]
    pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler.config)
    theirs = pipe(prompt=req.prompt, image=image, mask_image=mask_image, strength=0.9, num_inference_steps=8,
                  guidance_scale=5.0, generator=generators(8, 1), width=256, height=256, output_type="np").images
    assert_close(ours, theirs)


def test_refiner_ensemble_matches_diffusers(tiny_pipeline, reference):
    req = GenerationRequest(prompt="a castle on a hill", steps=10, guidance_scale=5.0, seed=2,
                            refiner_mode="ensemble", refiner_start=0.7)
    ours = tiny_pipeline.generate(req).images
    gens = generators(2, 1)
    base = reference["txt2img"]
    base.scheduler = diffusers_scheduler("euler", base.scheduler.config)
    latents = base(prompt=req.prompt, width=256, height=256, num_inference_steps=10, guidance_scale=5.0,
                   generator=gens, denoising_end=0.7, output_type="latent").images
    refiner = reference["refiner"]
    refiner.scheduler = diffusers_scheduler("euler", refiner.scheduler.config)
    theirs = refiner(prompt=req.prompt, image=latents, num_inference_steps=10, guidance_scale=5.0,
                     generator=gens, denoising_start=0.7, output_type="np").images
    assert_close(ours, theirs)


def test_refiner_img2img_matches_diffusers(tiny_pipeline, reference):
    req = GenerationRequest(prompt="a castle on a hill", steps=6, guidance_scale=5.0, seed=4,
                            refiner_mode="img2img", refiner_strength=0.3)
    ours = tiny_pipeline.generate(req).images
    gens = generators(4, 1)
    base = reference["txt2img"]
    base.scheduler = diffusers_scheduler("euler", base.scheduler.config)
    latents = base(prompt=req.prompt, width=256, height=256, num_inference_steps=6, guidance_scale=5.0,
                   generator=gens, output_type="latent").images
    refiner = reference["refiner"]
    refiner.scheduler = diffusers_scheduler("euler", refiner.scheduler.config)
    theirs = refiner(prompt=req.prompt, image=latents, strength=0.3, num_inference_steps=6, guidance_scale=5.0,
                     generator=gens, output_type="np").images
    assert_close(ours, theirs)


def test_batched_requests_equal_single_requests(tiny_pipeline):
    a = GenerationRequest(prompt="a tree", steps=4, seed=100, scheduler="euler_a", guidance_scale=4.0)
    b = GenerationRequest(prompt="a boat on a lake", negative_prompt="people", steps=4, seed=7,
                          scheduler="euler_a", guidance_scale=8.0)
    together = tiny_pipeline.generate_batch([a, b])
    alone = [tiny_pipeline.generate(a), tiny_pipeline.generate(b)]
    for t, s in zip(together, alone, strict=True):
        diff = np.abs(to_uint8(t.images) - to_uint8(s.images))
        assert diff.max() <= 1, diff.max()  # same math, other batch shape: float rounding only


def test_long_prompt_is_chunked_not_cut(tiny_pipeline):
    words = " ".join(["mountain"] * 60 + ["sunset"] * 40)  # > 75 tokens
    long = tiny_pipeline.generate(GenerationRequest(prompt=words, steps=3, seed=1)).images[0]
    cut = tiny_pipeline.generate(GenerationRequest(prompt=" ".join(["mountain"] * 60 + ["sunset"] * 15), steps=3,
                                                   seed=1)).images[0]
    # tokens past the first 75 change the image: they were encoded, not dropped
    assert np.abs(to_uint8([long]) - to_uint8([cut])).max() > 0


@pytest.mark.parametrize(
    ("kwargs", "param", "text"),
    [
        ({"width": 500, "height": 500}, "size", "256x256"),
        ({"width": 256}, "size", "both"),
        ({"steps": 0}, "steps", "1..150"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "finite"),
        ({"scheduler": "heun_magic"}, "scheduler", "euler"),
        ({"prompt": " ".join(["word"] * 400)}, "prompt", "--max-prompt-chunks"),
        ({"mask_image": Image.new("L", (256, 256))}, "mask", "init_image"),
        ({"init_image": Image.new("RGB", (256, 256)), "mask_image": Image.new("L", (64, 64))}, "mask", "same size"),
        ({"strength": 1.5, "init_image": Image.new("RGB", (256, 256))}, "strength", "(0, 1]"),
    ],
)
def test_bad_requests_are_refused_and_the_pipeline_keeps_working(tiny_pipeline, kwargs, param, text):
    req = GenerationRequest(**{"prompt": "x", "steps": 2, "seed": 0, **kwargs})
    with pytest.raises(InvalidRequestError) as err:
        tiny_pipeline.generate(req)
    assert err.value.param == param and text in str(err.value)
    ok = tiny_pipeline.generate(GenerationRequest(prompt="after an error", steps=2, seed=0))
    assert ok.images[0].size == (256, 256)


def test_snap_to_bucket(tiny_pipeline):
    res = tiny_pipeline.generate(GenerationRequest(prompt="x", width=300, height=250, snap_to_bucket=True, steps=2,
                                                   seed=0))
    assert res.images[0].size == (320, 256)


def test_nan_from_an_engine_is_reported_not_written_and_pipeline_recovers(tiny_pipeline, monkeypatch):
    from sdxl_trt.errors import NonFiniteOutputError

    decoder = tiny_pipeline.engines["vae_decoder"]
    real_run = decoder.run

    def poisoned(inputs, outputs, **kw):
        real_run(inputs, outputs, **kw)
        outputs["images"][0, 0, 0, 0] = float("nan")

    monkeypatch.setattr(decoder, "run", poisoned)
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        tiny_pipeline.generate(GenerationRequest(prompt="x", steps=2, seed=0))
    monkeypatch.setattr(decoder, "run", real_run)
    assert tiny_pipeline.generate(GenerationRequest(prompt="x", steps=2, seed=0)).images[0].size == (256, 256)


def test_concurrent_threads_get_the_images_they_would_get_alone(tiny_pipeline):
    from concurrent.futures import ThreadPoolExecutor

    reqs = [GenerationRequest(prompt=f"a painting of a {w}", steps=2, seed=i, scheduler="dpmpp_2m")
            for i, w in enumerate(["cat", "dog", "bird", "fish"])]
    alone = [to_uint8(tiny_pipeline.generate(r).images) for r in reqs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: to_uint8(tiny_pipeline.generate(r).images), reqs))
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)


def test_warmup_runs_each_sampler_and_guidance_it_is_given(tiny_pipeline, monkeypatch) -> None:
    """On the CPU nothing is captured, but warm-up must still ask for every (sampler, guidance) combination it
    was given (each is its own captured step on a GPU), the model's own sampler by default, and refuse unknown ones."""
    seen = []
    monkeypatch.setattr(tiny_pipeline, "generate", lambda req: seen.append((req.scheduler, req.guidance_scale)))
    tiny_pipeline.warmup(buckets=["256x256"], batch_sizes=[1], refiner=False, schedulers=["unipc", "lcm"],
                         guidance_scales=[5.0, 0.0])
    assert seen == [("unipc", 5.0), ("unipc", 0.0), ("lcm", 5.0), ("lcm", 0.0)]
    seen.clear()
    tiny_pipeline.warmup(buckets=["256x256"], batch_sizes=[1], refiner=False)
    assert seen == [(tiny_pipeline.default_scheduler, 5.0)]
    with pytest.raises(InvalidRequestError, match="warm-up scheduler.*heun3"):
        tiny_pipeline.warmup(buckets=["256x256"], schedulers=["heun3"])
    tiny_pipeline.ctx.graphs.capture_allowed = True  # the session's pipeline: leave it as it was
