"""``sdxl-trt bench``: flags (parsed in sdxl_trt/cli.py) to :class:`BenchOptions`, run, write, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdxl_trt.errors import InvalidRequestError

from .report import markdown, write_report
from .runner import BenchOptions, run_bench


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidRequestError(f"--{what} takes comma-separated integers, got {text!r}", param=what) from None
    if not values or min(values) < 1:
        raise InvalidRequestError(f"--{what} takes positive integers, got {text!r}", param=what)
    return values


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        engines=Path(args.engines), out=Path(args.out),
        sizes=tuple(s.strip() for s in args.sizes.split(",") if s.strip()) if args.sizes else (),
        steps=args.steps, runs=args.runs, warmup_runs=args.warmup_runs, batches=_ints(args.batches, "batches"),
        baseline=args.baseline, baseline_refiner=args.baseline_refiner,
        refiner_mode=None if args.refiner_mode == "none" else args.refiner_mode, refiner_start=args.refiner_start,
        refiner_strength=args.refiner_strength, device=args.device, compile=args.compile, scheduler=args.scheduler,
        guidance=args.guidance, seed=args.seed, reference=not args.no_reference, step_split=not args.no_step_split,
        threads=args.threads, name=args.name,
    )


def bench_from_args(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    plot = not args.no_plot

    def checkpoint(partial: dict) -> None:  # a later phase may be stopped: keep what is measured so far
        write_report(partial, opts.out, opts.name, plot=False)

    report = run_bench(opts, checkpoint=checkpoint)
    paths = write_report(report, opts.out, opts.name, plot=plot)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None))
    return 0
