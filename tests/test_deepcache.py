"""Step caching (DeepCache) against DeepCache's own ``DeepCacheSDHelper`` on diffusers' SDXL pipelines with the same
tiny weights: the wrappers layer for layer, the ONNX export against PyTorch, and whole images through the Python
API (intervals 2, 3, 5; branches 0, 1, 3; guidance on and off; a negative prompt; a batch of two; img2img).

Tolerance: 0.3 levels mean, 2 levels anywhere. On tiny, caching itself moves an image by only 1-2 levels mean
(:func:`test_caching_changes_the_image` shows it does here), so a looser bound would not tell a shallow step from a
full one; ONNX Runtime against PyTorch stays far below a level (test_pipeline's bound is 0.05).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from support.deepcache_reference import MAX_LEVELS, MEAN_LEVELS, diffusers_pipelines, run_deepcache, u8

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest


def _u8(images) -> np.ndarray:
    return u8(images)


def _diff(ours, theirs) -> tuple[float, int]:
    d = np.abs(u8(ours) - u8(theirs))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="module")
def cached_pipeline(tiny_deepcache_engines):
    from sdxl_trt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_deepcache_engines, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_models):
    return diffusers_pipelines(tiny_models[0])


def test_wrappers_equal_the_helper_layer_for_layer(tiny_models):
    """The full UNet's feature and the shallow UNet equal the helper's full and skip step exactly (same PyTorch
    modules, same ops) at every branch the tiny UNet has."""
    from DeepCache import DeepCacheSDHelper

    from sdxl_trt.export.deepcache import FeatureUNetWrapper, ShallowUNetWrapper

    unet = tiny_models[0].unet
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 16, 24
    steps = [(torch.randn(b, 4, h, w, generator=g), torch.randn(b, 77, 64, generator=g),
              torch.randn(b, 32, generator=g), torch.rand(b, 6, generator=g) * 1000) for _ in range(2)]
    t = [torch.tensor(999.0), torch.tensor(499.0)]
    for k in range(9):
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=t)))
        helper.set_params(cache_interval=2, cache_branch_id=k)
        helper.enable()
        with torch.no_grad():
            ref = [unet(x, ti, c, added_cond_kwargs={"text_embeds": te, "time_ids": tid}, return_dict=False)[0]
                   for (x, c, te, tid), ti in zip(steps, t, strict=True)]
        helper.disable()
        with torch.no_grad():
            (x0, c0, te0, ti0), (x1, c1, te1, ti1) = steps
            noise, feature = FeatureUNetWrapper(unet, [k])(x0, t[0].expand(b), c0, te0, ti0)
            shallow = ShallowUNetWrapper(unet, k)(x1, t[1].expand(b), c1, te1, ti1, feature)
        assert torch.equal(noise, ref[0]), k
        assert torch.equal(shallow, ref[1]), k


def test_export_verified_against_pytorch(tiny_deepcache_engines):
    """The build's ONNX check: the full UNet's features and each shallow UNet within 1e-4 of PyTorch."""
    from sdxl_trt.export.result import read_export_manifest

    export = read_export_manifest(tiny_deepcache_engines / "onnx")
    assert export is not None
    errors = {**export.components["unet"].relative_error,
              **{f"unet_shallow.{k}": max(export.components[f"unet_shallow.{k}"].relative_error.values())
                 for k in (0, 1, 3)}}
    assert set(errors) >= {"noise_pred", "deepcache_feature_0", "deepcache_feature_1", "deepcache_feature_3"}
    assert max(errors.values()) < 1e-4, errors


CASES = [  # (interval, branch, guidance, negative prompt, images, steps)
    (2, 0, 5.0, "", 1, 4),
    (3, 1, 5.0, "blurry", 1, 4),
    (5, 3, 5.0, "", 1, 6),
    (2, 1, 1.0, "", 1, 4),  # guidance off: the UNet's batch is the images alone
    (3, 0, 6.0, "low quality", 2, 4),  # a batch of two with a negative prompt
]


@pytest.mark.parametrize(("interval", "branch", "guidance", "negative", "n", "steps"), CASES)
def test_txt2img_equals_deepcache_helper(cached_pipeline, reference, interval, branch, guidance, negative, n, steps):
    req = GenerationRequest(prompt="a red fox in the snow", negative_prompt=negative, width=256, height=256,
                            steps=steps, guidance_scale=guidance, seed=7, num_images=n, cache_interval=interval,
                            cache_branch=branch)
    result = cached_pipeline.generate(req)
    assert result.steps_run == {"unet": steps, "unet_cached": steps - len(range(0, steps, interval))}
    theirs = run_deepcache(reference["txt2img"], interval=interval, branch=branch, seed=7, n=n, prompt=req.prompt,
                           negative_prompt=negative or None, width=256, height=256, num_inference_steps=steps,
                           guidance_scale=guidance)
    mean, peak = _diff(result.images, theirs)
    assert mean <= MEAN_LEVELS and peak <= MAX_LEVELS, (mean, peak)


def test_img2img_counts_from_the_first_step_run(cached_pipeline, reference):
    """img2img runs int(6 * 0.7) = 4 steps: full at the first of them and the third (the helper counts from the
    first timestep it sees)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    req = GenerationRequest(prompt="a watercolor", init_image=image, strength=0.7, steps=6, guidance_scale=5.0,
                            seed=9, cache_interval=2, cache_branch=0)
    result = cached_pipeline.generate(req)
    assert result.steps_run == {"unet": 4, "unet_cached": 2}
    theirs = run_deepcache(reference["img2img"], interval=2, branch=0, seed=9, prompt=req.prompt, image=image,
                           strength=0.7, num_inference_steps=6, guidance_scale=5.0)
    mean, peak = _diff(result.images, theirs)
    assert mean <= MEAN_LEVELS and peak <= MAX_LEVELS, (mean, peak)


