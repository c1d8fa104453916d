"""Requests -> what the denoiser needs: checking a request's inputs against the engines, then turning it into
one ``Slot`` per image (its generator and its conditioning: prompt embeddings, pooled embeddings,
micro-conditioning, per UNet).

What a request can be refused for here (ranges, engines it needs, prompt length) is refused in
:meth:`Conditioner.check_inputs`, before any engine runs; ``Pipeline.admit`` adds the sampler, LoRA and
ControlNet checks, so a service can call it before queueing (a bad request never waits or joins a batch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdxl_trt.buckets import Bucket, nearest_bucket
from sdxl_trt.contracts import TOKENS_PER_CHUNK
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest
from sdxl_trt.step_shape import StepShape

from .context import EngineContext
from .slots import Slot
from .text import PromptTokenizer, check_chunks, chunks_needed

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 65_536
"""A prompt longer than this is refused before tokenizing: tokenizing megabytes takes seconds of a
worker's time, and no engine takes more than a few hundred tokens (services cap lower at their edge)."""


def resolve_bucket(request: GenerationRequest, buckets: list[Bucket]) -> Bucket:
    """The request's size as a built bucket, or an error listing the buckets."""
    width, height = request.width, request.height
    if width is None and height is None and request.init_image is not None:
        width, height = request.init_image.size
    if width is None or height is None:
        if width is None and height is None:
            return buckets[0]
        raise InvalidRequestError("give both width and height, or neither", param="size")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)) or width <= 0 or height <= 0:
        raise InvalidRequestError(f"width and height must be positive integers, got {width!r}x{height!r}",
                                  param="size")
    b = Bucket(width, height)
    if b in buckets:
        return b
    if request.snap_to_bucket:
        return nearest_bucket(width, height, buckets)
    raise InvalidRequestError(
        f"size {width}x{height} is not a built bucket; built: {', '.join(map(str, buckets))} "
        "(rebuild with --buckets to add it, or set snap_to_bucket to use the nearest)",
        param="size",
    )


