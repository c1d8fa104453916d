"""Few-step generation (issue 10) through the whole pipeline (ONNX Runtime engines of the tiny model) against
diffusers' own SDXL pipelines on the same weights: LCM, TCD, trailing spacing, explicit timesteps, guidance
off, img2img, and the refusals. Tolerance as tests/test_pipeline.py (2 levels, mean 0.05; why is said there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import test_pipeline
import torch
from test_pipeline import assert_close, generators, init_image, to_uint8

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.presets import SCHEDULER_CONFIG
from sdxl_trt.request import GenerationRequest
from sdxl_trt.samplers import sampler

PROMPT = "a red fox in the snow, photograph"

diffusers_pipes = test_pipeline.reference  # the fixture (diffusers' SDXL pipelines over tiny), under this name here


def _scheduler(name: str, **kwargs: Any) -> Any:
    """diffusers' scheduler for our sampler ``name`` (its record's class and kwargs), plus ``kwargs``."""
    import diffusers

    record = sampler(name)
    return getattr(diffusers, record.diffusers_class).from_config(SCHEDULER_CONFIG, **record.kwargs, **kwargs)


def _txt2img(pipe: Any, scheduler: Any, *, seed: int, steps: int | None, guidance: float, n: int = 1,
             negative: str | None = None, prompt: str = PROMPT, **kw: Any) -> np.ndarray:
    pipe.scheduler = scheduler
    return pipe(prompt=prompt, negative_prompt=negative, width=256, height=256, num_inference_steps=steps,
                guidance_scale=guidance, generator=generators(seed, n), num_images_per_prompt=n, output_type="np",
                **kw).images


def test_lcm_4_steps_guidance_0(tiny_pipeline, diffusers_pipes):
    req = GenerationRequest(prompt=PROMPT, width=256, height=256, steps=4, guidance_scale=0.0, scheduler="lcm", seed=3)
    ours = tiny_pipeline.generate(req)
    assert ours.steps_run == {"unet": 4}
    theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("lcm"), seed=3, steps=4, guidance=0.0)
    assert_close(ours.images, theirs)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_trailing(tiny_pipeline, diffusers_pipes, steps):
    """The SDXL-Lightning recipe on a model whose config says leading: trailing spacing per request."""
    req = GenerationRequest(prompt=PROMPT, width=256, height=256, steps=steps, guidance_scale=0.0, seed=steps,
                            timestep_spacing="trailing")
    ours = tiny_pipeline.generate(req)
    theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("euler", timestep_spacing="trailing"),
                      seed=steps, steps=steps, guidance=0.0)
    assert_close(ours.images, theirs)
    assert ours.parameters["timestep_spacing"] == "trailing"
    # the spacing matters: the model's own (leading) gives another image
    leading = tiny_pipeline.generate(GenerationRequest(prompt=PROMPT, width=256, height=256, steps=steps,
                                                       guidance_scale=0.0, seed=steps))
    assert np.abs(to_uint8(leading.images) - to_uint8(ours.images)).max() > 5


def test_tcd_4_steps_eta(tiny_pipeline, diffusers_pipes):
    req = GenerationRequest(prompt=PROMPT, width=256, height=256, steps=4, guidance_scale=0.0, scheduler="tcd", seed=5,
                            eta=0.3)
    ours = tiny_pipeline.generate(req)
    theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("tcd"), seed=5, steps=4, guidance=0.0, eta=0.3)
    assert_close(ours.images, theirs)
    # eta is per request and reaches the step: another eta, another image; the default is 0.3
    other = tiny_pipeline.generate(GenerationRequest(prompt=PROMPT, width=256, height=256, steps=4,
                                                     guidance_scale=0.0, scheduler="tcd", seed=5, eta=0.9))
    assert np.abs(to_uint8(other.images) - to_uint8(ours.images)).max() > 5
    default = tiny_pipeline.generate(GenerationRequest(prompt=PROMPT, width=256, height=256, steps=4,
                                                       guidance_scale=0.0, scheduler="tcd", seed=5))
    assert np.array_equal(to_uint8(default.images), to_uint8(ours.images))


def test_lcm_explicit_timesteps(tiny_pipeline, diffusers_pipes):
    """DMD2's published 4-step schedule; steps follows the list."""
    req = GenerationRequest(prompt=PROMPT, width=256, height=256, guidance_scale=0.0, scheduler="lcm", seed=6,
                            timesteps=[999, 749, 499, 249])
    assert req.steps == 4
    ours = tiny_pipeline.generate(req)
    assert ours.steps_run == {"unet": 4} and ours.parameters["timesteps"] == [999, 749, 499, 249]
    theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("lcm"), seed=6, steps=None, guidance=0.0,
                      timesteps=[999, 749, 499, 249])
    assert_close(ours.images, theirs)


