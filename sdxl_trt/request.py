"""The runtime's request and result types: what a service (or the CLI) asks a :class:`Pipeline` for.

These are plain dataclasses, free of any web library: serve/ translates each HTTP API's shape into a
:class:`GenerationRequest` at the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidRequestError
from .samplers import SPACINGS as TIMESTEP_SPACINGS

if TYPE_CHECKING:
    from PIL import Image

RefinerMode = Literal["ensemble", "img2img"]
Mode = Literal["txt2img", "img2img", "inpaint"]

MAX_CONTROL_SCALE = 10.0
"""A ControlNet scale's bound (users stay within 0..2; beyond 10 the residuals swamp the UNet)."""


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet applied to a request, as diffusers' SDXL ControlNet pipelines take it per ControlNet.

    ``name``: a ControlNet built into the engines (``sdxl-trt build --controlnet PATH:NAME``). ``image``: the
    ready control image (edges, depth, pose...), resized to the request's size as diffusers resizes it.
    ``scale``: ``controlnet_conditioning_scale``; ``start``/``end``: ``control_guidance_start``/``end``, the
    fraction of the denoising steps during which it acts; ``guess_mode``: diffusers' guess mode (the ControlNet
    sees the prompt side of the batch only, with its residuals scaled from 0.1 at the first block to 1 at the
    mid block), which A1111's "ControlNet is more important" is.
    """

    name: str
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def validate(self, index: int) -> None:
        param = f"controlnets[{index}]"
        if not isinstance(self.name, str) or not self.name:
            raise InvalidRequestError(f"{param}.name must be the name of a built ControlNet, got {self.name!r}",
                                      param=f"{param}.name")
        if self.image is None:
            raise InvalidRequestError(f"{param} ({self.name}) needs a control image", param=f"{param}.image")
        if not (hasattr(self.image, "size") and hasattr(self.image, "convert")):
            raise InvalidRequestError(f"{param}.image must be a PIL image, got {type(self.image).__name__}",
                                      param=f"{param}.image")
        if (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale)
                or not 0.0 <= self.scale <= MAX_CONTROL_SCALE):
            raise InvalidRequestError(f"{param}.scale must be a finite number in 0..{MAX_CONTROL_SCALE:g}, got "
                                      f"{self.scale!r}", param=f"{param}.scale")
        for what in ("start", "end"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise InvalidRequestError(f"{param}.{what} must be a number in [0, 1], got {v!r}",
                                          param=f"{param}.{what}")
        if self.start >= self.end:
            raise InvalidRequestError(f"{param}.start ({self.start}) must be below its end ({self.end}): the "
                                      "ControlNet acts on the steps between them", param=f"{param}.start")
        if not isinstance(self.guess_mode, bool):
            raise InvalidRequestError(f"{param}.guess_mode must be true or false, got {self.guess_mode!r}",
                                      param=f"{param}.guess_mode")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation call. Defaults follow diffusers' SDXL pipelines.

    ``width``/``height`` must be a built bucket unless ``snap_to_bucket`` is set. ``seed`` None draws a
    random seed (reported back). ``init_image`` makes it img2img (``strength``), ``mask_image`` with it
    makes it inpainting (white = repaint). ``refiner_mode``: ``ensemble`` stops the base at
    ``refiner_start`` of the schedule and lets the refiner finish; ``img2img`` re-noises the base latent
    to ``refiner_strength`` and denoises it with the refiner.

    Few-step recipes: ``timestep_spacing`` overrides the model's scheduler config (``trailing`` for
    SDXL-Lightning/Turbo); ``timesteps`` is an explicit descending schedule (DMD2: 999, 749, 499, 249), and
    ``steps`` then becomes its length; ``eta`` is TCD's gamma (default 0.3). Each applies only where
    diffusers' scheduler class takes it, and is refused elsewhere. ``guidance_scale <= 1`` turns
    classifier-free guidance off: the UNet runs on the images only and ``negative_prompt`` is ignored.

    Step caching (engines built with ``--deepcache``): ``cache_interval`` N > 1 runs the whole base UNet at
    steps 0, N, 2N, ... of the steps run and, between them, the shallow UNet of ``cache_branch`` K on the feature
    the last full step kept (DeepCache's ``DeepCacheSDHelper``, uniform mode); the refiner runs unchanged.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 5.0
    scheduler: str = "euler"
    seed: int | None = None
    num_images: int = 1
    init_image: Image.Image | None = None
    strength: float = 0.8
    mask_image: Image.Image | None = None
    refiner_mode: RefinerMode | None = None
    refiner_start: float = 0.8
    refiner_strength: float = 0.3
    refiner_steps: int | None = None  # img2img refiner: defaults to ``steps``
    original_size: tuple[int, int] | None = None  # (height, width); default: the target size
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # (height, width); default: the image size
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    snap_to_bucket: bool = False
    timestep_spacing: str | None = None  # leading | linspace | trailing; None: the model's scheduler config
    timesteps: tuple[int, ...] | None = None  # explicit, descending; sets steps to its length
    eta: float | None = None  # tcd's gamma (None: 0.3); ddim: 0 only
    loras: tuple[tuple[str, float], ...] = ()  # (name in the pipeline's lora_dirs, or a path; scale), stacked
    controlnets: tuple[ControlNetUnit, ...] = ()
    cache_interval: int = 1  # step caching (DeepCache): a full UNet step every N steps run, shallow between; 1: off
    cache_branch: int | None = None  # its branch (DeepCache's cache_branch_id); None: the engines' lowest built one
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # A list from JSON or the CLI becomes a tuple (hashable: schedules are cached and batched by it), and
        # steps follows it, so everything downstream that counts steps sees the explicit schedule's length.
        if isinstance(self.loras, list):
            object.__setattr__(self, "loras", tuple(tuple(e) if isinstance(e, list) else e for e in self.loras))
        if isinstance(self.controlnets, list):
            object.__setattr__(self, "controlnets", tuple(self.controlnets))
        if isinstance(self.timesteps, (list, tuple)):
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
            if self.timesteps:
                object.__setattr__(self, "steps", len(self.timesteps))

    @property
    def mode(self) -> Mode:
        if self.init_image is None:
            if self.mask_image is not None:
                raise InvalidRequestError("mask_image needs init_image (inpainting repaints an image)", param="mask")
            return "txt2img"
        return "inpaint" if self.mask_image is not None else "img2img"

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)

    def validate(self, *, max_images: int = 64, max_steps: int = 1000) -> None:
        """Range checks that do not need the engines (sizes are checked against the built buckets later)."""
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt must be a string", param="prompt")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= max_steps:
            raise InvalidRequestError(f"steps must be an integer in 1..{max_steps}, got {self.steps!r}", param="steps")
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= max_images:
            raise InvalidRequestError(
                f"num_images must be an integer in 1..{max_images}, got {self.num_images!r}", param="n"
            )
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale) or not (
            0.0 <= self.guidance_scale <= 100.0
        ):
            raise InvalidRequestError(
                f"guidance_scale must be a finite number in 0..100, got {self.guidance_scale!r}", param="guidance_scale"
            )
        for name in ("strength", "refiner_start", "refiner_strength"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v <= 1.0:
                raise InvalidRequestError(f"{name} must be in (0, 1], got {v!r}", param=name)
        if self.refiner_mode not in (None, "ensemble", "img2img"):
            raise InvalidRequestError(
                f"refiner_mode must be 'ensemble' or 'img2img', got {self.refiner_mode!r}", param="refiner_mode"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise InvalidRequestError(f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of: "
                                      f"{', '.join(TIMESTEP_SPACINGS)} (or leave it unset for the model's)",
                                      param="timestep_spacing")
        if self.timesteps is not None:
            ts = self.timesteps
            if (not isinstance(ts, tuple) or not ts
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts)):
                raise InvalidRequestError(f"timesteps must be a non-empty list of integers, got {ts!r}",
                                          param="timesteps")
            if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
                raise InvalidRequestError(f"timesteps must be strictly descending (e.g. 999,749,499,249), got "
                                          f"{list(ts)}", param="timesteps")
            if len(ts) > max_steps:
                raise InvalidRequestError(f"at most {max_steps} timesteps, got {len(ts)}", param="timesteps")
        if self.eta is not None and (isinstance(self.eta, bool) or not isinstance(self.eta, (int, float))
                                     or not math.isfinite(self.eta) or not 0.0 <= self.eta <= 1.0):
            raise InvalidRequestError(f"eta must be a number in [0, 1], got {self.eta!r}", param="eta")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}", param="seed")
        self.mode  # noqa: B018 - raises for a mask without an image
        steps = len(self.timesteps) if self.timesteps else self.steps
        n = self.cache_interval
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= steps:
            raise InvalidRequestError(f"cache_interval must be an integer in 1..{steps} (the request's steps; 1 = no "
                                      f"step caching), got {n!r}", param="cache_interval")
        k = self.cache_branch
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise InvalidRequestError(f"cache_branch must be a non-negative integer, got {k!r}", param="cache_branch")
        if not isinstance(self.controlnets, tuple) or not all(isinstance(u, ControlNetUnit) for u in self.controlnets):
            raise InvalidRequestError("controlnets must be a list of ControlNetUnit", param="controlnets")
        for i, unit in enumerate(self.controlnets):
            unit.validate(i)
        names = [u.name for u in self.controlnets]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"each ControlNet may be named once per request, got {names}",
                                      param="controlnets")
        if self.controlnets and self.mode == "inpaint":
            raise InvalidRequestError("ControlNet applies to txt2img and img2img; inpainting with a ControlNet is "
                                      "not supported", param="controlnets")

    @property
    def control_signature(self) -> tuple[tuple[str, bool], ...]:
        """What a ControlNet set changes in the step's shape: which engines run, each on which rows."""
        return tuple((u.name, u.guess_mode) for u in self.controlnets)


@dataclass
class GenerationResult:
    """Images (PIL, RGB) with the seed each was drawn from, per-stage seconds and the parameters used.

    ``steps_run``: denoising steps each UNet ran for this request ("unet", "refiner"), which strength and
    the refiner split make fewer than ``steps``: the denominator of a per-step time."""

    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float]
    parameters: dict[str, Any]
    steps_run: dict[str, int] = field(default_factory=dict)
