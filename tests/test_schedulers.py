"""The device-table schedulers against diffusers' own schedulers, through the loops the SDXL pipelines run.

The reference side uses diffusers' real scheduler classes (from SDXL's config plus the kwargs a user passes
to pick the sampler), diffusers' own get_timesteps (img2img/inpaint/refiner) and randn_tensor. Our side runs
the capturable loop: the step index is a device tensor incremented in place, and any host read of a tensor
(.item(), bool(), int(), ...) raises while the loop runs.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from sdxl_trt.errors import InvalidRequestError, ModelLoadError
from sdxl_trt.presets import SCHEDULER_CONFIG
from sdxl_trt.runtime.schedulers import make_schedule
from sdxl_trt.samplers import (
    CUSTOM_TIMESTEPS,
    DIFFUSERS_DEFAULTS,
    OWN_TIMESTEPS,
    SAMPLERS,
    SCHEDULERS,
    sampler,
    scheduler_for_config,
)

# name -> (diffusers class, from_config kwargs that select the same sampler): each record's, so every test
# here that compares with diffusers checks the registry too.
DIFFUSERS: dict[str, tuple[type, dict[str, Any]]] = {s.name: (getattr(diffusers, s.diffusers_class), s.kwargs)
                                                     for s in SAMPLERS}
# The eta each sampler runs at by default (diffusers' SDXL pipelines pass eta=0.0 to step(); TCD's
# recommended and our default gamma is 0.3, which a diffusers user passes as the pipeline's eta).
DEFAULT_ETA: dict[str, float] = {s.name: s.eta.default for s in SAMPLERS if s.eta is not None}

SHAPE = (2, 4, 8, 8)  # two images, each with its own generator
SEEDS = (1234, 99)

# Tolerance, relative to the sample's scale (max |x|). Both sides step in float32, but the tables hold
# coefficients computed in float64 from the same float32 sigmas and rounded once, while diffusers evaluates
# its formulas in float32 operation by operation, with cancellations (x - sigma * eps at sigma 14.6, or
# 4096 with zero terminal SNR; lambda_t - lambda_s; DPM++ 3M's third-order terms). Measured against a
# float64 run of the same tables: ours (float32) stays within 2e-6 of the scale, diffusers' within 1.5e-5
# (worst: Euler v-prediction zero-SNR, DPM++ 3M SDE Karras; see test_float32_tables_track_float64).
# An off-by-one timestep, a wrong order switch or a misplaced noise draw moves results by 1e-2 or more.
REL_TOL = 2e-5
OWN_FLOAT64_TOL = 3e-6

CASES: dict[str, dict[str, Any]] = {
    "txt2img-1": {"steps": 1},
    "txt2img-4": {"steps": 4},
    "txt2img-20": {"steps": 20},
    "txt2img-30": {"steps": 30},
    "base-end0.8": {"steps": 30, "denoising_end": 0.8},
    "base-end0.8-4": {"steps": 4, "denoising_end": 0.8},
    "img2img-0.3": {"steps": 30, "mode": "img2img", "strength": 0.3},
    "img2img-0.75": {"steps": 20, "mode": "img2img", "strength": 0.75},
    "refiner-start0.8": {"steps": 30, "mode": "img2img", "denoising_start": 0.8},
    "refiner-start0.7-5": {"steps": 5, "mode": "img2img", "denoising_start": 0.7},
    "img2img-start0.3-end0.7": {"steps": 25, "mode": "img2img", "denoising_start": 0.3, "denoising_end": 0.7},
    "inpaint-0.6": {"steps": 20, "mode": "inpaint", "strength": 0.6},
    "inpaint-1.0": {"steps": 10, "mode": "inpaint", "strength": 1.0},
    "v-trailing": {"steps": 20, "config": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}},
    "v-zsnr-trailing": {"steps": 20, "config": {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                                "rescale_betas_zero_snr": True}},
    "v-zsnr-img2img": {"steps": 20, "mode": "img2img", "strength": 0.5,
                       "config": {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                  "rescale_betas_zero_snr": True}},
    "linspace": {"steps": 15, "config": {"timestep_spacing": "linspace", "steps_offset": 0}},
    "one-generator": {"steps": 12, "seeds": (7,)},
    # few-step recipes
    "trailing-2": {"steps": 2, "spacing": "trailing"},
    "trailing-4-img2img": {"steps": 4, "mode": "img2img", "strength": 0.5, "spacing": "trailing"},
    "linspace-8": {"steps": 8, "spacing": "linspace"},
    "timesteps-dmd2": {"steps": 4, "timesteps": (999, 749, 499, 249)},
    "timesteps-one": {"steps": 1, "timesteps": (399,)},
    "timesteps-img2img": {"steps": 4, "mode": "img2img", "strength": 0.5, "timesteps": (999, 749, 499, 249)},
    "timesteps-base-end": {"steps": 5, "timesteps": (999, 800, 500, 200, 50), "denoising_end": 0.6},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op worker threads only add wake-up latency, and on a loaded 2-core
    machine their spinning makes each small op cost milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the guided UNet, depending on both the sample and the timestep. Its
    linear part roughly tracks the noise level, so that samples stay O(1) as with a real denoiser."""
    level = t.float() / 1000
    return level.sqrt() * x + 0.2 * torch.sin(3 * x) + level * torch.cos(x)