def test_img2img_lcm_4_steps(tiny_pipeline, diffusers_pipes):
    image = init_image(256, 256, seed=4)
    req = GenerationRequest(prompt="a watercolor", init_image=image, strength=0.75, steps=4, guidance_scale=0.0,
                            scheduler="lcm", seed=13)
    ours = tiny_pipeline.generate(req)
    assert ours.steps_run == {"unet": 3}  # int(4 * 0.75)
    pipe = diffusers_pipes["img2img"]
    pipe.scheduler = _scheduler("lcm")
    theirs = pipe(prompt=req.prompt, image=image, strength=0.75, num_inference_steps=4, guidance_scale=0.0,
                  generator=generators(13, 1), output_type="np").images
    assert_close(ours.images, theirs)


def test_step_counts_and_etas_share_the_fixed_tables(tiny_pipeline, diffusers_pipes):
    """One pipeline runs tcd at 6, then 1, then 3 steps with different etas through the same fixed tables and
    noise buffer (what one captured step reads): each equals diffusers, so rows left over from a longer or
    noisier schedule (noise rows, the last step's zero row) are never read."""
    for steps, eta in ((6, 0.5), (1, 0.3), (3, 0.0)):
        req = GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=steps, guidance_scale=0.0,
                                scheduler="tcd", eta=eta, seed=steps)
        ours = tiny_pipeline.generate(req)
        assert ours.steps_run == {"unet": steps}
        theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("tcd"), seed=steps, steps=steps,
                          guidance=0.0, eta=eta, prompt="a lighthouse")
        assert_close(ours.images, theirs)


class _ShapeRecorder:
    """Wraps an engine and records the batch size of every UNet call (what the engine really sees)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], **kw: Any) -> Any:
        self.batches.append(int(inputs["sample"].shape[0]))
        return self.engine.run(inputs, outputs, **kw)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_off_runs_the_unet_on_the_images_only(tiny_pipeline, diffusers_pipes, monkeypatch, caplog, guidance):
    """guidance_scale <= 1: batch M (not 2M) in every UNet call, the negative prompt ignored with a note, and
    the image equals diffusers' (which ignores the negative prompt too)."""
    denoiser = tiny_pipeline.runner.denoisers["unet"]
    recorder = _ShapeRecorder(denoiser.unet)
    monkeypatch.setattr(denoiser, "unet", recorder)
    req = GenerationRequest(prompt=PROMPT, negative_prompt="blurry, low quality", width=256, height=256, steps=3,
                            guidance_scale=guidance, seed=21, num_images=2)
    with caplog.at_level("INFO", logger="sdxl_trt.runtime.conditioning"):
        ours = tiny_pipeline.generate(req)
    assert recorder.batches == [2, 2, 2]
    assert "negative prompt is ignored" in caplog.text
    theirs = _txt2img(diffusers_pipes["txt2img"], _scheduler("euler"), seed=21, steps=3, guidance=guidance,
                      n=2, negative=req.negative_prompt)
    assert_close(ours.images, theirs)
    recorder.batches.clear()
    tiny_pipeline.generate(GenerationRequest(prompt=PROMPT, width=256, height=256, steps=2, guidance_scale=5.0, seed=1,
                                             num_images=2))
    assert recorder.batches == [4, 4]  # the recorder sees guided batches: it would have caught 2M above


