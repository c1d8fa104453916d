"""End-to-end benchmark, the one-script form: build engines (unless ``--engines``), then ``sdxl-trt bench``.

Everything is measured by :mod:`sdxl_trt.bench` (``sdxl-trt bench --help`` lists the flags, which pass through);
this script only adds the build and this repository's defaults: the report goes to ``benchmarks/results/``, the
baseline is diffusers on ``--model`` and, with ``--refiner``, a refiner ensemble row is added.

GPU (the headline; or ``bash benchmarks/gpu_acceptance.sh`` on a bare GPU machine)::

    python benchmarks/bench_e2e.py --model sdxl-base-1.0 --backend torch --precision fp16 --device cuda \\
        --sizes 1024x1024 --steps 30 --runs 3

CPU on the tiny model::

    python benchmarks/bench_e2e.py --model tiny --refiner tiny-refiner --sizes 256x256,384x192 --steps 30 --runs 5 \\
        --batches 1,2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--refiner", default=None)
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp16", "int8", "fp32"])
    p.add_argument("--engines", default=None, help="built engines (default: build into a temporary folder)")
    p.add_argument("--no-baseline", action="store_true")
    args, rest = p.parse_known_args(argv)
    peek = argparse.ArgumentParser(add_help=False)  # flags the build needs too; they still pass through
    for flag, default in (("--sizes", "256x256"), ("--batches", "1"), ("--device", None), ("--out", None)):
        peek.add_argument(flag, default=default)
    peek.add_argument("--compile", action="store_true")
    seen, _ = peek.parse_known_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    engines = Path(args.engines) if args.engines else Path(tempfile.mkdtemp(prefix="bench-engines-"))
    if not args.engines:
        from sdxl_trt.engine.build import BuildOptions, build_engines

        build_engines(BuildOptions(model=args.model, refiner=args.refiner, out=engines, backend=args.backend,
                                   precision=args.precision, buckets=seen.sizes,
                                   max_batch=max(int(b) for b in seen.batches.split(",")),
                                   device=seen.device or "cpu", compile_torch=seen.compile))
    from sdxl_trt.cli import main as cli

    extra = ["--engines", str(engines)]
    extra += [] if seen.out else ["--out", str(RESULTS)]
    extra += [] if "--sizes" in rest else ["--sizes", seen.sizes]
    extra += [] if args.no_baseline or "--baseline" in rest else ["--baseline", args.model]
    if args.refiner and "--refiner-mode" not in rest:
        extra += ["--refiner-mode", "ensemble"]
    return cli(["bench", *extra, *rest])


if __name__ == "__main__":
    sys.exit(main())