def _image() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))


def _mask() -> torch.Tensor:
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[..., 2:6, 1:5] = 1.0
    return mask


def _generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_diffusers(name: str, steps: int, *, mode: str = "txt2img", strength: float = 1.0,
                  denoising_start: float | None = None, denoising_end: float | None = None,
                  config: dict[str, Any] | None = None, seeds: tuple[int, ...] = SEEDS,
                  spacing: str | None = None, timesteps: tuple[int, ...] | None = None, eta: float | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' SDXL denoising loop (txt2img, img2img or inpaint) with `fake_unet`; `spacing` is passed
    the way a diffusers user does (from_config(..., timestep_spacing=)), `timesteps` to set_timesteps, `eta`
    as the pipeline's eta."""
    cls, kwargs = DIFFUSERS[name]
    if spacing is not None:
        kwargs = {**kwargs, "timestep_spacing": spacing}
    sched = cls.from_config({**SCHEDULER_CONFIG, **(config or {})}, **kwargs)
    gens = _generators(seeds)
    pipe = types.SimpleNamespace(scheduler=sched)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps), device="cpu")
    else:
        sched.set_timesteps(steps, device="cpu")
    n_train = sched.config.num_train_timesteps
    if mode == "txt2img":
        timesteps = sched.timesteps
        latents = randn_tensor(SHAPE, generator=gens) * sched.init_noise_sigma
    else:
        timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu",
                                                                      denoising_start=denoising_start)
        latent_timestep = timesteps[:1].repeat(SHAPE[0])
        if mode == "img2img":
            latents = _image() if denoising_start is not None else \
                sched.add_noise(_image(), randn_tensor(SHAPE, generator=gens), latent_timestep)
        else:  # inpaint, prepare_latents with add_noise
            noise = randn_tensor(SHAPE, generator=gens)
            latents = noise * sched.init_noise_sigma if strength == 1.0 else \
                sched.add_noise(_image(), noise, latent_timestep)
    if denoising_end is not None:
        cutoff = int(round(n_train - denoising_end * n_train))
        timesteps = timesteps[:len(list(filter(lambda ts: ts >= cutoff, timesteps)))]
    if mode == "txt2img" and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    extra = StableDiffusionXLPipeline.prepare_extra_step_kwargs(pipe, gens, DEFAULT_ETA.get(name, 0.0) if eta is None
                                                                else eta)
    for i, t in enumerate(timesteps):
        model_input = sched.scale_model_input(latents, t)
        latents = sched.step(fake_unet(model_input, t), t, latents, **extra, return_dict=False)[0]
        if mode == "inpaint":
            proper = _image()
            if i < len(timesteps) - 1:
                proper = sched.add_noise(proper, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - _mask()) * proper + _mask() * latents
    return timesteps, latents


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every host read of a tensor's value raise, as it would break (or sync) a CUDA graph capture."""
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync inside the denoising loop")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
            m.setattr(torch.Tensor, attr, forbidden)
        yield


