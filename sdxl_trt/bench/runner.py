"""The end-to-end benchmark: one engine directory through the runtime's public API, and optionally diffusers
on the same weights, in one process, one pipeline resident at a time.

Order (so that each pipeline's memory is its own): load ours, warm up, time every row and batch size, free
it; load diffusers (``--baseline``), time the same rows, free it; run the fp32 reference once per row. Rows
are (size, pipeline) with pipeline ``base`` or ``refiner-<mode>``; throughput is per (size, batch size).

What each figure means is written into the report itself (``timing_method``, ``stage_timers``,
``reference``), so a reader of a JSON file never has to guess.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.engine_dir.environment import library_versions
from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.request import GenerationRequest, GenerationResult

from .measure import MemoryProbe, latency_summary, release, timed

log = logging.getLogger(__name__)

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
REPORT_FORMAT = 1


@dataclass(frozen=True)
class BenchOptions:
    """What to measure. Sizes must be built buckets (empty: the first built one); batch sizes above the
    engines' max batch are skipped with a note."""

    engines: Path
    out: Path
    sizes: tuple[str, ...] = ()
    steps: int = 30
    runs: int = 5
    warmup_runs: int = 1
    batches: tuple[int, ...] = (1,)
    baseline: str | None = None
    baseline_refiner: str | None = None  # default: the engines' refiner when it is a preset or a local path
    refiner_mode: str | None = None  # None: base rows only; "ensemble" or "img2img": a refiner row per size too
    refiner_start: float = 0.8
    refiner_strength: float = 0.3
    device: str | None = None
    compile: bool = False
    scheduler: str = "euler"
    guidance: float = 5.0
    seed: int = 0
    prompt: str = PROMPT
    reference: bool = True  # the fp32 reference run (needs --baseline: it is diffusers in fp32)
    step_split: bool = True  # the event-timed per-step figure from a second, half-length step count
    threads: int | None = None  # torch's CPU threads (a shared or loaded CPU: oversubscribed threads spin)
    cache_interval: int = 1  # step caching (engines built with --deepcache): a full UNet step every N steps
    cache_branch: int | None = None  # its branch (None: the lowest built); the baseline runs DeepCacheSDHelper
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


class _EagerLog(logging.Handler):
    """Collects the runtime's 'no CUDA graph ... running it eagerly' warnings: a timed row that ran eagerly
    after warm-up would understate graphs, so the report lists them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "eager" in msg:
            self.messages.append(msg)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} asked for, but this machine has no CUDA GPU", param="device")
    return dev


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "versions": library_versions("transformers", "diffusers"),
                           "device": str(device), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def row_label(refiner_mode: str | None) -> str:
    return "base" if refiner_mode is None else f"refiner-{refiner_mode}"


def _request(opts: BenchOptions, bucket: Bucket, *, refiner_mode: str | None, n: int = 1,
             steps: int | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=opts.prompt, width=bucket.width, height=bucket.height,
                             steps=steps or opts.steps, guidance_scale=opts.guidance, scheduler=opts.scheduler,
                             seed=opts.seed, num_images=n, refiner_mode=refiner_mode,  # type: ignore[arg-type]
                             refiner_start=opts.refiner_start, refiner_strength=opts.refiner_strength,
                             cache_interval=opts.cache_interval, cache_branch=opts.cache_branch)


def scheduler_configs(engines: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base and refiner scheduler configs the engine directory ships (its documented layout)."""
    base = json.loads((Path(engines) / "scheduler" / "scheduler_config.json").read_text())
    ref_path = Path(engines) / "refiner_scheduler" / "scheduler_config.json"
    return base, json.loads(ref_path.read_text()) if ref_path.exists() else base


