"""End-to-end benchmark: sdxl-trt's runtime against diffusers' StableDiffusionXLPipeline, same weights,
same process, same settings.

Measures per size: end-to-end txt2img latency (p50, p90, min over ``--runs`` after a warm-up), time per
stage (text encoders, one denoising step, VAE decode), throughput at each ``--batches`` size, peak device
memory, engine build / load / warm-up time, with and without the refiner (ensemble at 0.8), and the
relative error of our images against an fp32 PyTorch (diffusers) reference with the same weights and
noise. Writes ``<out>/<name>.json``, ``.md`` and ``.png``.

GPU (the headline)::

    python benchmarks/bench_e2e.py --model sdxl-base-1.0 --refiner sdxl-refiner-1.0 --backend torch \\
        --device cuda --precision fp16 --sizes 1024x1024,1344x768,832x1216 --steps 30 --runs 10

CPU smoke run on the tiny model (what CI machines can do)::

    python benchmarks/bench_e2e.py --model tiny --refiner tiny-refiner --backend onnxruntime --device cpu \\
        --precision fp32 --sizes 256x256,384x192 --steps 30 --runs 5 --batches 1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.engine.build import BuildOptions, build_engines
from sdxl_trt.engine_dir.environment import library_versions
from sdxl_trt.request import GenerationRequest
from sdxl_trt.runtime.pipeline import Pipeline

log = logging.getLogger("bench_e2e")
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "versions": library_versions("transformers"), "device": device}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = "unknown"
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_runs(fn, runs: int, device: str) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {"p50_s": statistics.median(s), "p90_s": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
            "min_s": s[0], "runs": len(s)}


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def diffusers_pipeline(model: str, dtype: torch.dtype, device: str, refiner: str | None):
    """diffusers' SDXL pipelines over the same weights (our loader; SDPA attention, eager)."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdxl_trt.export.loading import load_model

    base = load_model(model, dtype=dtype, device=device)
    tok = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2"))
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler"))
    pipe = diffusers.StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                               text_encoder_2=base.text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
                                               unet=base.unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = None
    if refiner:
        r = load_model(refiner, dtype=dtype, device=device)
        ref_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.vae, text_encoder=None, text_encoder_2=r.text_encoder_2, tokenizer=None, tokenizer_2=tok2,
            unet=r.unet, scheduler=sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
        ref_pipe.set_progress_bar_config(disable=True)
    return pipe, ref_pipe


def run_diffusers(pipe, ref_pipe, *, bucket: Bucket, steps: int, guidance: float, seed: int, n: int,
                  refiner: bool) -> np.ndarray:
    gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    kw = dict(prompt=PROMPT, width=bucket.width, height=bucket.height, num_inference_steps=steps,
              guidance_scale=guidance, generator=gens, num_images_per_prompt=n)
    if not refiner:
        return pipe(**kw, output_type="np").images
    latents = pipe(**kw, denoising_end=0.8, output_type="latent").images
    return ref_pipe(prompt=PROMPT, image=latents, num_inference_steps=steps, guidance_scale=guidance,
                    generator=gens, denoising_start=0.8, output_type="np").images