def test_caching_changes_the_image(cached_pipeline):
    """Interval 1 is the uncached image bit for bit (any branch); interval 2 is another image, by more than the
    tolerance above (so the equality tests could tell a shallow step from a full one)."""
    base = dict(prompt="a lighthouse", width=256, height=256, steps=4, guidance_scale=5.0, seed=3)
    plain = cached_pipeline.generate(GenerationRequest(**base))
    one = cached_pipeline.generate(GenerationRequest(**base, cache_interval=1, cache_branch=3))
    assert plain.steps_run == one.steps_run == {"unet": 4}
    assert np.array_equal(_u8(plain.images), _u8(one.images))
    two = cached_pipeline.generate(GenerationRequest(**base, cache_interval=2, cache_branch=0))
    assert _diff(plain.images, two.images)[0] > MEAN_LEVELS


def test_interval_one_equals_plain_engines(cached_pipeline, tiny_pipeline):
    """The full UNet with feature outputs gives the plain build's image bit for bit."""
    req = GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=3, guidance_scale=5.0, seed=4)
    assert np.array_equal(_u8(cached_pipeline.generate(req).images), _u8(tiny_pipeline.generate(req).images))


def test_step_shapes_and_graph_keys(cached_pipeline):
    """Different intervals or branches split a batch; uncached requests have no branch; the shallow step has its
    own graph key per branch, the full step one for every interval."""
    base = dict(prompt="x", width=256, height=256, steps=4)
    a = cached_pipeline.admit(GenerationRequest(**base, cache_interval=2, cache_branch=0))
    b = cached_pipeline.admit(GenerationRequest(**base, cache_interval=3, cache_branch=0))
    c = cached_pipeline.admit(GenerationRequest(**base, cache_interval=2))  # default: the lowest built branch
    plain = cached_pipeline.admit(GenerationRequest(**base))
    assert a != b and a == c and plain.cache_branch is None
    assert a.graph_key("unet", 1) == b.graph_key("unet", 1) == plain.graph_key("unet", 1)
    assert a.graph_key("unet", 1, shallow=True) == b.graph_key("unet", 1, shallow=True) != a.graph_key("unet", 1)
    other = cached_pipeline.admit(GenerationRequest(**base, cache_interval=2, cache_branch=3))
    assert other.graph_key("unet", 1, shallow=True) != a.graph_key("unet", 1, shallow=True)
    assert cached_pipeline.cache_branches == (0, 1, 3)


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"cache_interval": 0}, "cache_interval", ["1..4", "0"]),
    ({"cache_interval": 5}, "cache_interval", ["1..4", "5"]),
    ({"cache_interval": 2, "cache_branch": 2}, "cache_branch", ["cache_branch 2", "0, 1, 3", "--deepcache 0,1,2,3"]),
])
def test_refusals_name_value_branches_and_rebuild(cached_pipeline, fields, param, words):
    with pytest.raises(InvalidRequestError) as e:
        cached_pipeline.admit(GenerationRequest(prompt="x", width=256, height=256, steps=4, **fields))
    assert e.value.param == param
    for w in words:
        assert w in str(e.value)
    assert cached_pipeline.generate(GenerationRequest(prompt="x", width=256, height=256, steps=2)).images


def test_engines_without_caching_refuse_it(tiny_pipeline):
    with pytest.raises(InvalidRequestError) as e:
        tiny_pipeline.admit(GenerationRequest(prompt="x", width=256, height=256, steps=4, cache_interval=2))
    assert "built without step caching" in str(e.value) and "--deepcache 0" in str(e.value)
    assert "sdxl-trt build" in str(e.value)


def test_info_lists_the_branches(tiny_deepcache_engines):
    from sdxl_trt.engine_dir.describe import format_manifest
    from sdxl_trt.engine_dir.manifest import Manifest

    text = format_manifest(Manifest.load(tiny_deepcache_engines))
    assert "step cache: branches 0, 1, 3" in text and "unet_shallow.3" in text
    assert "--deepcache 0,1,3" in text  # the build command a refusal names