def step_counts(configs: tuple[dict[str, Any], dict[str, Any]], req: GenerationRequest) -> dict[str, int]:
    """UNet evaluations per image for each UNet: the denominators of the per-step times. A refiner ensemble
    splits one schedule (base 24 + refiner 6 of 30 at 0.8 with Euler); an img2img refiner runs its own."""
    from sdxl_trt.runtime.schedulers import make_schedule

    base_cfg, ref_cfg = configs
    strength = req.strength if req.mode != "txt2img" else 1.0
    if req.refiner_mode == "ensemble":
        base = make_schedule(req.scheduler, req.steps, config=base_cfg, strength=strength,
                             denoising_end=req.refiner_start).num_steps
        ref = make_schedule(req.scheduler, req.steps, config=ref_cfg, denoising_start=req.refiner_start).num_steps
    else:
        base = make_schedule(req.scheduler, req.steps, config=base_cfg, strength=strength).num_steps
        ref = 0 if req.refiner_mode is None else make_schedule(
            req.scheduler, req.refiner_steps or req.steps, config=ref_cfg, strength=req.refiner_strength).num_steps
    return {"base": base, "refiner": ref}


def _images(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])


def _time_ours(pipe: Any, req: GenerationRequest, opts: BenchOptions, device: torch.device,
               probe: MemoryProbe) -> tuple[list[float], list[dict[str, float]], np.ndarray]:
    for _ in range(opts.warmup_runs):
        pipe.generate(req)
    seconds, timings, images = [], [], None
    for _ in range(opts.runs):
        dt, result = timed(lambda: pipe.generate(req), device)
        probe.sample()
        seconds.append(dt)
        timings.append(dict(result.timings))
        if images is None:
            images = _images(result)
    assert images is not None
    return seconds, timings, images


def _median_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for t in timings for k in t})
    return {k: statistics.median(t.get(k, 0.0) for t in timings) for k in keys}


