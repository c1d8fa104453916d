"""``sdxl-trt bench``: flags -> :class:`~sdxl_trt.bench.runner.BenchOptions`, run, write the report, print it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sdxl_trt.errors import InvalidRequestError
from sdxl_trt.samplers import SCHEDULERS

if TYPE_CHECKING:
    from sdxl_trt.bench.runner import BenchOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end benchmark of an engine directory (optionally against diffusers)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, help="engine directory made by `sdxl-trt build`")
    p.add_argument("--out", required=True, help="folder for the report (JSON + Markdown, and a PNG with matplotlib)")
    p.add_argument("--baseline", default=None, help="also time diffusers' SDXL pipeline on this model's weights "
                   "(the preset or path the engines were built from); enables the fp32 reference")
    p.add_argument("--baseline-refiner", default=None, help="the refiner for the baseline (default: the engines')")
    p.add_argument("--sizes", default=None, help="WxH,... built buckets to time (default: the first built bucket)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", type=int, default=5, help="timed runs per row")
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs per row after Pipeline.warmup")
    p.add_argument("--batches", default="1", help="images per request for the throughput table, e.g. 1,2,4")
    p.add_argument("--refiner-mode", choices=["none", "ensemble", "img2img"], default="none",
                   help="add a row with the refiner per size")
    p.add_argument("--refiner-start", type=float, default=0.8)
    p.add_argument("--refiner-strength", type=float, default=0.3)
    p.add_argument("--scheduler", default="euler", metavar="NAME", help=f"one of {', '.join(SCHEDULERS)}")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch engines: load with Inductor compile")
    p.add_argument("--no-reference", action="store_true", help="skip the fp32 reference run (no image error)")
    p.add_argument("--no-step-split", action="store_true",
                   help="skip the event-timed per-step figure (a second run set at half the steps)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="step caching (engines built with --deepcache): a full UNet step every N steps, the shallow "
                   "step between; the --baseline runs diffusers with DeepCacheSDHelper at the same N and branch")
    p.add_argument("--cache-branch", type=int, default=None, metavar="K",
                   help="the cache branch of --cache-interval (default: the lowest the engines were built with)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; the report says)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG plot (JSON and Markdown only)")
    p.add_argument("--name", default=None, help="report file name without suffix (default: from the engines)")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidRequestError(f"--{what} takes comma-separated integers, got {text!r}", param=what) from None
    if not values or min(values) < 1:
        raise InvalidRequestError(f"--{what} takes positive integers, got {text!r}", param=what)
    return values


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    from sdxl_trt.bench.runner import BenchOptions

    return BenchOptions(
        engines=Path(args.engines), out=Path(args.out),
        sizes=tuple(s.strip() for s in args.sizes.split(",") if s.strip()) if args.sizes else (),
        steps=args.steps, runs=args.runs, warmup_runs=args.warmup_runs, batches=_ints(args.batches, "batches"),
        baseline=args.baseline, baseline_refiner=args.baseline_refiner,
        refiner_mode=None if args.refiner_mode == "none" else args.refiner_mode, refiner_start=args.refiner_start,
        refiner_strength=args.refiner_strength, device=args.device, compile=args.compile, scheduler=args.scheduler,
        guidance=args.guidance, seed=args.seed, reference=not args.no_reference, step_split=not args.no_step_split,
        threads=args.threads, name=args.name, cache_interval=args.cache_interval, cache_branch=args.cache_branch,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from sdxl_trt.bench.report import markdown, write_report
    from sdxl_trt.bench.runner import run_bench

    opts = options_from_args(args)
    plot = not args.no_plot

    def checkpoint(partial: dict) -> None:  # a later phase may be stopped: keep what is measured so far
        write_report(partial, opts.out, opts.name, plot=False)

    report = run_bench(opts, checkpoint=checkpoint)
    paths = write_report(report, opts.out, opts.name, plot=plot)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None))
    return 0
