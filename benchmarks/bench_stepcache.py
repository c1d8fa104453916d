"""Step caching (DeepCache): per-step time of the full and the shallow UNet engine, and end-to-end time at
N = 2, 3, 5 and branches 0-2, against no caching and against diffusers with ``DeepCacheSDHelper``, in one run.

Builds (or reuses) engines with ``--deepcache 0,1,2`` in ``--work``; random weights (speed does not depend on
weight values). Writes ``stepcache-<model>-<backend>-<device>.{json,md,png}`` to ``benchmarks/results/``.
Targets (full-size preset): shallow step <= 15% of a full step at branch 0; N = 3 cuts the UNet's total time
to <= 0.45x; our speedup over diffusers+DeepCache at the same N >= our speedup over diffusers uncached.

CPU, tiny::

    python benchmarks/bench_stepcache.py --model tiny --size 256x256 --steps 10 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
INTERVALS = (2, 3, 5)
BRANCHES = (0, 1, 2)
log = logging.getLogger("bench_stepcache")


def _median(fn: Any, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_step_seconds(pipe: Any, size: tuple[int, int], runs: int) -> dict[str, float]:
    """One call of the full UNet engine and of each shallow engine at the guided batch (B = 2), seconds."""
    from sdxl_trt.contracts import TOKENS_PER_CHUNK, shallow_component

    w, h = size
    dims = {"B": 2, "h": h // 8, "w": w // 8, "S": TOKENS_PER_CHUNK}
    out = {}
    for name in ["unet", *(shallow_component(k) for k in pipe.cache_branches)]:
        bound = pipe.ctx.bind(name, dims)
        for t in bound.inputs.values():
            if t.is_floating_point():
                t.normal_()
        out[name] = _median(lambda b=bound: pipe.ctx.run(b), runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdxl-trt-bench-stepcache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from DeepCache import DeepCacheSDHelper

    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.export.loading import load_model
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    w, h = (int(v) for v in args.size.split("x"))
    out_dir = args.work / f"{args.model}-{args.backend}"
    build_engines(BuildOptions(model=args.model, out=out_dir, backend=args.backend, precision="fp32",
                               buckets=args.size, deepcache=BRANCHES))
    pipe = Pipeline.load(out_dir, device=args.device)
    per_step = engine_step_seconds(pipe, (w, h), args.runs)

    def ours(n: int, k: int | None) -> float:
        req = GenerationRequest(prompt="a fox", width=w, height=h, steps=args.steps, seed=1, cache_interval=n,
                                cache_branch=k)
        return _median(lambda: pipe.generate(req), args.runs)

    import diffusers
    from transformers import CLIPTokenizer

    base = load_model(args.model)
    tok = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2"))
    ref = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=tok,
        tokenizer_2=tok2, unet=base.unet, scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(
            str(base.config_dir / "scheduler")), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)

    def theirs(n: int, k: int) -> float:
        helper = DeepCacheSDHelper(pipe=ref)
        helper.set_params(cache_interval=n, cache_branch_id=k)
        helper.enable()
        try:
            with torch.inference_mode():
                return _median(lambda: ref(prompt="a fox", width=w, height=h, num_inference_steps=args.steps,
                                           generator=torch.Generator().manual_seed(1), output_type="np"), args.runs)
        finally:
            helper.disable()

    rows = [{"interval": 1, "branch": None, "ours_s": ours(1, None), "diffusers_s": theirs(1, 0)}]
    for k in BRANCHES:
        for n in INTERVALS:
            rows.append({"interval": n, "branch": k, "ours_s": ours(n, k), "diffusers_s": theirs(n, k)})
    base_ours = rows[0]["ours_s"]
    for r in rows:
        r["speedup_vs_uncached"] = base_ours / r["ours_s"]
        r["ratio_over_diffusers"] = r["diffusers_s"] / r["ours_s"]
        n, k = r["interval"], r["branch"]
        full = len(range(0, args.steps, n))
        shallow = per_step[f"unet_shallow.{k}"] if k is not None else 0.0
        r["unet_time_fraction"] = (full * per_step["unet"] + (args.steps - full) * shallow) / (args.steps * per_step["unet"])
    targets = {
        "shallow_over_full_branch0": per_step["unet_shallow.0"] / per_step["unet"],
        "unet_fraction_n3_branch0": next(r["unet_time_fraction"] for r in rows if r["interval"] == 3 and r["branch"] == 0),
        "ratio_over_diffusers_n3_branch0": next(r["ratio_over_diffusers"] for r in rows
                                                if r["interval"] == 3 and r["branch"] == 0),
        "ratio_over_diffusers_uncached": rows[0]["ratio_over_diffusers"],
    }
    targets["met"] = {"shallow <= 15% of full (branch 0)": targets["shallow_over_full_branch0"] <= 0.15,
                      "N=3 UNet time <= 0.45x": targets["unet_fraction_n3_branch0"] <= 0.45,
                      "ratio over diffusers+DeepCache >= uncached ratio":
                          targets["ratio_over_diffusers_n3_branch0"] >= targets["ratio_over_diffusers_uncached"]}
    report = {"model": args.model, "backend": args.backend, "device": args.device, "size": args.size,
              "steps": args.steps, "runs": args.runs, "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "per_step_s": per_step, "rows": rows, "targets": targets}
    stem = RESULTS / f"stepcache-{args.model}-{args.backend}-{args.device}"
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# Step caching: {args.model}, {args.backend} on {args.device}, {args.size}, {args.steps} steps "
             f"(median of {args.runs})", "", "| engine | one call (B=2) ms |", "|---|---|",
             *(f"| {k} | {v * 1000:.1f} |" for k, v in per_step.items()), "",
             "| N | branch | ours s | diffusers(+DeepCache) s | speedup vs uncached | ours over diffusers | UNet time |",
             "|---|---|---|---|---|---|---|",
             *(f"| {r['interval']} | {r['branch'] if r['branch'] is not None else '-'} | {r['ours_s']:.3f} | "
               f"{r['diffusers_s']:.3f} | {r['speedup_vs_uncached']:.2f}x | {r['ratio_over_diffusers']:.2f}x | "
               f"{r['unet_time_fraction']:.2f}x |" for r in rows), "",
             "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets["met"].items())]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k in BRANCHES:
            sel = [r for r in rows if r["branch"] == k]
            ax.plot([r["interval"] for r in sel], [r["speedup_vs_uncached"] for r in sel], "o-", label=f"branch {k}")
        ax.set_xlabel("cache interval N")
        ax.set_ylabel("speedup vs uncached (end to end)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=100)
    except ImportError:
        log.warning("matplotlib missing: no plot")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
