"""INT8 calibration data: the SDXL UNet's real inputs, recorded while diffusers' pipeline denoises real prompts.

Random inputs would calibrate the wrong ranges: the latent's scale changes by two orders of magnitude over the
schedule and the text context is far from normal. So :func:`run_calibration_prompts` runs diffusers'
``StableDiffusionXLPipeline`` (built from the loaded model's own modules; nothing fetched) over the prompts and
tells a callback which UNet calls to look at (evenly spaced over the schedule, a different phase per prompt), and
:func:`collect_calibration_inputs` uses it to record those calls' inputs under the contract's input names (for the
ONNX Runtime calibrator and the held-out error measurement). This module knows nothing of ONNX or quantization.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdxl_trt.errors import BuildError

if TYPE_CHECKING:
    import torch

    from sdxl_trt.export.loading import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_PROMPTS_FILE = Path(__file__).parents[1] / "data" / "calibration_prompts.txt"
"""Shipped calibration prompts: varied subjects, styles and lengths, one per line."""

UNET_INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
"""The UNet contract's input names (``component_specs(dims)["unet"].input_names``); checked at import below."""


def read_prompts(path: Path | str | None = None) -> list[str]:
    """Non-empty, stripped lines of a prompts file (the shipped one by default); ``#`` lines are comments."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS_FILE
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BuildError(f"calibration prompts file {p} does not exist; pass an existing text file, one prompt a line") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BuildError(f"calibration prompts file {p} has no prompts; write one prompt per line")
    return prompts


def picked_steps(prompt_index: int, steps: int, per_prompt: int) -> set[int]:
    """``per_prompt`` evenly spaced step indices of ``steps``, with a phase that differs per prompt.

    The golden-ratio phase shifts each prompt's picks, so together the prompts cover the whole schedule instead of
    every prompt landing on the same few timesteps."""
    if per_prompt >= steps:
        return set(range(steps))
    phase = (prompt_index * 0.6180339887498949) % 1.0
    return {min(steps - 1, int((j + phase) * steps / per_prompt)) for j in range(per_prompt)}


def _build_pipeline(model: LoadedModel, *, without_text_encoders: bool = False) -> Any:
    """diffusers' SDXL pipeline over the loaded modules, tokenizers and scheduler config from ``model.config_dir``
    (``without_text_encoders``: for prompts given as :func:`encode_prompts` embeddings)."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    if model.kind != "base" or (model.text_encoder is None and not without_text_encoders):
        raise BuildError(
            f"INT8 calibration needs an SDXL base model with both text encoders; {model.name!r} is a {model.kind} "
            "model (calibrate the refiner UNet with an img2img pipeline, not supported yet)"
        )
    cfg_dir = Path(model.config_dir)
    sched_cfg_path = cfg_dir / "scheduler" / "scheduler_config.json"
    try:
        sched_cfg = json.loads(sched_cfg_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise BuildError(f"cannot read the scheduler config {sched_cfg_path}: {e}; the model directory is incomplete") from e
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name", "EulerDiscreteScheduler")), None)
    if sched_cls is None:
        raise BuildError(f"{sched_cfg_path} names scheduler {sched_cfg.get('_class_name')!r}, which diffusers does not have")
    tokenizers = []
    for sub in ("tokenizer", "tokenizer_2"):
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(str(cfg_dir / sub), local_files_only=True))
        except Exception as e:  # noqa: BLE001 - transformers raises many types; name the folder
            raise BuildError(f"cannot load the CLIP tokenizer from {cfg_dir / sub}: {e}") from e
    pipe: Any = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=None if without_text_encoders else model.text_encoder,
        text_encoder_2=None if without_text_encoders else model.text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=model.unet,
        scheduler=sched_cls.from_config(sched_cfg),
        force_zeros_for_empty_prompt=bool(model.options.get("force_zeros_for_empty_prompt", True)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu").float().numpy().copy()


def _unet_call_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The contract's five inputs from one ``UNet2DConditionModel.forward`` call (positional or keyword)."""
    import torch

    names = ("sample", "timestep", "encoder_hidden_states")
    got = {n: (args[i] if i < len(args) else kwargs.get(n)) for i, n in enumerate(names)}
    added = kwargs.get("added_cond_kwargs") or {}
    got["text_embeds"] = added.get("text_embeds")
    got["time_ids"] = added.get("time_ids")
    missing = [n for n, v in got.items() if v is None]
    if missing:
        raise BuildError(f"the UNet was called without {missing}; is this an SDXL (text_time-conditioned) pipeline?")
    batch = int(got["sample"].shape[0])  # type: ignore[union-attr]
    t = torch.as_tensor(got["timestep"]).reshape(-1)
    if t.numel() not in (1, batch):
        raise BuildError(f"UNet timestep has {t.numel()} values for batch {batch}; expected 1 or {batch}")
    out = {n: _as_numpy(got[n]) for n in ("sample", "encoder_hidden_states", "text_embeds", "time_ids")}
    out["timestep"] = np.broadcast_to(_as_numpy(t).astype(np.float32), (batch,)).copy()
    return {n: out[n] for n in UNET_INPUT_NAMES}


class Progress:
    """A progress line with an ETA through ``logging``: at most one line every ``every_s`` seconds, and the last.

    Counted in UNet calls (prompts x steps actually run), the unit whose cost is the same all along."""

    def __init__(self, what: str, total: int, *, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, max(1, total), every_s
        self.done, self.t0, self._last = 0, time.perf_counter(), float("-inf")

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if self.done < self.total and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        width = 20
        bar = "#" * round(width * self.done / self.total)
        log.info("%s [%-*s] %d/%d UNet calls, %s elapsed, ETA %s%s", self.what, width, bar, self.done, self.total,
                 _duration(elapsed), _duration(eta), f" ({note})" if note else "")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def encode_prompts(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Each prompt's embeddings as diffusers' pipeline computes them (both encoders; the negative ones for guidance).

    Calibration encodes every prompt first, so the text encoders (3.5 GB of fp32 weights at full size) can be let
    go before the UNet runs; :func:`run_calibration_prompts` given these gives the same UNet inputs as given the
    prompts."""
    import torch

    pipe = _build_pipeline(model)
    device = next(model.unet.parameters()).device
    out = []
    with torch.inference_mode():
        for p in prompts:
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt=p, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=guidance_scale > 1.0,
                                                    negative_prompt=negative_prompt)
            out.append({"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                        "negative_pooled_prompt_embeds": nppe})
    return out


def check_calibration_args(model: LoadedModel, prompts: Sequence[str], *, steps: int, width: int, height: int,
                           max_samples: int) -> list[str]:
    """The non-empty prompts, after checking steps, sample count and size against the UNet (errors name the fix)."""
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise BuildError("no calibration prompts given; pass at least one non-empty prompt")
    if steps < 1:
        raise BuildError(f"calibration steps must be at least 1, got {steps}")
    if max_samples < 1:
        raise BuildError(f"max_samples must be at least 1, got {max_samples}")
    multiple = 8 * 2 ** (len(model.unet.config.block_out_channels) - 1)  # VAE factor x UNet downsamplings
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise BuildError(
            f"calibration size {width}x{height} must be positive multiples of {multiple} for this UNet; use e.g. 1024x1024"
        )
    if len(prompts) > max_samples:
        log.info("using the first %d of %d prompts (one sample each fills max_samples)", max_samples, len(prompts))
        prompts = prompts[:max_samples]
    return prompts


UNetCallback = Callable[[bool, tuple[Any, ...], dict[str, Any]], None]
"""Called before every UNet forward with (picked, args, kwargs): ``picked`` says whether this call is a sample."""


@dataclass(frozen=True)
class Sampling:
    """How calibration denoises its prompts and how many UNet calls it samples: what every collector shares."""

    steps: int
    width: int
    height: int
    max_samples: int
    guidance_scale: float = 5.0
    seed: int = 0
    negative_prompt: str | None = None


def run_calibration_prompts(
    model: LoadedModel,
    prompts: Sequence[str],
    on_unet_call: UNetCallback,
    sampling: Sampling,
    *,
    what: str = "calibration",
    embeddings: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Denoise ``prompts`` with diffusers' SDXL pipeline and tell ``on_unet_call`` about every UNet call.

    One pipeline call per prompt (batch 1, so each UNet call is B = 2 with classifier-free guidance, the shape
    served most). ``max_samples`` calls are picked, evenly spaced over the schedule, each prompt at a different
    phase, so together they span it; a prompt stops after its last picked step (later steps cannot change the
    picked calls' inputs). Latents are not decoded (``output_type="latent"``): the VAE plays no part in UNet
    calibration. Progress with an ETA goes to the log. ``embeddings`` (:func:`encode_prompts` of the same
    prompts) replace the text encoders, which may then be gone. Returns the number of picked calls that ran."""
    import torch

    steps, width, height, max_samples = sampling.steps, sampling.width, sampling.height, sampling.max_samples
    guidance_scale, seed, negative_prompt = sampling.guidance_scale, sampling.seed, sampling.negative_prompt
    if embeddings is not None and len(embeddings) != len(prompts):
        raise BuildError(f"{len(embeddings)} prompt embeddings for {len(prompts)} prompts; encode the same prompts")
    prompts = check_calibration_args(model, prompts, steps=steps, width=width, height=height, max_samples=max_samples)
    base, extra = divmod(max_samples, len(prompts))  # the first `extra` prompts give one sample more
    pipe = _build_pipeline(model, without_text_encoders=embeddings is not None)
    device = next(model.unet.parameters()).device
    step, keep, picked = 0, set[int](), 0

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal step, picked
        chosen = step in keep
        picked += chosen
        on_unet_call(chosen, args, kwargs)
        step += 1

    def stop_after_last_pick(p: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        progress.advance(1, f"prompt {prompt_index + 1}/{len(prompts)}")
        if i >= last and i + 1 < steps:
            p._interrupt = True  # diffusers' documented way to end the denoising loop early
        return callback_kwargs

    picks = [picked_steps(i, steps, max(1, base + (i < extra))) for i in range(len(prompts))]
    progress = Progress(what, sum(max(k) + 1 for k in picks))  # the UNet calls that will run: an exact ETA
    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for prompt_index, prompt in enumerate(prompts):
            step, keep = 0, picks[prompt_index]
            last = max(keep)
            generator = torch.Generator(device=device).manual_seed(seed + prompt_index)
            text: dict[str, Any] = (
                {"prompt": prompt, "negative_prompt": negative_prompt} if embeddings is None
                else dict(embeddings[prompt_index])
            )
            with torch.inference_mode():
                pipe(
                    **text,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    guidance_scale=guidance_scale,
                    generator=generator,
                    output_type="latent",
                    callback_on_step_end=stop_after_last_pick,
                )
            if step != last + 1:
                log.warning("prompt %d: the UNet ran %d times for %d steps (expected %d)", prompt_index, step, steps,
                            last + 1)
    finally:
        handle.remove()
    if not picked:
        raise BuildError(
            f"no UNet calls were picked for {len(prompts)} prompts x {steps} steps; "
            f"guidance_scale {guidance_scale} and the pipeline must call model.unet"
        )
    return picked


def collect_calibration_inputs(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    steps: int,
    width: int,
    height: int,
    guidance_scale: float = 5.0,
    seed: int = 0,
    max_samples: int,
    negative_prompt: str | None = None,
    what: str = "recording UNet inputs",
    embeddings: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Record the UNet's actual inputs at the picked calls of :func:`run_calibration_prompts`.

    Each record holds (sample, timestep, encoder_hidden_states, text_embeds, time_ids) under the contract's names,
    on the host; the timestep is broadcast to shape [B] float32 as in the contract. Memory grows with
    ``max_samples`` (one UNet input per sample, a few MB at 1024x1024): fine for held-out error inputs and the
    ONNX Runtime calibrator, which is why the range-based calibration does not use this."""
    records: list[dict[str, np.ndarray]] = []

    def record(picked: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if picked:
            records.append(_unet_call_inputs(args, kwargs))

    sampling = Sampling(steps, width, height, max_samples, guidance_scale, seed, negative_prompt)
    run_calibration_prompts(model, prompts, record, sampling, what=what, embeddings=embeddings)
    return records[:max_samples]


def check_samples(samples: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str], what: str) -> None:
    if not samples:
        raise BuildError(f"{what} is empty; collect inputs with collect_calibration_inputs first")
    for i, s in enumerate(samples):
        missing = [n for n in input_names if n not in s]
        if missing:
            raise BuildError(f"{what}[{i}] lacks input(s) {missing}; the model's inputs are {list(input_names)}")


def _check_contract_names() -> None:
    from sdxl_trt.contracts import ModelDims, component_specs

    names = tuple(component_specs(ModelDims())["unet"].input_names)
    if names != UNET_INPUT_NAMES:  # pragma: no cover - a contract change must update this module
        raise ImportError(f"engine/int8/calibration.py records UNet inputs {UNET_INPUT_NAMES}, the contract now says {names}")


_check_contract_names()