def run_ours(name: str, steps: int, monkeypatch: pytest.MonkeyPatch, *, mode: str = "txt2img",
             strength: float = 1.0, denoising_start: float | None = None, denoising_end: float | None = None,
             config: dict[str, Any] | None = None, seeds: tuple[int, ...] = SEEDS,
             spacing: str | None = None, timesteps: tuple[int, ...] | None = None, eta: float | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The capturable loop: device step index incremented in place, no host reads, state updated in place."""
    s = make_schedule(name, steps, config={**SCHEDULER_CONFIG, **(config or {})}, strength=strength,
                      denoising_start=denoising_start, denoising_end=denoising_end, timestep_spacing=spacing,
                      timesteps=timesteps, eta=eta, dtype=dtype)
    gens = _generators(seeds)
    noise = None
    if mode == "txt2img" or (mode == "inpaint" and strength == 1.0):
        noise = randn_tensor(SHAPE, generator=gens)
        latents = noise * s.init_noise_sigma
    elif mode == "img2img" and denoising_start is not None:
        latents = _image()
    else:
        noise = randn_tensor(SHAPE, generator=gens)
        latents = s.add_noise(_image(), noise, torch.zeros((), dtype=torch.int64))
    step_noise = s.draw_step_noise(SHAPE, gens, torch.float32).to(dtype)
    assert step_noise.shape[0] == (s.num_steps if s.needs_noise else 0)
    latents = latents.to(dtype)
    state = s.make_state(latents)
    pointers = {k: v.data_ptr() for k, v in state.items()}
    image, mask = _image().to(dtype), _mask().to(dtype)
    noise = None if noise is None else noise.to(dtype)
    idx = torch.zeros((), dtype=torch.int64)
    with no_host_sync(monkeypatch):
        for _ in range(s.num_steps):
            model_input = s.scale_model_input(latents, idx)
            latents = s.step(fake_unet(model_input, s.timestep(idx)), latents, idx, state, step_noise)
            if mode == "inpaint":
                latents = (1 - mask) * s.add_noise(image, noise, idx + 1) + mask * latents
            idx += 1
    assert {k: v.data_ptr() for k, v in state.items()} == pointers, "state buffers were replaced, not updated"
    return s.timesteps, latents


def test_the_common_samplers_are_provided() -> None:
    assert {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"} <= set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_records_kwargs_are_what_diffusers_constructs(name: str) -> None:
    """Each record's kwargs are constructor settings of its class that diffusers keeps (none silently
    ignored), so the class and kwargs the other tests build from the record are the sampler it names."""
    cls, kwargs = DIFFUSERS[name]
    params = inspect.signature(cls.__init__).parameters
    assert set(kwargs) <= set(params), f"{name}: {cls.__name__} takes no {set(kwargs) - set(params)}"
    config = cls.from_config(SCHEDULER_CONFIG, **kwargs).config
    assert {k: config[k] for k in kwargs} == kwargs


@pytest.mark.parametrize("cls_name", list(DIFFUSERS_DEFAULTS))
def test_diffusers_defaults_are_diffusers(cls_name: str) -> None:
    """What `scheduler_for_config` reads for a setting a model's config leaves out is the class's default."""
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    assert {k: params[k].default for k in DIFFUSERS_DEFAULTS[cls_name]} == dict(DIFFUSERS_DEFAULTS[cls_name])


def _diffusers_takes_timesteps(cls: type, kwargs: dict[str, Any]) -> bool:
    sched = cls.from_config(SCHEDULER_CONFIG, **kwargs)
    if "timesteps" not in inspect.signature(sched.set_timesteps).parameters:
        return False
    try:
        sched.set_timesteps(timesteps=[999, 749, 499, 249], device="cpu")
    except ValueError:  # e.g. "Cannot set `timesteps` with `config.use_karras_sigmas = True`"
        return False
    return True


def _diffusers_timesteps(cls: type, kwargs: dict[str, Any], spacing: str) -> list[float]:
    sched = cls.from_config(SCHEDULER_CONFIG, **kwargs, timestep_spacing=spacing)
    sched.set_timesteps(4, device="cpu")
    return sched.timesteps.tolist()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_records_timestep_controls_are_diffusers(name: str) -> None:
    """A record takes explicit timesteps where diffusers' class does, spacing where diffusers' class reads it
    (LCM and TCD choose their own timesteps whatever the spacing; DPM-Solver's Karras sigmas span the whole
    trained range whatever the spacing, which it accepts), and eta where diffusers' step takes it."""
    record, (cls, kwargs) = sampler(name), DIFFUSERS[name]
    assert _diffusers_takes_timesteps(cls, kwargs) == record.timesteps
    spaced = _diffusers_timesteps(cls, kwargs, "leading") != _diffusers_timesteps(cls, kwargs, "trailing")
    assert spaced == record.spacing or (record.spacing and record.karras)
    assert ("eta" in inspect.signature(cls.step).parameters) == (record.eta is not None)


