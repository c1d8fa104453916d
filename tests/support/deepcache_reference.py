"""DeepCache's own ``DeepCacheSDHelper`` on diffusers' SDXL pipelines over the tiny modules: the reference the
step-caching tests compare images with (test_deepcache, test_deepcache_serve)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MEAN_LEVELS = 0.3
"""On tiny, caching itself moves an image by 1-2 levels mean, so a looser bound would not tell shallow from full."""
MAX_LEVELS = 2


def diffusers_pipelines(base: Any) -> dict[str, Any]:
    """diffusers' SDXL txt2img and img2img pipelines over the tiny base's modules (Euler, the model's scheduler)."""
    import diffusers
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2"))
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler"))
    common = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=tok,
                  tokenizer_2=tok2, unet=base.unet, scheduler=sched)
    pipes = {"txt2img": diffusers.StableDiffusionXLPipeline(**common, force_zeros_for_empty_prompt=True,
                                                              add_watermarker=False),
             "img2img": diffusers.StableDiffusionXLImg2ImgPipeline(**common, add_watermarker=False)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def run_deepcache(pipe: Any, *, interval: int, branch: int, seed: int, n: int = 1, **kwargs: Any) -> np.ndarray:
    """diffusers with DeepCache's helper enabled (uniform mode), generators seed, seed+1, ... as ours."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(generator=[torch.Generator().manual_seed(seed + k) for k in range(n)], num_images_per_prompt=n,
                    output_type="np", **kwargs).images
    finally:
        helper.disable()


def u8(images: Any) -> np.ndarray:
    if isinstance(images, list):
        return np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
                        ).astype(np.int16)
    return (np.asarray(images) * 255).round().astype(np.int16)


def assert_close(ours: Any, theirs: Any) -> None:
    d = np.abs(u8(ours) - u8(theirs))
    assert d.mean() <= MEAN_LEVELS and d.max() <= MAX_LEVELS, f"mean {d.mean():.3f}, max {d.max()}"
