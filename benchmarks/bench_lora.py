"""LoRA switching per backend: the time one switch takes (base -> A, A -> B, B -> A with a kept session or
weights, back to base) and the time per image with and without a LoRA, side by side in one run.

Builds the model's engines for each backend once (random weights; speed does not depend on their values),
writes two random LoRAs over every Linear/Conv layer of the UNet and both text encoders (the heaviest case:
a real style LoRA touches the attention layers only), then measures. Writes
``lora-<model>-<device>.{json,md}`` to ``--out`` (default benchmarks/results/).

CPU on the tiny model::

    python benchmarks/bench_lora.py --model tiny --backends onnxruntime,torch --runs 5

GPU (full-size SDXL)::

    python benchmarks/bench_lora.py --model sdxl-base-1.0 --backends torch --device cuda --size 1024x1024 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_lora")


def _write_lora(path: Path, shapes: dict[str, dict[str, tuple[int, ...]]], *, rank: int, seed: int) -> None:
    """A diffusers-format LoRA on every LoRA-able weight (random factors)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, weights in shapes.items():
        for name, shape in weights.items():
            module = name.removesuffix(".weight")
            if component != "unet" and not module.startswith("text_model."):
                module = f"text_model.{module}"  # LoRA files name CLIP's text_model level
            out_f, in_f = shape[0], int(torch.tensor(shape[1:]).prod())
            down = torch.randn((rank, *shape[1:]) if len(shape) == 4 else (rank, in_f), generator=g) * 0.01
            up = torch.randn((out_f, rank, 1, 1) if len(shape) == 4 else (out_f, rank), generator=g) * 0.01
            tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path))


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default=None, help="WxH (default: the model's first bucket)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.export.loading import load_model
    from sdxl_trt.lora import lora_weight_shapes
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    base = load_model(args.model, device=args.device)
    shapes = lora_weight_shapes({"unet": base.unet, "text_encoder": base.text_encoder,
                                 "text_encoder_2": base.text_encoder_2})
    del base
    loras = work / "loras"
    loras.mkdir()
    _write_lora(loras / "A.safetensors", shapes, rank=args.rank, seed=1)
    _write_lora(loras / "B.safetensors", shapes, rank=args.rank, seed=2)
    n_layers = sum(len(v) for v in shapes.values())

    rows = []
    for backend in args.backends.split(","):
        precision = "fp32" if args.device == "cpu" else "fp16"
        engines = work / backend
        build_engines(BuildOptions(model=args.model, out=engines, backend=backend, precision=precision,
                                   device=args.device, buckets=args.size or "all"))
        pipe = Pipeline.load(engines, device=args.device, lora_dirs=[loras])
        bucket = pipe.buckets[0]
        req = dict(prompt="a lighthouse at dusk", width=bucket.width, height=bucket.height, steps=args.steps, seed=1)
        A, B = (("A", 1.0),), (("B", 1.0),)
        pipe.generate(GenerationRequest(**req))  # warm caches (and capture graphs on CUDA)
        pipe.loras.read_set(A), pipe.loras.read_set(B)  # files read before timing: a switch, not a file read, is timed
        switches = {}
        for label, target in (("base -> A (first)", A), ("A -> B (first)", B), ("B -> A (kept)", A),
                              ("A -> base", ())):
            switches[label] = pipe.loras.activate(target)
        per_image = {}
        for label, loras_set in (("no LoRA", ()), ("LoRA A", A)):
            pipe.loras.activate(loras_set)
            request = GenerationRequest(**req, loras=loras_set)
            pipe.generate(request)
            times = [_timed(lambda p=pipe, r=request: p.generate(r)) for _ in range(args.runs)]
            per_image[label] = statistics.median(times)
        rows.append({"backend": backend, "precision": precision, "size": str(bucket), "switch_s": switches,
                     "image_s": per_image})
        log.warning("%s: %s", backend, rows[-1])

    report = {"model": args.model, "device": args.device, "platform": platform.platform(), "python": sys.version,
              "torch": torch.__version__, "lora_layers": n_layers, "rank": args.rank, "steps": args.steps,
              "runs": args.runs, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lora-{args.model}-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    labels = list(rows[0]["switch_s"]) if rows else []
    lines = [f"# LoRA switching ({args.model}, {args.device}, {n_layers} LoRA layers of rank {args.rank}, "
             f"{args.steps} steps, median of {args.runs})", "",
             "| backend | size | " + " | ".join(f"switch {k} (s)" for k in labels)
             + " | image, no LoRA (s) | image, LoRA (s) |",
             "|---|---|" + "---|" * (len(labels) + 2)]
    for r in rows:
        lines.append(f"| {r['backend']} {r['precision']} | {r['size']} | "
                     + " | ".join(f"{r['switch_s'][k]:.3f}" for k in labels)
                     + f" | {r['image_s']['no LoRA']:.3f} | {r['image_s']['LoRA A']:.3f} |")
    lines += ["", f"Command: `python benchmarks/bench_lora.py --model {args.model} --backends {args.backends} "
              f"--device {args.device} --runs {args.runs}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
