"""Step caching (DeepCache): per-step time of the full and the shallow UNet, the UNet's total time at
N = 2, 3, 5 and branches 0-2, and end-to-end time, against no caching and against diffusers with
``DeepCacheSDHelper``, all in one run.

Per-step costs are medians of a few direct calls at the guided batch (B = 2), in ``--calls`` interleaved rounds
of every kind of call, ours and diffusers', after one untimed round (a load change on a shared machine then
shifts every kind alike):

* ours, ``--source engines``: the engines of a ``--deepcache 0,1,2`` build in ``--work`` (built or reused):
  the full UNet (which also writes the cached features) and each ``unet_shallow.K``, through the runtime's
  bound buffers. ``--source eager``: the export wrappers those engines are built from (export/deepcache.py),
  run in eager PyTorch on the UNet itself: no export or build, so the full-size preset fits a CPU run.
* diffusers: the same UNet's plain forward (no caching), and DeepCache's own skip step
  (``DeepCacheSDHelper`` primed by one full step, then called at a timestep it skips).

The UNet's total time over ``--steps`` steps at interval N is ``F * full + (steps - F) * shallow`` with
``F = ceil(steps / N)`` full steps (DeepCache's uniform mode). End-to-end (engines only; ``--e2e-runs 0`` skips it)
times whole requests of ours and diffusers' pipeline with and without the helper, at every (N, K).
Random weights (speed does not depend on weight values). Writes ``stepcache-<model>-<source>-<device>`` as
JSON, Markdown and a PNG plot to ``benchmarks/results/``. Targets (full-size preset): the shallow step costs
<= 15% of a full step at branch 0; N = 3 cuts the UNet's total time to <= 0.45x; our speedup over
diffusers + DeepCache at the same N >= our speedup over diffusers without caching.

CPU, tiny (engines and end to end, about 3 minutes on 2 shared cores)::

    python benchmarks/bench_stepcache.py --model tiny --size 256x256 --steps 10 --e2e-runs 1

CPU, full-size SDXL base (per-step costs only; one round is three full UNet calls, minutes each on 2 shared
cores)::

    python benchmarks/bench_stepcache.py --model sdxl-base-1.0 --source eager --size 512x512 --steps 30 \\
        --calls 1 --warm-rounds 0 --e2e-runs 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
INTERVALS = (2, 3, 5)
BRANCHES = (0, 1, 2)
log = logging.getLogger("bench_stepcache")


def unet_inputs(unet: Any, size: tuple[int, int], batch: int = 2) -> dict[str, torch.Tensor]:
    """Random inputs of a guided SDXL UNet call (B = 2) at ``size``, read off the UNet's config."""
    from sdxl_trt.contracts import TOKENS_PER_CHUNK

    cfg = unet.config
    w, h = size
    g = torch.Generator().manual_seed(0)
    time_ids = 6 * cfg.addition_time_embed_dim
    return {"sample": torch.randn(batch, cfg.in_channels, h // 8, w // 8, generator=g),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, TOKENS_PER_CHUNK, cfg.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(batch, cfg.projection_class_embeddings_input_dim - time_ids, generator=g),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(batch, 6).contiguous()}


def _clock(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def diffusers_round(unet: Any, scheduler: Any, x: dict[str, torch.Tensor], branches: Sequence[int]
                    ) -> Callable[[], dict[str, float]]:
    """One round of diffusers' calls: DeepCache's full step (the helper primed at the schedule's first timestep:
    it caches every wrapped module's output, whatever the branch), its skip step per branch ("unet_shallow.K",
    called at the second timestep, which uniform mode skips), then the plain forward without caching ("unet")."""
    from DeepCache import DeepCacheSDHelper

    from sdxl_trt.contracts import shallow_component

    scheduler.set_timesteps(10)
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]  # 0-d, as diffusers' pipeline passes them
    cond = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}

    def call(t: torch.Tensor) -> Any:
        # positional timestep: the helper reads args[1] to find the step
        return unet(x["sample"], t, x["encoder_hidden_states"], added_cond_kwargs=cond, return_dict=False)

    def one_round() -> dict[str, float]:
        out: dict[str, float] = {}
        helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
        helper.set_params(cache_interval=2, cache_branch_id=branches[0])
        helper.enable()
        try:
            out["unet+helper(full step)"] = _clock(lambda: call(t0))
            for k in branches:
                helper.set_params(cache_interval=2, cache_branch_id=k)
                out[shallow_component(k)] = _clock(lambda: call(t1))
        finally:
            helper.disable()
        out["unet"] = _clock(lambda: call(t0))
        return out

    return one_round


def eager_calls(unet: Any, x: dict[str, torch.Tensor], branches: Sequence[int]) -> dict[str, Callable[[], Any]]:
    """Ours in eager PyTorch: the full UNet of a ``--deepcache`` build (noise + every branch's feature) and each
    shallow UNet, exactly the modules the backends export."""
    from sdxl_trt.contracts import shallow_component
    from sdxl_trt.export.deepcache import FeatureUNetWrapper, ShallowUNetWrapper, deepcache_features

    args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["text_embeds"], x["time_ids"])
    full = FeatureUNetWrapper(unet, branches)
    out: dict[str, Callable[[], Any]] = {"unet": lambda: full(*args)}
    b = x["sample"].shape[0]
    h, w = x["sample"].shape[2:]
    for k, channels, f in deepcache_features(unet.config, branches):
        shallow = ShallowUNetWrapper(unet, k)
        feature = torch.randn(b, channels, h // f, w // f)
        out[shallow_component(k)] = lambda s=shallow, ft=feature: s(*args, ft)
    return out


def engine_calls(pipe: Any, size: tuple[int, int]) -> dict[str, Callable[[], Any]]:
    """One call of the full UNet engine and of each shallow engine at the guided batch (B = 2)."""
    from sdxl_trt.contracts import TOKENS_PER_CHUNK, shallow_component

    w, h = size
    dims = {"B": 2, "h": h // 8, "w": w // 8, "S": TOKENS_PER_CHUNK}
    out: dict[str, Callable[[], Any]] = {}
    for name in ["unet", *(shallow_component(k) for k in pipe.cache_branches)]:
        bound = pipe.ctx.bind(name, dims)
        for t in bound.inputs.values():
            if t.is_floating_point():
                t.normal_()
        out[name] = lambda b=bound: pipe.ctx.run(b)
    return out


def step_seconds(ours: dict[str, Callable[[], Any]], theirs: Callable[[], dict[str, float]], calls: int,
                 warm: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per kind of call, ours and diffusers', over ``calls`` interleaved rounds after ``warm``
    untimed rounds: on a shared machine a load change then shifts every kind alike instead of one side.
    ``warm`` 0: one untimed full UNet call instead (the first forward pays for allocation and oneDNN's kernel
    setup, for both sides alike: they run the same ops at the same shapes)."""
    samples: tuple[dict[str, list[float]], dict[str, list[float]]] = ({}, {})
    with torch.inference_mode():
        if warm == 0:
            ours["unet"]()
        for r in range(1 - warm, calls + 1):
            got = ({k: _clock(fn) for k, fn in ours.items()}, theirs())
            log.info("round %d/%d: %s", r, calls, {k: round(v, 4) for d in got for k, v in d.items()})
            if r > 0:
                for side, d in zip(samples, got, strict=True):
                    for k, v in d.items():
                        side.setdefault(k, []).append(v)
    o, t = ({k: statistics.median(v) for k, v in side.items()} for side in samples)
    return o, t


def unet_total(per_step: dict[str, float], steps: int, n: int, k: int | None) -> float:
    """The UNet's seconds over ``steps`` steps at interval ``n`` (full steps at 0, n, 2n, ...)."""
    full = math.ceil(steps / n)
    shallow = per_step[f"unet_shallow.{k}"] if k is not None else 0.0
    return full * per_step["unet"] + (steps - full) * shallow


def preset_unet(model: str) -> Any:
    """Only the preset's UNet, seeded random weights (the full-size text encoders and VAE are not needed for
    per-step costs, and their 3 GB would crowd a shared machine)."""
    from diffusers import UNet2DConditionModel

    from sdxl_trt.presets import PRESETS

    torch.manual_seed(PRESETS[model].seed * 100 + 1)
    return UNet2DConditionModel.from_config(PRESETS[model].unet)


def end_to_end(pipe: Any, ref: Any, size: tuple[int, int], steps: int, runs: int) -> list[dict[str, Any]]:
    """Whole requests, ours and diffusers' pipeline (+ DeepCacheSDHelper at the same N and K), seconds."""
    from DeepCache import DeepCacheSDHelper

    from sdxl_trt.request import GenerationRequest

    w, h = size

    configs = [(1, None), *((n, k) for k in BRANCHES for n in INTERVALS)]
    requests = {c: GenerationRequest(prompt="a fox", width=w, height=h, steps=steps, seed=1, cache_interval=c[0],
                                     cache_branch=c[1]) for c in configs}

    def theirs(n: int, k: int | None) -> float:
        helper = DeepCacheSDHelper(pipe=ref)
        helper.set_params(cache_interval=n, cache_branch_id=k or 0)
        helper.enable()
        try:
            return _clock(lambda: ref(prompt="a fox", width=w, height=h, num_inference_steps=steps,
                                      generator=torch.Generator().manual_seed(1), output_type="np"))
        finally:
            helper.disable()

    samples: dict[tuple[int, int | None], tuple[list[float], list[float]]] = {c: ([], []) for c in configs}
    with torch.inference_mode():
        ref(prompt="a fox", width=w, height=h, num_inference_steps=2, output_type="np")  # diffusers' warm-up
        for c in configs:
            pipe.generate(requests[c])  # ours: each kind of step once
        for _ in range(runs):  # rounds over every row, so load drift spreads over all of them
            for c in configs:
                samples[c][0].append(_clock(lambda c=c: pipe.generate(requests[c])))
                samples[c][1].append(theirs(*c))
    rows = [{"interval": n, "branch": k, "ours_s": statistics.median(samples[(n, k)][0]),
             "diffusers_s": statistics.median(samples[(n, k)][1])} for n, k in configs]
    for r in rows:
        r["speedup_vs_uncached"] = rows[0]["ours_s"] / r["ours_s"]
        r["diffusers_speedup_vs_uncached"] = rows[0]["diffusers_s"] / r["diffusers_s"]
        r["ratio_over_diffusers"] = r["diffusers_s"] / r["ours_s"]
    return rows


def unet_rows(ours: dict[str, float], theirs: dict[str, float], steps: int) -> list[dict[str, Any]]:
    rows = []
    for n, k in [(1, None), *((n, k) for k in BRANCHES for n in INTERVALS)]:
        o, d = unet_total(ours, steps, n, k), unet_total(theirs, steps, n, k)
        rows.append({"interval": n, "branch": k, "ours_unet_s": o, "diffusers_unet_s": d,
                     "ours_fraction": o / unet_total(ours, steps, 1, None),
                     "diffusers_fraction": d / unet_total(theirs, steps, 1, None), "ratio_over_diffusers": d / o})
    return rows


def targets(ours: dict[str, float], rows: list[dict[str, Any]], e2e: list[dict[str, Any]]) -> dict[str, Any]:
    n3 = next(r for r in rows if r["interval"] == 3 and r["branch"] == 0)
    out: dict[str, Any] = {
        "shallow_over_full_branch0": ours["unet_shallow.0"] / ours["unet"],
        "unet_fraction_n3_branch0": n3["ours_fraction"],
        "unet_ratio_over_diffusers_n3_branch0": n3["ratio_over_diffusers"],
        "unet_ratio_over_diffusers_uncached": rows[0]["ratio_over_diffusers"],
    }
    met = {"shallow <= 15% of full (branch 0)": out["shallow_over_full_branch0"] <= 0.15,
           "N=3 UNet time <= 0.45x": out["unet_fraction_n3_branch0"] <= 0.45,
           "UNet ratio over diffusers+DeepCache (N=3) >= uncached ratio":
               out["unet_ratio_over_diffusers_n3_branch0"] >= out["unet_ratio_over_diffusers_uncached"]}
    if e2e:
        e3 = next(r for r in e2e if r["interval"] == 3 and r["branch"] == 0)
        out["e2e_ratio_over_diffusers_n3_branch0"] = e3["ratio_over_diffusers"]
        out["e2e_ratio_over_diffusers_uncached"] = e2e[0]["ratio_over_diffusers"]
        met["end-to-end ratio over diffusers+DeepCache (N=3) >= uncached ratio"] = (
            e3["ratio_over_diffusers"] >= e2e[0]["ratio_over_diffusers"])
    out["met"] = met
    return out


def markdown(report: dict[str, Any]) -> str:
    a = report
    kind = ("engines (" + a["backend"] + ")") if a["source"] == "engines" else "export wrappers in eager PyTorch"
    lines = [f"# Step caching: {a['model']}, {a['size']}, {a['steps']} steps, {a['device']} "
             f"({a['cpu_cores']} cores, torch threads {a['torch_threads']}, load average {a['loadavg_start']:.1f} "
             f"at start, {a['loadavg_end']:.1f} at end)", "",
             f"Per-step: median of {a['calls']} interleaved round(s) of direct calls at B = 2 after "
             f"{a['warm_rounds'] or 'no'} untimed round(s) (0: one untimed full UNet call); ours = {kind}; "
             "diffusers' skip step = DeepCacheSDHelper primed by one full step.", "",
             "| UNet call | ours ms | diffusers(+DeepCache) ms |", "|---|---|---|"]
    for name, v in a["per_step_s"]["ours"].items():
        lines.append(f"| {name} | {v * 1000:.1f} | {a['per_step_s']['diffusers'][name] * 1000:.1f} |")
    lines += ["", f"UNet total over {a['steps']} steps (from the per-step costs):", "",
              "| N | branch | ours s | diffusers(+DeepCache) s | ours vs uncached | diffusers vs uncached | "
              "ours over diffusers |", "|---|---|---|---|---|---|---|"]
    for r in a["unet_rows"]:
        lines.append(f"| {r['interval']} | {'-' if r['branch'] is None else r['branch']} | {r['ours_unet_s']:.3f} | "
                     f"{r['diffusers_unet_s']:.3f} | {r['ours_fraction']:.2f}x | {r['diffusers_fraction']:.2f}x | "
                     f"{r['ratio_over_diffusers']:.2f}x |")
    if a["e2e_rows"]:
        lines += ["", f"End to end ({a['steps']} steps, median of {a['e2e_runs']} interleaved round(s) over all "
                  "rows, text encoders and VAE included):", "",
                  "| N | branch | ours s | diffusers(+DeepCache) s | ours speedup | diffusers speedup | "
                  "ours over diffusers |", "|---|---|---|---|---|---|---|"]
        for r in a["e2e_rows"]:
            lines.append(f"| {r['interval']} | {'-' if r['branch'] is None else r['branch']} | {r['ours_s']:.3f} | "
                         f"{r['diffusers_s']:.3f} | {r['speedup_vs_uncached']:.2f}x | "
                         f"{r['diffusers_speedup_vs_uncached']:.2f}x | {r['ratio_over_diffusers']:.2f}x |")
    t = a["targets"]
    lines += ["", f"Shallow step over full step at branch 0: {t['shallow_over_full_branch0']:.3f}; "
              f"N = 3 UNet time: {t['unet_fraction_n3_branch0']:.3f}x.", "",
              "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in t["met"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no plot")
        return
    panels = 2 if report["e2e_rows"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for k in BRANCHES:
        sel = [r for r in report["unet_rows"] if r["branch"] == k]
        line = ax.plot([r["interval"] for r in sel], [r["ours_fraction"] for r in sel], "o-", label=f"ours, branch {k}")
        ax.plot([r["interval"] for r in sel], [r["diffusers_fraction"] for r in sel], "x--",
                color=line[0].get_color(), label=f"diffusers+DeepCache, branch {k}")
    ax.axhline(0.45, color="grey", lw=0.8)
    ax.set_xlabel("cache interval N")
    ax.set_ylabel(f"UNet time over {report['steps']} steps vs uncached")
    ax.legend(fontsize=7)
    if report["e2e_rows"]:
        ax = axes[0][1]
        for k in BRANCHES:
            sel = [r for r in report["e2e_rows"] if r["branch"] == k]
            ax.plot([r["interval"] for r in sel], [r["speedup_vs_uncached"] for r in sel], "o-", label=f"branch {k}")
        ax.set_xlabel("cache interval N")
        ax.set_ylabel("end-to-end speedup vs uncached (ours)")
        ax.legend(fontsize=7)
    fig.suptitle(f"step caching: {report['model']} {report['size']} on {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--source", choices=["engines", "eager"], default="engines",
                    help="ours as built engines, or as the export wrappers in eager PyTorch (no build)")
    ap.add_argument("--backend", default="onnxruntime", help="engines: the backend to build")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=10, help="steps of the UNet total and of the end-to-end rows")
    ap.add_argument("--calls", type=int, default=5, help="timed direct UNet calls per kind of step")
    ap.add_argument("--warm-rounds", type=int, default=1,
                    help="untimed rounds first (0: one untimed full UNet call only, for the full size on a CPU)")
    ap.add_argument("--e2e-runs", type=int, default=1, help="timed runs per end-to-end row (0: none; engines only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdxl-trt-bench-stepcache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    from sdxl_trt.bench.baseline import load_diffusers
    from sdxl_trt.presets import SCHEDULER_CONFIG

    w, h = (int(v) for v in args.size.split("x"))
    load_start = os.getloadavg()[0]
    pipe = None
    if args.source == "engines":
        from sdxl_trt.engine.build import BuildOptions, build_engines
        from sdxl_trt.runtime.pipeline import Pipeline

        out_dir = args.work / f"{args.model}-{args.backend}"
        build_engines(BuildOptions(model=args.model, out=out_dir, backend=args.backend, precision="fp32",
                                   buckets=args.size, deepcache=BRANCHES))
        pipe = Pipeline.load(out_dir, device=args.device)
    e2e_wanted = pipe is not None and args.e2e_runs > 0
    # the whole model only for diffusers' pipeline (the bench's baseline: eager, SDPA, the model's Euler)
    ref = (load_diffusers(args.model, refiner=None, dtype=torch.float32, device=torch.device(args.device),
                          scheduler="euler").base if e2e_wanted else None)
    unet = ref.unet if ref is not None else preset_unet(args.model)
    unet.eval()
    x = unet_inputs(unet, (w, h))
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    calls = engine_calls(pipe, (w, h)) if pipe is not None else eager_calls(unet, x, BRANCHES)
    ours, theirs = step_seconds(calls, diffusers_round(unet, scheduler, x, BRANCHES), args.calls, args.warm_rounds)
    rows = unet_rows(ours, theirs, args.steps)
    e2e = end_to_end(pipe, ref, (w, h), args.steps, args.e2e_runs) if ref is not None else []
    report = {"model": args.model, "source": args.source, "backend": args.backend if pipe is not None else "torch eager",
              "device": args.device, "size": args.size, "steps": args.steps, "calls": args.calls, "warm_rounds": args.warm_rounds,
              "e2e_runs": args.e2e_runs if e2e else 0, "machine": platform.processor() or platform.machine(),
              "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg()[0], "per_step_s": {"ours": ours, "diffusers": theirs},
              "unet_rows": rows, "e2e_rows": e2e, "targets": targets(ours, rows, e2e)}
    stem = RESULTS / f"stepcache-{args.model}-{args.source}-{args.device}"
    RESULTS.mkdir(exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2))  # not with_suffix: "1.0" has a dot
    stem.with_name(stem.name + ".md").write_text(markdown(report))
    plot(report, stem.with_name(stem.name + ".png"))
    log.info("wrote %s.{json,md,png}\n%s", stem, markdown(report))


if __name__ == "__main__":
    main()
