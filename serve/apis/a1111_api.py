"""AUTOMATIC1111 web UI API shapes (``/sdapi/v1/...``) as pydantic models.

Every field A1111's ``txt2img``/``img2img`` take is declared, with A1111's default, so A1111 clients (the
``webuiapi`` package among them) work unchanged. What each field does here is decided in ``a1111_routes``:
honoured, accepted at its default (or where A1111 itself ignores it), or refused with a 400 naming it when it
asks for a feature this engine lacks. Fields we do not know are accepted only when empty (None, false, 0,
"", [] or {}), the way a client sends a feature switched off.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Processing(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, lt=2**64)
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated alias of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)  # A1111's default 50, capped at the server's --max-steps
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    cache_interval: int = 1  # ours: step caching (engines built with --deepcache), txt2img and img2img
    cache_branch: int | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, gt=0.0, lt=1.0)
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Processing):
    """``POST /sdapi/v1/txt2img``. The ``hr_*``/``firstphase_*`` fields only matter with ``enable_hr``."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_additional_modules: list[str] | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None


class Img2ImgRequest(_Processing):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64, one), optional ``mask`` (white = repaint)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None  # instruct-pix2pix models only; A1111 ignores it otherwise
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """A1111's answer: base64 PNGs, the request's parameters, and ``info``, a JSON *string*."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any] = Field(default_factory=dict)


class Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModel(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class Progress(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class ErrorResponse(BaseModel):
    """A1111's error shape (its ``api_error`` handler): the error's class, the message in ``detail``."""

    error: str
    detail: str
    body: str = ""
    errors: str