def _applies(name: str, case: dict[str, Any]) -> bool:
    """Whether diffusers' class takes the case's options (the others are refusal tests below)."""
    if "timesteps" in case:
        return name in CUSTOM_TIMESTEPS
    return not ("spacing" in case and name in OWN_TIMESTEPS)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(CASES[case])
    if not _applies(name, kwargs):
        pytest.skip(f"{name} does not take {case}'s options (refused: test_options_diffusers_refuses_are_refused)")
    steps = kwargs.pop("steps")
    ref_timesteps, ref = run_diffusers(name, steps, **kwargs)
    timesteps, ours = run_ours(name, steps, monkeypatch, **kwargs)
    assert timesteps.dtype == torch.float32
    assert torch.equal(timesteps, ref_timesteps.to(torch.float32)), (timesteps, ref_timesteps)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=REL_TOL * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["txt2img-30", "v-zsnr-trailing", "inpaint-0.6"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_float32_tables_track_float64(name: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 tables lose little against float64 ones (the margin the diffusers comparison relies on)."""
    kwargs = dict(CASES[case])
    steps = kwargs.pop("steps")
    ours = run_ours(name, steps, monkeypatch, **kwargs)[1]
    exact = run_ours(name, steps, monkeypatch, dtype=torch.float64, **kwargs)[1]
    assert ours.dtype == torch.float32 and exact.dtype == torch.float64
    torch.testing.assert_close(ours.double(), exact, rtol=0.0, atol=OWN_FLOAT64_TOL * float(exact.abs().max()))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_replay_with_reused_tables_and_state(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaying the loop (index reset in place, same state buffers, same noise table) gives the same
    result: the step reads nothing that an earlier replay changed other than the state it overwrites."""
    s = make_schedule(name, 8, config=SCHEDULER_CONFIG)
    start = randn_tensor(SHAPE, generator=_generators(SEEDS)) * s.init_noise_sigma
    step_noise = s.draw_step_noise(SHAPE, _generators(SEEDS), torch.float32)
    state = s.make_state(start)
    idx = torch.zeros(1, dtype=torch.int64)  # a 1-element index works like a 0-d one
    results = []
    with no_host_sync(monkeypatch):
        for _ in range(2):
            idx.zero_()
            latents = start
            for _ in range(s.num_steps):
                latents = s.step(fake_unet(s.scale_model_input(latents, idx), s.timestep(idx)), latents, idx,
                                 state, step_noise)
                idx += 1
            results.append(latents)
    assert torch.equal(results[0], results[1])


NOISY = [s.name for s in SAMPLERS if s.noise]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_records_noise_is_ours_and_diffusers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record draws noise exactly where our schedule and diffusers' step do."""
    cls, kwargs = DIFFUSERS[name]
    assert make_schedule(name, 2, config=SCHEDULER_CONFIG).needs_noise == sampler(name).noise
    if sampler(name).noise:
        return  # what it draws: test_step_noise_is_what_diffusers_draws_for_a_float16_unet
    sched = cls.from_config(SCHEDULER_CONFIG, **kwargs)
    sched.set_timesteps(6)
    module = sys.modules[cls.__module__]

    def forbidden(*args: Any, **kw: Any) -> torch.Tensor:
        raise AssertionError(f"{name} drew noise")

    monkeypatch.setattr(module, "randn_tensor", forbidden, raising=False)
    monkeypatch.setattr(torch, "randn", forbidden)
    takes_generator = "generator" in inspect.signature(sched.step).parameters  # UniPC's step has none to draw with
    extra = {"generator": _generators(SEEDS)} if takes_generator else {}
    latents = torch.ones(SHAPE)
    for t in sched.timesteps:
        latents = sched.step(torch.zeros(SHAPE), t, sched.scale_model_input(latents, t), **extra,
                             return_dict=False)[0]


@pytest.mark.parametrize("name", NOISY)
def test_step_noise_is_what_diffusers_draws_for_a_float16_unet(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row i is exactly the tensor diffusers' step() draws at step i (values and dtype: the model output's
    for Euler ancestral, LCM and TCD, float32 for DPM-Solver SDE), for a float16 UNet output. LCM and TCD
    draw nothing on the schedule's last step: that row is zeros."""
    cls, kwargs = DIFFUSERS[name]
    sched = cls.from_config(SCHEDULER_CONFIG, **kwargs)
    sched.set_timesteps(6)
    sched.set_begin_index(0)
    module = sys.modules[cls.__module__]
    drawn: list[torch.Tensor] = []
    real_randn = module.randn_tensor

    def recording_randn(*args: Any, **kw: Any) -> torch.Tensor:
        drawn.append(real_randn(*args, **kw))
        return drawn[-1]

    monkeypatch.setattr(module, "randn_tensor", recording_randn)
    gens = _generators(SEEDS)
    latents = torch.ones(SHAPE, dtype=torch.float16)
    for t in sched.timesteps:
        latents = sched.step(torch.zeros(SHAPE, dtype=torch.float16), t, sched.scale_model_input(latents, t),
                             generator=gens, return_dict=False)[0]
    ours = make_schedule(name, 6, config=SCHEDULER_CONFIG).draw_step_noise(SHAPE, _generators(SEEDS), torch.float16)
    assert len(drawn) == (5 if name in OWN_TIMESTEPS else 6)
    assert ours.shape[0] == 6 and ours.dtype == drawn[0].dtype
    assert torch.equal(ours[:len(drawn)], torch.stack(drawn))
    assert not ours[len(drawn):].any()


@pytest.mark.parametrize("name", NOISY)
def test_noise_rows_are_per_step_noise(name: str) -> None:
    """Passing one step's noise instead of the table gives the same step; without noise the step refuses."""
    s = make_schedule(name, 5, config=SCHEDULER_CONFIG)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    table = s.draw_step_noise(SHAPE, _generators(SEEDS), torch.float32)
    eps = fake_unet(x, s.timestep(2))
    idx = torch.tensor(2)
    a = s.step(eps, x, idx, s.make_state(x), table)
    b = s.step(eps, x, idx, s.make_state(x), table[2])
    assert torch.equal(a, b)
    assert not torch.equal(a, s.step(eps, x, idx, s.make_state(x), table[3]))
    with pytest.raises(ValueError, match="needs noise"):
        s.step(eps, x, idx, s.make_state(x), None)


def test_deterministic_samplers_draw_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    for name in (r.name for r in SAMPLERS if not r.noise):
        s = make_schedule(name, 10, config=SCHEDULER_CONFIG)
        assert not s.needs_noise
        assert s.draw_step_noise(SHAPE, [gen, gen], torch.float32).shape == (0, *SHAPE)
    assert torch.equal(gen.get_state(), before)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_schedule("heun", 30, config=SCHEDULER_CONFIG)
    assert info.value.param == "scheduler"
    for name in SCHEDULERS:
        assert name in str(info.value)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"strength": 0.01}, "strength"),  # int(30 * 0.01) = 0 steps left
    ({"strength": 1.5}, "strength"),
    ({"denoising_end": 1.0}, "denoising_end"),
    ({"denoising_start": 0.8, "denoising_end": 0.5}, "denoising_start"),
    ({"denoising_end": 0.001}, "denoising_end"),  # every timestep is below the cutoff
    ({"denoising_start": 0.999}, "denoising_start"),  # none is below the cutoff
])
def test_bad_windows_are_refused(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_schedule("euler", 30, config=SCHEDULER_CONFIG, **kwargs)
    assert info.value.param == param


@pytest.mark.parametrize("override", [{"interpolation_type": "log_linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                                      {"prediction_type": "sample"}, {"timestep_type": "continuous"}])
def test_unsupported_config_is_refused(override: dict[str, Any]) -> None:
    key = next(iter(override))
    with pytest.raises(ModelLoadError, match=key):
        make_schedule("euler", 30, config={**SCHEDULER_CONFIG, **override})


def test_ddim_refuses_sample_clipping() -> None:
    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}  # diffusers' default: True
    with pytest.raises(ModelLoadError, match="clip_sample"):
        make_schedule("ddim", 30, config=config)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", ["txt2img-4", "img2img-0.75", "base-end0.8-4", "timesteps-dmd2"])
def test_tcd_eta_matches_diffusers(eta: float, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """eta changes only the tables and which steps draw noise (none at 0), never the step's code."""
    kwargs = dict(CASES[case])
    steps = kwargs.pop("steps")
    ref = run_diffusers("tcd", steps, eta=eta, **kwargs)[1]
    ours = run_ours("tcd", steps, monkeypatch, eta=eta, **kwargs)[1]
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=REL_TOL * float(ref.abs().max()))


def test_tcd_eta_zero_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    table = make_schedule("tcd", 4, config=SCHEDULER_CONFIG, eta=0.0).draw_step_noise(SHAPE, [gen], torch.float32)
    assert table.shape == (4, *SHAPE) and not table.any()
    assert torch.equal(gen.get_state(), before)


def test_lcm_timesteps_are_its_own_selection() -> None:
    """LCM's selection from its 50-step distillation schedule, whatever the config's spacing (diffusers' values)."""
    for steps, expected in [(1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]),
                            (8, [999, 879, 759, 639, 499, 379, 259, 139])]:
        for spacing in ("leading", "trailing"):
            s = make_schedule("lcm", steps, config={**SCHEDULER_CONFIG, "timestep_spacing": spacing})
            assert s.timesteps.tolist() == expected


@pytest.mark.parametrize(("name", "kwargs", "param", "text"), [
    ("euler", {"timestep_spacing": "uniform"}, "timestep_spacing", "leading, linspace, trailing"),
    ("lcm", {"timestep_spacing": "trailing"}, "timestep_spacing", "own timesteps"),
    ("tcd", {"timestep_spacing": "leading"}, "timestep_spacing", "own timesteps"),
    ("euler", {"timesteps": (999, 999, 499, 249)}, "timesteps", "descending"),
    ("lcm", {"timesteps": (249, 499, 749, 999)}, "timesteps", "descending"),
    ("lcm", {"timesteps": (1000, 749, 499, 249)}, "timesteps", "0..999"),
    ("lcm", {"timesteps": (999, 749, 499, -1)}, "timesteps", "0..999"),
    ("lcm", {"timesteps": (999.5, 749, 499, 249)}, "timesteps", "integers"),
    ("lcm", {"timesteps": (999, 749, 499)}, "timesteps", "steps must equal"),
    ("euler_a", {"timesteps": (999, 749, 499, 249)}, "timesteps", "euler, dpmpp_2m"),
    ("euler_karras", {"timesteps": (999, 749, 499, 249)}, "timesteps", "does not take explicit timesteps"),
    ("ddim", {"timesteps": (999, 749, 499, 249)}, "timesteps", "lcm, tcd"),
    ("unipc", {"timesteps": (999, 749, 499, 249)}, "timesteps", "lcm, tcd"),
    ("euler", {"timesteps": (999, 749, 499, 249), "timestep_spacing": "trailing"}, "timestep_spacing", "not both"),
    ("tcd", {"eta": 1.5}, "eta", "[0, 1]"),
    ("tcd", {"eta": -0.1}, "eta", "[0, 1]"),
    ("euler", {"eta": 0.3}, "eta", "tcd"),
    ("ddim", {"eta": 0.5}, "eta", "eta 0 only"),
])
def test_options_diffusers_refuses_are_refused(name: str, kwargs: dict[str, Any], param: str, text: str) -> None:
    """Each refusal names the field and says what would work."""
    with pytest.raises(InvalidRequestError) as info:
        make_schedule(name, 4, config=SCHEDULER_CONFIG, **kwargs)
    assert info.value.param == param
    assert text in str(info.value), str(info.value)


def test_lcm_refuses_more_steps_than_its_distillation_schedule() -> None:
    with pytest.raises(InvalidRequestError, match="original_inference_steps=50") as info:
        make_schedule("lcm", 51, config=SCHEDULER_CONFIG)
    assert info.value.param == "steps"
    assert make_schedule("lcm", 51, config={**SCHEDULER_CONFIG, "original_inference_steps": 100}).num_steps == 51


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_models_own_scheduler_config_names_its_sampler(name: str) -> None:
    """The config diffusers saves for each sampler's class and settings maps back to that sampler (what a
    pipeline runs by default: an LCM-distilled model's LCMScheduler config gives lcm)."""
    cls, kwargs = DIFFUSERS[name]
    config = dict(cls.from_config(SCHEDULER_CONFIG, **kwargs).config)
    config["_class_name"] = cls.__name__
    assert scheduler_for_config(config) == name


@pytest.mark.parametrize(("config", "name"), [
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),  # a setting left out reads as diffusers' default
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3,
      "use_karras_sigmas": True}, "dpmpp_3m_sde_karras"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": None}, "euler"),
    ({"_class_name": "UniPCMultistepScheduler"}, "unipc"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}, None),
    ({"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}, None),
    ({"_class_name": "LCMScheduler", "timestep_spacing": "trailing"}, "lcm"),  # the noise schedule is the config's
])
def test_hand_written_configs_name_their_sampler(config: dict[str, Any], name: str | None) -> None:
    assert scheduler_for_config(config) == name


def test_configs_of_other_samplers_name_none() -> None:
    assert scheduler_for_config({"_class_name": "HeunDiscreteScheduler"}) is None
    assert scheduler_for_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver",
                                 "solver_order": 2}) is None
    assert scheduler_for_config({"_class_name": "EulerAncestralDiscreteScheduler", "use_karras_sigmas": True}) is None