def test_requests_with_other_spacings_batch_apart(tiny_pipeline):
    """timestep_spacing, timesteps and eta change the tables: requests differing in them are never one batch,
    and each gets the image it gets alone."""
    reqs = [GenerationRequest(prompt="a tree", steps=4, seed=1, guidance_scale=0.0),
            GenerationRequest(prompt="a tree", steps=4, seed=1, guidance_scale=0.0, timestep_spacing="trailing"),
            GenerationRequest(prompt="a tree", seed=1, guidance_scale=0.0, scheduler="lcm",
                              timesteps=(999, 749, 499, 249)),
            GenerationRequest(prompt="a tree", steps=4, seed=1, guidance_scale=0.0, scheduler="lcm"),
            GenerationRequest(prompt="a tree", steps=4, seed=1, guidance_scale=0.0, scheduler="tcd", eta=0.1),
            GenerationRequest(prompt="a tree", steps=4, seed=1, guidance_scale=0.0, scheduler="tcd", eta=0.6)]
    together = tiny_pipeline.generate_batch(reqs)
    for req, t in zip(reqs, together, strict=True):
        alone = tiny_pipeline.generate(req)
        assert np.abs(to_uint8(t.images) - to_uint8(alone.images)).max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "param", "text"),
    [
        ({"timestep_spacing": "karras"}, "timestep_spacing", "leading, linspace, trailing"),
        ({"timesteps": [249, 499, 749, 999], "scheduler": "lcm"}, "timesteps", "descending"),
        ({"timesteps": [999, 999], "scheduler": "lcm"}, "timesteps", "descending"),
        ({"timesteps": [1200, 749, 499, 249], "scheduler": "lcm"}, "timesteps", "0..999"),
        ({"timesteps": [999, 749, 499, -5], "scheduler": "euler"}, "timesteps", "0..999"),
        ({"timesteps": [999, 749, 499, 249], "scheduler": "euler_a"}, "timesteps", "does not take explicit timesteps"),
        ({"timesteps": [999, 749, 499, 249], "scheduler": "dpmpp_2m_karras"}, "timesteps", "lcm, tcd"),
        ({"timestep_spacing": "trailing", "scheduler": "lcm"}, "timestep_spacing", "own timesteps"),
        ({"eta": 1.5, "scheduler": "tcd"}, "eta", "[0, 1]"),
        ({"eta": -0.2, "scheduler": "tcd"}, "eta", "[0, 1]"),
        ({"eta": 0.3, "scheduler": "euler"}, "eta", "does not take eta"),
        ({"steps": 60, "scheduler": "lcm"}, "steps", "original_inference_steps"),
    ],
)
def test_bad_fewstep_requests_are_refused_and_the_pipeline_keeps_working(tiny_pipeline, kwargs, param, text):
    req = GenerationRequest(**{"prompt": "x", "steps": 2, "seed": 0, **kwargs})
    with pytest.raises(InvalidRequestError) as err:
        tiny_pipeline.check(req)  # what a service calls before queueing
    assert err.value.param == param and text in str(err.value), str(err.value)
    with pytest.raises(InvalidRequestError):
        tiny_pipeline.generate(req)
    ok = tiny_pipeline.generate(GenerationRequest(prompt="after an error", steps=2, seed=0, scheduler="lcm",
                                                  guidance_scale=0.0))
    assert ok.images[0].size == (256, 256)


# --- guidance-distilled UNet (time_cond_proj_dim): the tiny-lcm preset ----------------------------------


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory: pytest.TempPathFactory):
    """tiny-lcm's ONNX Runtime engines (one bucket, up to 2 images) and its PyTorch model."""
    import logging

    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.export.loading import load_model
    from sdxl_trt.runtime.pipeline import Pipeline

    logging.getLogger("sdxl_trt").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("engines") / "tiny-lcm"
    build_engines(BuildOptions(model="tiny-lcm", out=out, backend="onnxruntime", precision="fp32",
                               buckets="256x256", max_batch=2))
    return Pipeline.load(out, device="cpu"), load_model("tiny-lcm")


@pytest.fixture(scope="module")
def lcm_reference(tiny_lcm):
    import diffusers
    from transformers import CLIPTokenizer

    model = tiny_lcm[1]
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(model.config_dir / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(model.config_dir / "tokenizer_2")), unet=model.unet,
        scheduler=_scheduler("lcm"), force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_distilled_unet_takes_the_embedding_not_a_cfg_batch(tiny_lcm, lcm_reference, tiny_pipeline,
                                                                    monkeypatch):
    pipe = tiny_lcm[0]
    assert pipe.ctx.specs["unet"].input_names[-1] == "timestep_cond"
    assert pipe.ctx.specs["unet"].tensor("timestep_cond").shape({"B": 2}) == (2, 32)
    assert "timestep_cond" not in tiny_pipeline.ctx.specs["unet"].input_names  # only where the model has it
    denoiser = pipe.runner.denoisers["unet"]
    recorder = _ShapeRecorder(denoiser.unet)
    monkeypatch.setattr(denoiser, "unet", recorder)
    req = GenerationRequest(prompt=PROMPT, negative_prompt="blurry", width=256, height=256, steps=4,
                            guidance_scale=7.0, scheduler="lcm", seed=17, num_images=2)
    ours = pipe.generate(req)
    assert recorder.batches == [2, 2, 2, 2]  # M, never 2M, at guidance 7
    theirs = _txt2img(lcm_reference, _scheduler("lcm"), seed=17, steps=4, guidance=7.0, n=2,
                      negative="blurry")
    assert_close(ours.images, theirs)
    # the embedding reaches the UNet: another guidance scale gives another image
    other = pipe.generate(GenerationRequest(prompt=PROMPT, width=256, height=256, steps=4, guidance_scale=2.0,
                                            scheduler="lcm", seed=17))
    assert np.abs(to_uint8(other.images) - to_uint8(ours.images[:1])).max() > 5