def _ours_row(pipe: Any, opts: BenchOptions, bucket: Bucket, mode: str | None, device: torch.device,
              probe: MemoryProbe) -> tuple[dict[str, Any], np.ndarray]:
    req = _request(opts, bucket, refiner_mode=mode)
    seconds, timings, images = _time_ours(pipe, req, opts, device, probe)
    lat = latency_summary(seconds)
    stages = _median_stages(timings)
    configs = scheduler_configs(opts.engines)
    steps = step_counts(configs, req)
    step_ms = {"base": 1000 * stages.get("denoise", 0.0) / steps["base"],
               "refiner": 1000 * stages.get("refiner", 0.0) / steps["refiner"] if steps["refiner"] else None}
    ours: dict[str, Any] = {**lat, "stages_s": stages, "steps": steps, "step_ms": step_ms,
                            "other_s": lat["p50_s"] - sum(stages.values()),
                            "step_ms_events": None, "fixed_ms_events": None}
    if opts.step_split and mode is None and opts.steps >= 2 and opts.cache_interval <= opts.steps // 2:
        half = _request(opts, bucket, refiner_mode=None, steps=opts.steps // 2)
        half_s, _, _ = _time_ours(pipe, half, opts, device, probe)
        n_full, n_half = steps["base"], step_counts(configs, half)["base"]
        if n_full > n_half:
            per_step = (lat["p50_s"] - statistics.median(half_s)) / (n_full - n_half)
            ours["step_ms_events"] = 1000 * per_step
            ours["fixed_ms_events"] = 1000 * (lat["p50_s"] - n_full * per_step)
            ours["step_split_steps"] = [n_full, n_half]
    log.info("sdxl-trt %s %s: p50 %.3f s, base step %.1f ms%s", bucket, row_label(mode), lat["p50_s"],
             step_ms["base"], f", refiner step {step_ms['refiner']:.1f} ms" if step_ms["refiner"] else "")
    return ours, images


def _throughput(fn: Any, n: int, opts: BenchOptions, device: torch.device, probe: MemoryProbe) -> dict[str, Any]:
    for _ in range(opts.warmup_runs):
        fn()
    seconds = []
    for _ in range(opts.runs):
        seconds.append(timed(fn, device)[0])
        probe.sample()
    p50 = statistics.median(seconds)
    return {"images_per_s": n / p50, "p50_s": p50, "min_s": min(seconds), "runs": len(seconds)}


def _from_row(row: dict[str, Any], side: str) -> dict[str, Any]:
    lat = row[side]
    return {"images_per_s": 1.0 / lat["p50_s"], "p50_s": lat["p50_s"], "min_s": lat["min_s"], "runs": lat["runs"],
            "from_row": True}


def _default_baseline_refiner(manifest: Any) -> str | None:
    from sdxl_trt.presets import PRESETS

    name = (manifest.refiner or {}).get("name")
    if name and (name in PRESETS or Path(str(name)).exists()):
        return str(name)
    src = (manifest.refiner or {}).get("source") or {}
    path = src.get("path") if isinstance(src, dict) else None
    return str(path) if path and Path(path).exists() else None


def _baseline_dtype(precision: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _check_model(what: str, model: str | None) -> None:
    """A mistyped --baseline is refused before minutes of timing, not found after them."""
    from sdxl_trt.presets import PRESETS

    if model is not None and model not in PRESETS and not Path(model).expanduser().exists():
        raise InvalidRequestError(f"--{what.replace('_', '-')} {model!r} is neither a preset ({', '.join(PRESETS)}) "
                                  "nor an existing path", param=what)


def _check_sizes(opts: BenchOptions, built: Sequence[Bucket]) -> list[Bucket]:
    sizes = [Bucket.parse(s) for s in opts.sizes] if opts.sizes else [built[0]]
    unknown = [str(b) for b in sizes if b not in built]
    if unknown:
        raise InvalidRequestError(f"size(s) {', '.join(unknown)} were not built; built: {', '.join(map(str, built))}"
                                  " (rebuild with --buckets to add them)", param="sizes")
    return sizes


def run_bench(opts: BenchOptions, *, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its report (see :func:`sdxl_trt.bench.report.write_report` to save it).

    ``checkpoint`` gets the complete report of what is measured so far after each pipeline, so a run that is
    stopped later (a phase timeout on a borrowed GPU) still leaves its first figures behind. A failing baseline
    is a note in the report, not a lost run."""
    if opts.runs < 1 or opts.steps < 1 or opts.warmup_runs < 0:
        raise InvalidRequestError("runs and steps must be at least 1, warmup runs at least 0", param="runs")
    if not 1 <= opts.cache_interval <= opts.steps:
        raise InvalidRequestError(f"--cache-interval {opts.cache_interval} must be between 1 (no caching) and "
                                  f"--steps ({opts.steps})", param="cache_interval")
    for what, model in (("baseline", opts.baseline), ("baseline_refiner", opts.baseline_refiner)):
        _check_model(what, model)
    device = resolve_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events, memory probes and the runtime's current stream on that GPU
    report: dict[str, Any] = {"format": REPORT_FORMAT, "settings": _settings(opts), "environment": environment(device),
                              "notes": []}
    notes: list[str] = report["notes"]

    sizes, modes, batches, manifest, ours_images = _measure_ours(opts, device, report)
    release(device)

    report["reference"] = {"kind": None, "description": "none: pass --baseline MODEL for a diffusers fp32 reference "
                                                        "on the same weights"}
    report["timing_method"] = (
        "end to end: CUDA events on the current stream around Pipeline.generate and the diffusers call, after "
        f"{opts.warmup_runs} untimed run(s) per row (and Pipeline.warmup for sdxl-trt)" if device.type == "cuda" else
        "end to end: host clock around Pipeline.generate and the diffusers call (CPU work is synchronous), after "
        f"{opts.warmup_runs} untimed run(s) per row (and Pipeline.warmup for sdxl-trt)")
    report["stage_timers"] = (
        "stages_s: medians of the runtime's own per-stage times (GenerationResult.timings; the runtime times its "
        "stages itself, with CUDA events on a GPU). step_ms.base = denoise / base steps, step_ms.refiner = refiner "
        "/ refiner steps (steps per row). step_ms_events is the bench's own synchronised cross-check: (p50 at N "
        "steps - p50 at N/2 steps) / (difference in base steps), both timed end to end"
        + (" with CUDA events" if device.type == "cuda" else "") + "; fixed_ms_events is the rest (text encoders, "
        "VAE decode, host work).")
    if checkpoint is not None:
        checkpoint(report)
    if opts.baseline:
        try:
            _run_baseline(opts, report, sizes, modes, device, manifest, ours_images, checkpoint)
        except Exception as e:  # noqa: BLE001 - keep our figures; the report says what failed
            log.exception("the diffusers baseline failed")
            notes.append(f"diffusers baseline failed: {type(e).__name__}: {e}")
            release(device)
    return report


def _measure_ours(opts: BenchOptions, device: torch.device, report: dict[str, Any]) -> tuple[
        list[Bucket], list[str | None], list[int], Any, dict[tuple[str, str], np.ndarray]]:
    """Load, warm up and time sdxl-trt; the pipeline is freed when this returns (before diffusers loads)."""
    from sdxl_trt.runtime.pipeline import Pipeline

    notes: list[str] = report["notes"]
    probe = MemoryProbe(device).start()
    load_s, pipe = timed(lambda: Pipeline.load(opts.engines, device=device, compile=opts.compile), device)
    manifest = pipe.manifest
    sizes = _check_sizes(opts, pipe.buckets)
    batches = sorted({n for n in opts.batches if n <= pipe.max_batch})
    for n in sorted(set(opts.batches) - set(batches)):
        notes.append(f"batch {n} skipped: the engines were built for at most {pipe.max_batch} images per batch "
                     "(sdxl-trt build --max-batch)")
    if opts.refiner_mode is not None and not pipe.has_refiner:
        raise InvalidRequestError("--refiner-mode needs engines built with --refiner", param="refiner_mode")
    modes: list[str | None] = [None] + ([opts.refiner_mode] if opts.refiner_mode else [])
    report["engines"] = {"directory": str(opts.engines), "backend": manifest.backend, "precision": manifest.precision,
                         "model": manifest.model.get("name"), "refiner": (manifest.refiner or {}).get("name"),
                         "buckets": list(manifest.buckets), "max_batch": manifest.max_batch,
                         "cache_branches": list(pipe.cache_branches),
                         # refused before warm-up (an unbuilt branch, engines without caching); the branch
                         # the timed requests run, the runtime's default filled in
                         "cache_branch": pipe.admit(_request(opts, sizes[0], refiner_mode=None)).cache_branch}

    eager = _EagerLog()
    runtime_log = logging.getLogger("sdxl_trt.runtime")
    runtime_log.addHandler(eager)
    try:
        # The runtime's default warm-up length: what a service pays (one captured step serves any step count).
        warm_batches = sorted({1, *batches}, reverse=True)
        warmup_s, _ = timed(lambda: pipe.warmup(buckets=sizes, batch_sizes=warm_batches, scheduler=opts.scheduler,
                                                guidance_scale=opts.guidance,
                                                refiner=opts.refiner_mode is not None), device)
        graphs_warm = dict(pipe.cuda_graph_stats())
        log.info("sdxl-trt: loaded in %.2f s, warmed up in %.2f s (%s)", load_s, warmup_s, graphs_warm)
        rows: list[dict[str, Any]] = []
        ours_images: dict[tuple[str, str], np.ndarray] = {}
        for bucket in sizes:
            for mode in modes:
                ours, images = _ours_row(pipe, opts, bucket, mode, device, probe)
                rows.append({"size": str(bucket), "pipeline": row_label(mode), "sdxl_trt": ours, "diffusers": None,
                             "speedup_p50": None, "error_vs_fp32": {"sdxl_trt": None, "diffusers": None}})
                ours_images[(str(bucket), row_label(mode))] = images
        throughput: list[dict[str, Any]] = []
        for bucket in sizes:
            for n in batches:
                req = _request(opts, bucket, refiner_mode=None, n=n)
                if n == 1:  # the base row is this very request: reuse its runs (GPU minutes are scarce)
                    t = _from_row(next(r for r in rows if r["size"] == str(bucket) and r["pipeline"] == "base"), "sdxl_trt")
                else:
                    t = _throughput(lambda req=req: pipe.generate(req), n, opts, device, probe)
                throughput.append({"size": str(bucket), "batch": n, "diffusers": None, "sdxl_trt": t})
        graphs_end = dict(pipe.cuda_graph_stats())
    finally:
        runtime_log.removeHandler(eager)
    report["pipelines"] = {"sdxl_trt": {"load_s": load_s, "warmup_s": warmup_s, "compile": opts.compile,
                                        "cuda_graphs_after_warmup": graphs_warm, "cuda_graphs_at_end": graphs_end,
                                        "eager_after_warmup": sorted(set(eager.messages)),
                                        "memory": probe.result()},
                           "diffusers": None}
    if graphs_end.get("graphs") != graphs_warm.get("graphs"):
        notes.append(f"CUDA graphs were captured after warm-up ({graphs_warm} -> {graphs_end}): some timed runs "
                     "paid for a capture")
    if eager.messages:
        notes.append(f"{len(set(eager.messages))} step shape(s) ran eagerly after warm-up (see pipelines.sdxl_trt)")
    report["rows"], report["throughput"] = rows, throughput
    return sizes, modes, batches, manifest, ours_images


def _run_baseline(opts: BenchOptions, report: dict[str, Any], sizes: list[Bucket], modes: list[str | None],
                  device: torch.device, manifest: Any, ours_images: dict[tuple[str, str], np.ndarray],
                  checkpoint: Callable[[dict[str, Any]], None] | None) -> None:
    from .baseline import relative_error

    notes: list[str] = report["notes"]
    refiner = opts.baseline_refiner or (_default_baseline_refiner(manifest) if opts.refiner_mode else None)
    if opts.refiner_mode and refiner is None:
        notes.append("no diffusers refiner row: the engines' refiner is neither a preset nor a local path; pass "
                     "--baseline-refiner")
    dtype = _baseline_dtype(manifest.precision, device)
    kw = dict(prompt=opts.prompt, steps=opts.steps, guidance=opts.guidance, seed=opts.seed,
              refiner_start=opts.refiner_start, refiner_strength=opts.refiner_strength,
              cache_interval=opts.cache_interval, cache_branch=report["engines"].get("cache_branch"))
    rows = {(r["size"], r["pipeline"]): r for r in report["rows"]}

    theirs_images, baseline_is_fp32 = _measure_diffusers(opts, report, sizes, modes, device, refiner, dtype, kw)
    release(device)
    if checkpoint is not None:
        checkpoint(report)

    if not opts.reference:
        report["reference"]["description"] = "none: skipped (--no-reference)"
        return
    if baseline_is_fp32:
        reference = theirs_images
        report["reference"] = {"kind": "diffusers-fp32-baseline",
                               "description": "the diffusers baseline run itself (it is fp32): "
                                              f"{report['pipelines']['diffusers']['description']}"}
    else:
        try:
            reference = _fp32_reference(opts, refiner, sizes, modes, device, kw, report)
        except Exception as e:  # noqa: BLE001 - the timings stand without it
            log.exception("the fp32 reference run failed")
            notes.append(f"fp32 reference failed: {type(e).__name__}: {e}")
            return
    if opts.cache_interval > 1:
        report["reference"]["description"] += (f" under DeepCacheSDHelper (interval {opts.cache_interval}, branch "
                                                f"{kw['cache_branch']}), the step-caching reference")
    for key, ref in reference.items():
        row = rows[key]
        row["error_vs_fp32"] = {"sdxl_trt": relative_error(ours_images[key], ref),
                                "diffusers": relative_error(theirs_images[key], ref) if key in theirs_images else None}


def _measure_diffusers(opts: BenchOptions, report: dict[str, Any], sizes: list[Bucket], modes: list[str | None],
                       device: torch.device, refiner: str | None, dtype: torch.dtype, kw: dict[str, Any],
                       ) -> tuple[dict[tuple[str, str], np.ndarray], bool]:
    """Load and time diffusers on the same rows; freed when this returns."""
    from .baseline import load_diffusers

    rows = {(r["size"], r["pipeline"]): r for r in report["rows"]}
    probe = MemoryProbe(device).start()
    load_s, dp = timed(lambda: load_diffusers(opts.baseline, refiner=refiner, dtype=dtype, device=device,  # type: ignore[arg-type]
                                              scheduler=opts.scheduler), device)
    theirs_images: dict[tuple[str, str], np.ndarray] = {}
    for bucket in sizes:
        for mode in modes:
            if mode is not None and dp.refiner is None:
                continue
            row = rows[(str(bucket), row_label(mode))]

            def call(bucket: Bucket = bucket, mode: str | None = mode, n: int = 1) -> np.ndarray:
                return dp.generate(bucket=bucket, n=n, refiner_mode=mode, **kw)

            for _ in range(opts.warmup_runs):
                call()
            seconds = []
            for _ in range(opts.runs):
                dt, images = timed(call, device)
                probe.sample()
                seconds.append(dt)
                theirs_images.setdefault((str(bucket), row_label(mode)), images)
            row["diffusers"] = latency_summary(seconds)
            row["speedup_p50"] = row["diffusers"]["p50_s"] / row["sdxl_trt"]["p50_s"]
            log.info("diffusers %s %s: p50 %.3f s (sdxl-trt %.2fx)", bucket, row_label(mode),
                     row["diffusers"]["p50_s"], row["speedup_p50"])
    for t in report["throughput"]:
        bucket, n = Bucket.parse(t["size"]), t["batch"]
        base_row = rows[(t["size"], "base")]
        if n == 1:
            t["diffusers"] = _from_row(base_row, "diffusers")
            continue
        t["diffusers"] = _throughput(lambda b=bucket, n=n: dp.generate(bucket=b, n=n, refiner_mode=None, **kw), n,
                                     opts, device, probe)
    report["pipelines"]["diffusers"] = {"load_s": load_s, "description": dp.description, "memory": probe.result()}
    return theirs_images, dp.dtype == torch.float32


def _fp32_reference(opts: BenchOptions, refiner: str | None, sizes: list[Bucket], modes: list[str | None],
                    device: torch.device, kw: dict[str, Any], report: dict[str, Any]) -> dict[tuple[str, str], np.ndarray]:
    """One fp32 diffusers run per row with TF32 off (a true fp32 reference, not TF32 convolutions)."""
    from .baseline import load_diffusers

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        dp = load_diffusers(opts.baseline, refiner=refiner, dtype=torch.float32, device=device,  # type: ignore[arg-type]
                            scheduler=opts.scheduler)
        out = {}
        for bucket in sizes:
            for mode in modes:
                if mode is None or dp.refiner is not None:
                    out[(str(bucket), row_label(mode))] = dp.generate(bucket=bucket, n=1, refiner_mode=mode, **kw)
        report["reference"] = {"kind": "diffusers-fp32", "description": dp.description + " (TF32 off), one run per row"}
        del dp
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        release(device)
    return out


def _settings(opts: BenchOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["engines"], d["out"] = str(opts.engines), str(opts.out)
    d["sizes"], d["batches"] = list(opts.sizes), list(opts.batches)
    return d
