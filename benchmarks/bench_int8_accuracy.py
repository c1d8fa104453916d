"""INT8 accuracy against calibration effort: the trade-off behind ``--calibration-prompts/--calibration-steps``.

For each (prompts, steps) pair, ``build_int8_unet`` calibrates the UNet (default backend: PyTorch hooks) and the
INT8 file's noise prediction is compared with the FP32 file's on held-out inputs: the same held-out prompts for
every row (the shipped file's last ``--eval-prompts`` lines, another seed), so rows differ only in calibration.
Optionally the ONNX Runtime calibrator runs the same rows (``--backends torch,onnxruntime``).

CPU, tiny (the committed report)::

    python benchmarks/bench_int8_accuracy.py --model tiny --size 256x256 --grid 4x6,8x20,16x20,32x20,64x20

Writes ``benchmarks/results/int8-accuracy-<model>-<size>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_int8_accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", default="256x256")
    p.add_argument("--grid", default="4x6,8x20,16x20,32x20,64x20", help="PROMPTSxSTEPS,...")
    p.add_argument("--backends", default="torch")
    p.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts (the file's last lines)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import math

    import torch

    from sdxl_trt.contracts import component_specs
    from sdxl_trt.engine.int8 import build_int8_unet, collect_calibration_inputs, measure_error, read_prompts
    from sdxl_trt.export.loading import load_model, model_dims
    from sdxl_trt.export.onnx_export import export_onnx
    from sdxl_trt.export.wrappers import wrap_components

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    model = load_model(args.model, device=args.device)
    prompts = read_prompts()
    held_out_prompts = prompts[-args.eval_prompts:]
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-acc-"))
    fp32 = export_onnx(wrap_components(model)["unet"], component_specs(model_dims(model))["unet"], tmp / "unet.onnx",
                       precision=torch.float32)
    held_out = collect_calibration_inputs(model, held_out_prompts, steps=args.eval_steps, width=width, height=height,
                                          seed=10_000, max_samples=max(1, math.ceil(args.eval_steps / 4)) * len(held_out_prompts),
                                          what="held-out inputs")
    rows: list[dict[str, Any]] = []
    for cell in args.grid.split(","):
        n_prompts, steps = (int(v) for v in cell.split("x"))
        if n_prompts > len(prompts) - args.eval_prompts:
            raise SystemExit(f"{n_prompts} calibration prompts overlap the {args.eval_prompts} held-out ones")
        for backend in args.backends.split(","):
            out = tmp / f"unet.int8.{backend}.{cell}.onnx"
            t = time.perf_counter()
            report = build_int8_unet(model, fp32, out, num_prompts=n_prompts, steps=steps, width=width, height=height,
                                     num_eval_prompts=0, backend=backend)
            seconds = time.perf_counter() - t
            err = measure_error(fp32, out, held_out)
            rows.append({"prompts": n_prompts, "steps": steps, "backend": backend,
                         "calibration_samples": report.calibration_samples, "calibration_s": report.collection_seconds,
                         "total_s": seconds, "error": err})
            log.info("%s %s: rel. L2 %.4f (max %.4f), cosine min %.5f, %.0f s", cell, backend,
                     err["relative_l2_mean"], err["relative_l2_max"], err["cosine_min"], seconds)
            for f in tmp.glob(out.name + "*"):
                f.unlink()
    report_json = {
        "what": "INT8 UNet noise_pred vs FP32 on held-out inputs, by calibration prompts x steps",
        "model": args.model, "size": args.size, "device": args.device, "threads": args.threads,
        "held_out": {"prompts": held_out_prompts, "steps": args.eval_steps, "samples": len(held_out), "seed": 10_000},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_int8_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    name = f"int8-accuracy-{args.model}-{args.size}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report_json, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report_json))
    log.info("wrote %s.{json,md}", RESULTS / name)
    return 0


def markdown(report: dict[str, Any]) -> str:
    held = report["held_out"]
    lines = [
        f"# INT8 accuracy by calibration effort ({report['model']}, {report['size']}, {report['device']})",
        "",
        f"{report['date']}. Held out: {held['samples']} UNet inputs from {len(held['prompts'])} prompts the "
        f"calibration never sees ({held['steps']} steps, seed {held['seed']}). Calibration samples: 2 UNet calls per "
        "prompt, spread over the schedule. Noise-prediction error of the INT8 UNet against FP32 (ONNX Runtime, CPU). "
        "Wall times on a shared CPU are indicative only.",
        "",
        f"`{report['command']}`",
        "",
        "| prompts x steps | backend | calibration samples | rel. L2 mean | rel. L2 max | cosine min | calibration (s) |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['prompts']} x {r['steps']} | {r['backend']} | {r['calibration_samples']} | "
          f"{r['error']['relative_l2_mean']:.4f} | {r['error']['relative_l2_max']:.4f} | "
          f"{r['error']['cosine_min']:.5f} | {r['calibration_s']:.0f} |" for r in report["rows"]),
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
