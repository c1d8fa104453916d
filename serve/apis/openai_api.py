"""OpenAI Images API shapes (``/v1/images/generations`` and ``/v1/images/edits``) as pydantic models.

Fields OpenAI defines are accepted with OpenAI's meaning; those naming a feature this engine lacks are
refused when set to anything but their default (see ``UNSUPPORTED``), never silently dropped. Our own
fields (``negative_prompt``, ``steps``, ``guidance_scale``, ``seed``, ``scheduler``, ``timestep_spacing``,
``timesteps``, ``eta``, ``loras``, ``controlnets`` for generations, and ``strength`` for edits) ride in the same body, as the ``openai`` client's ``extra_body`` sends them. Unknown fields are a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # field: the values that mean "the default", accepted; anything else is refused, naming the field
    "stream": (None, False),
    "style": (None,),
    "quality": (None, "auto", "standard"),
    "output_format": (None, "png"),
    "output_compression": (None,),
    "partial_images": (None, 0),
    "background": (None, "auto", "opaque"),
    "input_fidelity": (None,),
}


class LoraRef(BaseModel):
    """One LoRA of the server's ``--lora-dir`` by name (``GET /sdapi/v1/loras`` lists them) and its scale."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    scale: float = Field(1.0, ge=-10.0, le=10.0)


class ControlNetRef(BaseModel):
    """One ControlNet built into the engines (``GET /controlnet/model_list``) with its control image (base64
    PNG/JPEG/WEBP, or a data URL) and diffusers' settings: ``scale`` (controlnet_conditioning_scale),
    ``start``/``end`` (control_guidance_start/end), ``guess_mode``. ``preprocessor`` ``canny`` turns the image
    into edges first (OpenCV, ``low_threshold``/``high_threshold``); ``none`` takes it as the control image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    image: str
    scale: float = Field(1.0, ge=0.0, le=10.0)
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    guess_mode: bool = False
    preprocessor: str = "none"
    low_threshold: float = Field(100.0, ge=0.0, le=255.0)
    high_threshold: float = Field(200.0, ge=0.0, le=255.0)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, one of the built buckets; 'auto' or unset: the first")
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    moderation: str | None = None
    safety_identifier: str | None = None
    stream: bool | None = None
    style: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    background: str | None = None
    # ours
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, description="default 30, at most the server's --max-steps")
    guidance_scale: float = Field(5.0, ge=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    scheduler: str | None = Field(None, description="default: the model's own sampler (an LCM model's is lcm)")
    # few-step controls (see the README's "Few-step models") and LoRAs from the server's --lora-dir
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = None
    timesteps: list[int] | None = Field(None, min_length=1, max_length=1000)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    loras: list[LoraRef] | None = Field(None, max_length=8)
    # step caching (engines built with --deepcache; see the README's "Step caching"): checked by the pipeline
    cache_interval: int = 1
    cache_branch: int | None = None


class ImageGenerationRequest(_Common):
    """``POST /v1/images/generations`` (JSON); ``controlnets`` guide it with the engines' ControlNets."""

    controlnets: list[ControlNetRef] | None = Field(None, max_length=8)


class ImageEditRequest(_Common):
    """``POST /v1/images/edits`` (multipart) without its files: inpainting of ``image`` where ``mask`` says.

    The mask follows OpenAI where it has an alpha channel (transparent = repaint) and the diffusers/A1111
    convention otherwise (white = repaint); without a mask, the image's own transparent pixels are repainted.
    """

    input_fidelity: str | None = None
    strength: float = Field(1.0, gt=0.0, le=1.0)


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