def test_engines_built_before_the_guidance_embedding_are_refused(tiny_lcm, tiny_pipeline):
    """A manifest from before the contract carried timestep_cond, for a guidance-distilled model: every request
    is refused with the rebuild command, and a current pipeline keeps working."""
    import dataclasses

    from sdxl_trt.engine_dir.manifest import unpassed_guidance_embedding
    from sdxl_trt.errors import ManifestError
    from sdxl_trt.runtime.pipeline import Pipeline

    good = tiny_lcm[0]
    old_dims = {k: v for k, v in good.manifest.model_dims.items() if k != "unet_time_cond_dim"}
    old = dataclasses.replace(good.manifest, model_dims=old_dims, contract_version=None)  # as such a build wrote it
    assert unpassed_guidance_embedding(old) == 32
    assert unpassed_guidance_embedding(good.manifest) == 0
    assert unpassed_guidance_embedding(dataclasses.replace(  # a pre-change manifest of a model without it: fine
        tiny_pipeline.manifest, contract_version=None,
        model_dims={k: v for k, v in tiny_pipeline.manifest.model_dims.items() if k != "unet_time_cond_dim"})) == 0
    # where the version is recorded, it decides: a version-2 manifest is never sniffed
    assert unpassed_guidance_embedding(dataclasses.replace(old, contract_version=2)) == 0
    stale = Pipeline(good.directory, old, good.engines, good.device)
    req = GenerationRequest(prompt="x", steps=2, seed=0, scheduler="lcm", guidance_scale=7.0)
    with pytest.raises(ManifestError, match=r"timestep_cond.*Rebuild: sdxl-trt build"):
        stale.generate(req)
    assert good.generate(req).images[0].size == (256, 256)


def test_run_flags_reach_the_request():
    """sdxl-trt run --timestep-spacing/--timesteps/--eta become the request's fields; a malformed list stops argparse."""
    from sdxl_trt.cli import build_parser
    from sdxl_trt.cli.run import request_from_args

    base = ["run", "--engines", "e", "--prompt", "p", "--out", "o.png"]
    args = build_parser().parse_args([*base, "--scheduler", "lcm", "--timesteps", "999,749,499,249", "--eta", "0.3"])
    req = request_from_args(args)
    assert (req.scheduler, req.timesteps, req.steps, req.eta) == ("lcm", (999, 749, 499, 249), 4, 0.3)
    req = request_from_args(build_parser().parse_args([*base, "--timestep-spacing", "trailing", "--steps", "2"]))
    assert (req.timestep_spacing, req.timesteps, req.eta, req.steps) == ("trailing", None, None, 2)
    for bad in (["--timesteps", "999,7a9"], ["--timestep-spacing", "karras"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])


def test_run_defaults_to_the_models_own_scheduler(tiny_lcm, tmp_path, capsys):
    """An engine directory whose scheduler config is an LCMScheduler one (as LCM-distilled SDXL ships) runs lcm when
    `sdxl-trt run` names no scheduler; a named one still wins."""
    import json
    import shutil

    from PIL import Image

    from sdxl_trt.cli import build_parser
    from sdxl_trt.cli.run import run_from_args

    engines = tmp_path / "engines"
    shutil.copytree(tiny_lcm[0].directory, engines)
    config_path = engines / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "LCMScheduler", "original_inference_steps": 50}))
    base = ["run", "--engines", str(engines), "--prompt", "a cat", "--steps", "2", "--guidance", "0", "--seed", "1",
            "--device", "cpu"]
    for extra, expected in (([], "lcm"), (["--scheduler", "euler"], "euler")):
        out = tmp_path / f"{expected}.png"
        assert run_from_args(build_parser().parse_args([*base, *extra, "--out", str(out)])) == 0
        with Image.open(out) as im:
            assert json.loads(im.info["parameters"])["scheduler"] == expected
