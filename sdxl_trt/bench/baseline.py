"""diffusers' SDXL pipelines on the same weights as the engines, for the baseline and the fp32 reference.

Imported only when ``--baseline`` is given: it needs export/ (``load_model`` builds a preset's seeded random
weights, or reads a local model) and diffusers. Noise follows the runtime's seed semantics: image ``k`` draws
from ``torch.Generator().manual_seed(seed + k)`` on the CPU, as the runtime does, so images are comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.samplers import sampler

log = logging.getLogger(__name__)

@contextmanager
def deepcache(pipe: Any, interval: int, branch: int) -> Iterator[None]:
    """diffusers' ``pipe`` with DeepCache's reference helper enabled (the ``DeepCache`` package, a dev extra)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise InvalidRequestError("a --baseline with --cache-interval needs the DeepCache package "
                                  "(pip install DeepCache==0.1.1, or the dev extra)", param="cache_interval") from None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


def _scheduler(config_dir: Any, name: str) -> Any:
    """diffusers' scheduler for our sampler ``name`` (its record's class and kwargs) over the model's config."""
    import diffusers

    record = sampler(name)
    cls = getattr(diffusers, record.diffusers_class)
    return cls.from_config(cls.load_config(str(config_dir / "scheduler")), **record.kwargs)


@dataclass
class DiffusersPipelines:
    """diffusers' base pipeline and (optionally) its refiner img2img pipeline, sharing the base VAE."""

    base: Any
    refiner: Any | None
    dtype: torch.dtype
    description: str

    def generate(self, *, prompt: str, bucket: Bucket, steps: int, guidance: float, seed: int, n: int,
                 refiner_mode: str | None, refiner_start: float, refiner_strength: float,
                 cache_interval: int = 1, cache_branch: int | None = None) -> np.ndarray:
        """``n`` images as uint8 [n, H, W, 3], with the same settings and noise as the runtime's request;
        ``cache_interval`` > 1: the base pipeline under DeepCache's own ``DeepCacheSDHelper`` at that interval and
        branch (the refiner runs unchanged, as the runtime's does)."""
        if cache_interval > 1:
            with deepcache(self.base, cache_interval, cache_branch or 0):
                return self.generate(prompt=prompt, bucket=bucket, steps=steps, guidance=guidance, seed=seed, n=n,
                                     refiner_mode=refiner_mode, refiner_start=refiner_start,
                                     refiner_strength=refiner_strength)
        gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
        kw: dict[str, Any] = dict(prompt=prompt, width=bucket.width, height=bucket.height, num_inference_steps=steps,
                                  guidance_scale=guidance, generator=gens, num_images_per_prompt=n)
        if refiner_mode is None:
            images = self.base(**kw, output_type="np").images
        else:
            if self.refiner is None:
                raise ValueError("a refiner row needs the baseline's refiner (--baseline-refiner)")
            if refiner_mode == "ensemble":
                latents = self.base(**kw, denoising_end=refiner_start, output_type="latent").images
                images = self.refiner(prompt=prompt, image=latents, num_inference_steps=steps, guidance_scale=guidance,
                                      generator=gens, denoising_start=refiner_start, output_type="np").images
            else:
                latents = self.base(**kw, output_type="latent").images
                images = self.refiner(prompt=prompt, image=latents, num_inference_steps=steps, guidance_scale=guidance,
                                      generator=gens, strength=refiner_strength, output_type="np").images
        return np.round(np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0) * 255).astype(np.uint8)


def load_diffusers(model: str, *, refiner: str | None, dtype: torch.dtype, device: torch.device,
                   scheduler: str) -> DiffusersPipelines:
    """``StableDiffusionXLPipeline`` (eager, SDPA attention, diffusers' defaults such as its fp32 VAE upcast)
    over the weights ``load_model`` gives for ``model``: a preset's seeded random weights are the ones the
    engines were built from."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdxl_trt.export.loading import load_model

    base = load_model(model, dtype=dtype, device=device)
    tok = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2"))
    pipe: Any = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=tok,
        tokenizer_2=tok2, unet=base.unet, scheduler=_scheduler(base.config_dir, scheduler), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ref_pipe: Any = None
    if refiner:
        r = load_model(refiner, dtype=dtype, device=device)
        ref_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.vae, text_encoder=None, text_encoder_2=r.text_encoder_2, tokenizer=None, tokenizer_2=tok2,
            unet=r.unet, scheduler=_scheduler(r.config_dir, scheduler), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
        ref_pipe.set_progress_bar_config(disable=True)
    name = str(dtype).replace("torch.", "")
    desc = (f"diffusers {diffusers.__version__} StableDiffusionXLPipeline, {name}, eager, on {device}, weights of "
            f"{model!r}" + (f" + refiner {refiner!r}" if refiner else ""))
    log.info("loaded %s", desc)
    return DiffusersPipelines(pipe, ref_pipe, dtype, desc)


def relative_error(images: np.ndarray, reference: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ over 8-bit images in [0, 1]: both sides quantised alike, so the figure is the pipelines'
    difference, not rounding."""
    a = np.asarray(images, dtype=np.float64) / 255
    b = np.asarray(reference, dtype=np.float64) / 255
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