class Conditioner:
    """Checks requests and encodes their prompts with the two text-encoder engines."""

    def __init__(self, ctx: EngineContext, directory: Path) -> None:
        self.ctx = ctx
        self.tokenizers = (PromptTokenizer(directory / "tokenizer"), PromptTokenizer(directory / "tokenizer_2"))
        self.force_zeros_for_empty_prompt = bool(ctx.manifest.pipeline.get("force_zeros_for_empty_prompt", True))
        self.has_refiner = "refiner" in ctx.engines
        # A guidance-distilled UNet takes the guidance-scale embedding (timestep_cond) and never a CFG batch.
        self.time_cond_dim = ctx.dims.unet_time_cond_dim

    # ------------------------------------------------------------------ checking
    def check_inputs(self, req: GenerationRequest, *, max_images: int, max_steps: int,
                     schedulers: tuple[str, ...]) -> tuple[Bucket, int]:
        """The request's values against their ranges and these engines (a refiner, a VAE encoder, the prompt's
        length in tokens), as diffusers' ``check_inputs``; returns its bucket and its prompt chunks."""
        req.validate(max_steps=max_steps, max_images=max_images)
        if req.scheduler not in schedulers:
            raise InvalidRequestError(
                f"unknown scheduler {req.scheduler!r}; choose one of {', '.join(schedulers)}", param="scheduler")
        if req.refiner_mode is not None and not self.has_refiner:
            raise InvalidRequestError(f"refiner_mode {req.refiner_mode!r} needs a refiner engine, and these engines "
                                      "were built without one (build with --refiner)", param="refiner_mode")
        if req.mode != "txt2img" and "vae_encoder" not in self.ctx.engines:
            raise InvalidRequestError("img2img and inpainting need the vae_encoder engine; rebuild the engines",
                                      param="init_image")
        if req.refiner_mode == "img2img" and (req.refiner_steps or req.steps) > max_steps:
            raise InvalidRequestError(f"refiner_steps must be at most {max_steps}", param="refiner_steps")
        if req.seed is not None and req.seed + req.num_images > 2**64:
            raise InvalidRequestError(f"seed + number of images must stay below 2**64, got seed {req.seed}",
                                      param="seed")
        chunks = self.prompt_chunks(req)
        return resolve_bucket(req, self.ctx.buckets), chunks

    def prompt_chunks(self, req: GenerationRequest) -> int:
        """The 77-token chunks the request's prompts need (refused above the engines' --max-prompt-chunks)."""
        for param in ("prompt", "negative_prompt"):
            text = getattr(req, param)
            if not isinstance(text, str):
                raise InvalidRequestError(f"{param} must be a string", param=param)
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequestError(f"{param} is {len(text)} characters; at most {MAX_PROMPT_CHARS} are "
                                          "accepted (the engines take a few hundred tokens)", param=param)
        tok1, tok2 = self.tokenizers
        pos1, neg1 = tok1.content_ids(req.prompt), tok1.content_ids(req.negative_prompt)
        pos2, neg2 = tok2.content_ids(req.prompt), tok2.content_ids(req.negative_prompt)
        n = chunks_needed(pos1, neg1, pos2, neg2)
        longer_is_negative = max(len(neg1), len(neg2)) > max(len(pos1), len(pos2))
        check_chunks(n, self.ctx.max_chunks, req.negative_prompt if longer_is_negative else req.prompt,
                     param="negative_prompt" if longer_is_negative else "prompt")
        return n

    # ------------------------------------------------------------------ encoding
    def _encode(self, name: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One text encoder over ``ids`` rows; in a CUDA graph per (encoder, rows) where the engine allows."""
        dims = {"B": ids.shape[0]}
        bound = self.ctx.bind(name, dims)
        bound.inputs["input_ids"].copy_(ids)
        self.ctx.run(bound, graph_key=("text", name, ids.shape[0]))
        return {k: v.clone() for k, v in bound.outputs.items()}

    def encode(self, ri: int, req: GenerationRequest, shape: StepShape) -> list[Slot]:
        """The conditioning of an admitted request (``shape``: its step shape), shared by its images, and one
        generator per image (seed + k)."""
        ctx, device = self.ctx, self.ctx.device
        tok1, tok2 = self.tokenizers
        n = shape.prompt_chunks
        pos1, neg1 = tok1.content_ids(req.prompt), tok1.content_ids(req.negative_prompt)
        pos2, neg2 = tok2.content_ids(req.prompt), tok2.content_ids(req.negative_prompt)
        cfg = shape.guided
        if not cfg and req.negative_prompt:
            log.info("guidance_scale %s%s: classifier-free guidance is off, so the negative prompt is ignored "
                     "(as in diffusers)", req.guidance_scale,
                     " with a guidance-embedding UNet" if self.time_cond_dim else "")
        zero_neg = req.negative_prompt == "" and self.force_zeros_for_empty_prompt
        rows1 = [tok1.chunk(pos1, n)] + ([tok1.chunk(neg1, n)] if cfg and not zero_neg else [])
        rows2 = [tok2.chunk(pos2, n)] + ([tok2.chunk(neg2, n)] if cfg or req.refiner_mode else [])
        h1 = self._encode("text_encoder", torch.cat(rows1).to(device))["hidden_states"]
        out2 = self._encode("text_encoder_2", torch.cat(rows2).to(device))
        h2, pooled = out2["hidden_states"], out2["text_embeds"]

        def seq(h: torch.Tensor, k: int) -> torch.Tensor:  # chunk rows k*n..(k+1)*n -> [1, n*77, d]
            return h[k * n : (k + 1) * n].reshape(1, n * TOKENS_PER_CHUNK, h.shape[-1])

        dt = ctx.dtypes["unet"]
        cond: dict[str, torch.Tensor] = {
            "unet.pos.embeds": torch.cat([seq(h1, 0), seq(h2, 0)], dim=-1).to(dt),
            "unet.pos.pooled": pooled[0:1].to(dt),
        }
        if cfg:
            if zero_neg:
                cond["unet.neg.embeds"] = torch.zeros_like(cond["unet.pos.embeds"])
                cond["unet.neg.pooled"] = torch.zeros_like(cond["unet.pos.pooled"])
            else:
                cond["unet.neg.embeds"] = torch.cat([seq(h1, 1), seq(h2, 1)], dim=-1).to(dt)
                cond["unet.neg.pooled"] = pooled[n : n + 1].to(dt)
        h, w = shape.bucket.height, shape.bucket.width
        orig = req.original_size or (h, w)
        target = req.target_size or (h, w)
        crop = req.crop_top_left
        cond["unet.pos.time_ids"] = torch.tensor([[*orig, *crop, *target]], dtype=dt, device=device)
        if self.time_cond_dim:
            w = torch.tensor([float(req.guidance_scale) - 1.0])
            cond["unet.pos.timestep_cond"] = guidance_scale_embedding(w, self.time_cond_dim).to(device=device, dtype=dt)
        cond["unet.neg.time_ids"] = cond["unet.pos.time_ids"]
        if req.refiner_mode:
            rdt = ctx.dtypes["refiner"]
            # The refiner's model_index has force_zeros_for_empty_prompt False: an empty negative is encoded.
            cond["refiner.pos.embeds"] = seq(h2, 0).to(rdt)
            cond["refiner.pos.pooled"] = pooled[0:1].to(rdt)
            cond["refiner.neg.embeds"] = seq(h2, 1).to(rdt)
            cond["refiner.neg.pooled"] = pooled[n : n + 1].to(rdt)
            cond["refiner.pos.time_ids"] = torch.tensor([[*orig, *crop, req.aesthetic_score]], dtype=rdt,
                                                        device=device)
            cond["refiner.neg.time_ids"] = torch.tensor([[*orig, *crop, req.negative_aesthetic_score]], dtype=rdt,
                                                        device=device)
        assert req.seed is not None  # the pipeline resolves a random seed before encoding
        return [Slot(req, ri, k, req.seed + k, torch.Generator().manual_seed(req.seed + k), cond=cond)
                for k in range(req.num_images)]


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """diffusers' ``get_guidance_scale_embedding`` (float32): the sinusoidal embedding of ``w * 1000`` that a
    guidance-distilled UNet takes as ``timestep_cond``, [len(w), embedding_dim]."""
    w = w * 1000.0
    half = embedding_dim // 2
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    emb = w.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