def relative_error(ours: list, reference: np.ndarray) -> float:
    """Both sides as 8-bit images, so the figure is the pipelines' difference, not PNG quantisation."""
    a = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in ours])
    b = np.round(np.asarray(reference, dtype=np.float64) * 255) / 255
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--refiner", default=None)
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engines", default=None, help="use built engines instead of building into a temp dir")
    p.add_argument("--sizes", default="256x256,384x192")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    sizes = [Bucket.parse(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    report: dict[str, Any] = {"settings": vars(args), "environment": environment(args.device), "sizes": {}}

    engines = Path(args.engines) if args.engines else Path(tempfile.mkdtemp(prefix="bench-engines-"))
    t0 = time.perf_counter()
    if not args.engines:
        build_engines(BuildOptions(model=args.model, refiner=args.refiner, out=engines, backend=args.backend,
                                   precision=args.precision, buckets=",".join(map(str, sizes)),
                                   max_batch=max(batches), device=args.device))
    report["build_s"] = time.perf_counter() - t0 if not args.engines else None
    t0 = time.perf_counter()
    pipe = Pipeline.load(engines, device=args.device)
    report["load_s"] = time.perf_counter() - t0
    log.info("loaded engines in %.2f s", report["load_s"])

    dpipe, dref = diffusers_pipeline(args.model, dtype, args.device, args.refiner)
    fp32 = diffusers_pipeline(args.model, torch.float32, args.device, args.refiner) if dtype != torch.float32 else (
        dpipe, dref)

    for bucket in sizes:
        entry: dict[str, Any] = {}
        for refiner in [False, True] if args.refiner else [False]:
            req = GenerationRequest(prompt=PROMPT, width=bucket.width, height=bucket.height, steps=args.steps,
                                    guidance_scale=args.guidance, scheduler="euler", seed=0,
                                    refiner_mode="ensemble" if refiner else None)
            key = "with_refiner" if refiner else "base"
            t0 = time.perf_counter()
            pipe.generate(req)  # warm-up: graph capture / first-call costs
            warm = time.perf_counter() - t0
            reset_peak(args.device)
            results: list = []
            ours = timed_runs(lambda req=req, out=results: out.append(pipe.generate(req)), args.runs, args.device)
            timings = results[-1].timings
            ours_mem = peak_memory(args.device)
            run_diffusers(dpipe, dref, bucket=bucket, steps=args.steps, guidance=args.guidance, seed=0, n=1,
                          refiner=refiner)
            reset_peak(args.device)
            theirs = timed_runs(lambda b=bucket, r=refiner: run_diffusers(dpipe, dref, bucket=b, steps=args.steps,
                                                                          guidance=args.guidance, seed=0, n=1,
                                                                          refiner=r), args.runs, args.device)
            theirs_mem = peak_memory(args.device)
            reference = run_diffusers(*fp32, bucket=bucket, steps=args.steps, guidance=args.guidance, seed=0, n=1,
                                      refiner=refiner)
            entry[key] = {
                "ours": {**summary(ours), "warmup_s": warm, "peak_memory_gib": ours_mem,
                         "stages_s": timings, "step_ms": 1000 * timings["denoise"] / max(1, args.steps)},
                "diffusers": {**summary(theirs), "peak_memory_gib": theirs_mem},
                "speedup_p50": statistics.median(theirs) / statistics.median(ours),
                "relative_error_vs_fp32": relative_error(results[-1].images, reference),
            }
            log.info("%s %s: ours p50 %.3f s, diffusers p50 %.3f s", bucket, key, entry[key]["ours"]["p50_s"],
                     entry[key]["diffusers"]["p50_s"])
        throughput = {}
        for n in batches:
            req = GenerationRequest(prompt=PROMPT, width=bucket.width, height=bucket.height, steps=args.steps,
                                    guidance_scale=args.guidance, seed=0, num_images=n)
            pipe.generate(req)
            t = timed_runs(lambda req=req: pipe.generate(req), max(2, args.runs // 2), args.device)
            throughput[str(n)] = {"images_per_s": n / statistics.median(t), "p50_s": statistics.median(t)}
        entry["throughput"] = throughput
        report["sizes"][str(bucket)] = entry

    name = args.name or f"e2e-{args.model}-{args.backend}-{args.precision}-{args.device}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    device = env.get("gpu") or f"CPU ({env.get('cpu')}, 2 cores)"
    lines = [
        f"# sdxl-trt vs diffusers: {s['model']}, {s['backend']} {s['precision']}",
        "",
        f"Device: {device}" + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; commit {env['commit']}; {json.dumps(env['versions'])}",
        f"Settings: {s['steps']} steps, Euler, guidance {s['guidance']}, {s['runs']} timed runs after a warm-up. "
        f"Build {report['build_s'] or 0:.1f} s, load {report['load_s']:.2f} s.",
        "",
        "| size | pipeline | sdxl-trt p50 / p90 / min (s) | diffusers p50 / p90 / min (s) | speedup (p50) "
        "| step (ms) | text enc (ms) | VAE decode (ms) | peak mem ours / diffusers (GiB) | rel. error vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, entry in report["sizes"].items():
        for key in ("base", "with_refiner"):
            if key not in entry:
                continue
            e = entry[key]
            o, d = e["ours"], e["diffusers"]
            mem = (f"{o['peak_memory_gib']:.1f} / {d['peak_memory_gib']:.1f}" if o["peak_memory_gib"] is not None
                   else "n/a (CPU)")
            lines.append(
                f"| {size} | {key} | {o['p50_s']:.3f} / {o['p90_s']:.3f} / {o['min_s']:.3f} | "
                f"{d['p50_s']:.3f} / {d['p90_s']:.3f} / {d['min_s']:.3f} | {e['speedup_p50']:.2f}x | "
                f"{o['step_ms']:.1f} | {1000 * o['stages_s']['text_encoders']:.1f} | "
                f"{1000 * o['stages_s']['vae_decode']:.1f} | {mem} | {e['relative_error_vs_fp32']:.2e} |")
    lines += ["", "Throughput (sdxl-trt, one request of n images):", "", "| size | n | images/s | p50 (s) |",
              "|---|---|---|---|"]
    for size, entry in report["sizes"].items():
        for n, t in entry["throughput"].items():
            lines.append(f"| {size} | {n} | {t['images_per_s']:.2f} | {t['p50_s']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ours, theirs = [], [], []
    for size, entry in report["sizes"].items():
        for key in ("base", "with_refiner"):
            if key in entry:
                labels.append(f"{size}\n{key}")
                ours.append(entry[key]["ours"]["p50_s"])
                theirs.append(entry[key]["diffusers"]["p50_s"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    ax.bar(x - 0.2, theirs, 0.4, label="diffusers (eager)")
    ax.bar(x + 0.2, ours, 0.4, label="sdxl-trt")
    ax.set_xticks(x, labels)
    ax.set_ylabel("end-to-end latency, p50 (s)")
    env = report["environment"]
    ax.set_title(f"{report['settings']['model']} on {env.get('gpu') or 'CPU'}, {report['settings']['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
