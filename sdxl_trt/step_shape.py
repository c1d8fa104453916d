"""What shapes a denoising step, as one value: the service's batch key, the runtime's grouping key and the
source of the CUDA-graph key.

Rules of this module (keep them):

* One definition. Two checked requests may share a batch exactly when their :class:`StepShape` values are
  equal: serve's queue batches by it, the pipeline groups images by it, and a captured step's key is derived
  from it (:meth:`StepShape.graph_key`), so the service can never form a batch the runtime then splits, nor
  split one the runtime would run as one. A new setting that splits a batch is a field here, nowhere else.
* A field is normalised to what the step really depends on (txt2img has no strength, an ensemble refiner has
  no strength of its own, an img2img refiner's steps default to the base's), so requests that differ only in
  ignored settings still batch.
* The graph key is the subset that changes what a captured step records: tensor shapes (bucket, images,
  guidance on/off, prompt chunks), which code runs (inpainting, sampler) and which engines run on which rows
  (the ControlNet signature). Everything else here (steps, strength, the refiner split, spacing, explicit
  timesteps, eta, the LoRA set) is data in fixed buffers or engine weights, so one graph serves all of it.
  Step caching (DeepCache) adds the kind of step (full, or shallow at a cache branch) to the graph key as an
  argument of :meth:`StepShape.graph_key`, and the cache interval and branch to the shape only: requests with
  different intervals run the same captured steps, in a different order. They do not share a batch: a step
  runs one kind for the whole batch (the guided batch's rows go through one engine call), and running the full
  step for a row that DeepCache would run shallow changes that row's image, so equal intervals (and branches)
  are what keeps every request's images exactly DeepCache's. A request without caching (interval 1) has no
  branch, so it batches with any other uncached request.
* Ground floor: plain data, no torch, no stage imported; made by the pipeline's admission check
  (``Pipeline.admit``), which knows the prompt's token chunks and whether the UNet takes a guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from .buckets import Bucket
from .request import GenerationRequest, Mode, RefinerMode

ControlSignature = tuple[tuple[str, bool], ...]
"""Which ControlNets run in a step, each with its guess mode (which rows it sees): ``(name, guess_mode)``."""


@dataclass(frozen=True)
class RefinerShape:
    """The refiner's part of a request, normalised: ``start`` for an ensemble (the base stops there and the
    refiner finishes the same schedule); ``strength`` and ``steps`` for img2img (it re-noises the base's
    latent and denoises it on a schedule of its own). ``guided``: the refiner has no guidance embedding, so it
    runs classifier-free guidance whenever guidance_scale > 1 (diffusers' refiner pipeline)."""

    mode: RefinerMode
    guided: bool
    start: float | None = None
    strength: float | None = None
    steps: int | None = None


@dataclass(frozen=True)
class GraphKey:
    """A captured denoising step: which UNet, at which shape, running which code and engines (see the module
    doc for why nothing else is in it)."""

    unet: str
    bucket: Bucket
    images: int
    guided: bool
    prompt_chunks: int
    inpaint: bool
    sampler: str
    controlnets: ControlSignature
    cache_branch: int | None = None  # None: a full UNet step; K: the shallow step of cache branch K (DeepCache)

    def __str__(self) -> str:
        control = "".join(f" +{n}{'(guess)' if g else ''}" for n, g in self.controlnets)
        kind = "" if self.cache_branch is None else f" shallow@{self.cache_branch}"
        return (f"{self.unet} step{kind} {self.bucket} x{self.images} {'cfg' if self.guided else 'no-cfg'} "
                f"{self.prompt_chunks} chunk(s) {self.sampler}{' inpaint' if self.inpaint else ''}{control}")


@dataclass(frozen=True)
class StepShape:
    """Everything that splits a batch of a checked request (the images in the batch excluded: that is the
    batch). ``guided``: the base UNet runs classifier-free guidance (on 2M rows); ``prompt_chunks``: 77-token
    chunks of the longer prompt; ``strength``: None for txt2img; ``refiner``: None without one; ``loras``: the
    request's LoRA set as it gives it (a set is the engines' weights: one set per batch)."""

    bucket: Bucket
    guided: bool
    prompt_chunks: int
    mode: Mode
    sampler: str
    controlnets: ControlSignature
    steps: int
    strength: float | None
    refiner: RefinerShape | None
    timestep_spacing: str | None
    timesteps: tuple[int, ...] | None
    eta: float | None
    loras: tuple[tuple[str, float], ...]
    cache_interval: int = 1  # step caching: a full step every N of the base UNet's steps (1: every step)
    cache_branch: int | None = None  # its branch; None without caching

    @classmethod
    def of(cls, request: GenerationRequest, bucket: Bucket, *, prompt_chunks: int,
           guidance_embedding: bool, cache_branch: int | None = None) -> StepShape:
        """The shape of a request that passed the pipeline's checks, in ``bucket``. ``guidance_embedding``:
        the base UNet takes guidance as an input (a guidance-distilled model), so it never runs a CFG batch.
        ``cache_branch``: the request's branch as the pipeline resolved it (its default filled in)."""
        guided = request.guidance_scale > 1.0
        refiner = None
        if request.refiner_mode == "ensemble":
            refiner = RefinerShape("ensemble", guided, start=float(request.refiner_start))
        elif request.refiner_mode == "img2img":
            refiner = RefinerShape("img2img", guided, strength=float(request.refiner_strength),
                                   steps=request.refiner_steps or request.steps)
        mode = request.mode
        return cls(
            bucket=bucket, guided=guided and not guidance_embedding, prompt_chunks=prompt_chunks, mode=mode,
            sampler=request.scheduler, controlnets=request.control_signature, steps=request.steps,
            strength=None if mode == "txt2img" else float(request.strength), refiner=refiner,
            timestep_spacing=request.timestep_spacing, timesteps=request.timesteps, eta=request.eta,
            loras=request.loras, cache_interval=request.cache_interval,
            cache_branch=cache_branch if request.cache_interval > 1 else None,
        )

    @property
    def inpaint(self) -> bool:
        return self.mode == "inpaint"

    def graph_key(self, unet: str, images: int, *, shallow: bool = False) -> GraphKey:
        """The captured step of ``unet`` ("unet" or "refiner") for a batch of ``images`` of this shape. The
        refiner takes neither ControlNets nor the inpainting blend, and guides by its own rule. ``shallow``: the
        base UNet's shallow step at this shape's cache branch (step caching)."""
        if unet == "refiner":
            if self.refiner is None:
                raise ValueError(f"{self} has no refiner step")
            return GraphKey(unet, self.bucket, images, self.refiner.guided, self.prompt_chunks, False, self.sampler,
                            ())
        if shallow and (unet != "unet" or self.cache_branch is None):
            raise ValueError(f"{self} has no shallow step for {unet}")
        return GraphKey(unet, self.bucket, images, self.guided, self.prompt_chunks, self.inpaint, self.sampler,
                        self.controlnets, self.cache_branch if shallow else None)
