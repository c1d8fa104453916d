"""LoRA switching per backend and per kind: the time one switch takes (base -> A, A -> B, B -> A with a kept
session or weights, back to base) and the time per image with and without a LoRA, side by side in one run.

Builds the model's engines for each backend once (random weights; speed does not depend on their values),
writes two random files of each kind (``--kinds``): diffusers-format LoRAs over every Linear/Conv layer of the
UNet and both text encoders (the heaviest case: a real style LoRA touches the attention layers only), and
kohya/LyCORIS LoCon, LoHa (CP cores on 3x3 convolutions), LoKr (a whole w1, w2 as a product or through a CP
core) and DoRA (LoRA factors + a magnitude per output channel) over the layers kohya trainers target; then
measures. The first kind's row is the baseline the others compare to. Writes ``lora-<model>-<device>.{json,md}``
to ``--out`` (default benchmarks/results/).

CPU on the tiny model::

    python benchmarks/bench_lora.py --model tiny --backends onnxruntime,torch --runs 3

GPU (full-size SDXL)::

    python benchmarks/bench_lora.py --model sdxl-base-1.0 --backends torch --device cuda --size 1024x1024 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


KOHYA_UNET = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
              "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
KOHYA_TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _split(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def _write_kohya(path: Path, kind: str, shapes: dict[str, dict[str, tuple[int, ...]]], weights: Any, *, rank: int,
                 seed: int) -> int:
    """A random kohya/LyCORIS file of ``kind`` (LoCon, LoHa, LoKr, DoRA) over the layers kohya trainers target;
    returns its layer count."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.05

    tensors: dict[str, torch.Tensor] = {}
    for component, layers in shapes.items():
        for name, shape in layers.items():
            module = name.removesuffix(".weight")
            if not module.endswith(KOHYA_UNET if component == "unet" else KOHYA_TE):
                continue
            te = module if module.startswith("text_model.") else f"text_model.{module}"
            key = KOHYA_PREFIX[component] + (module if component == "unet" else te).replace(".", "_")
            if component != "unet" and module.endswith("text_projection"):
                key = KOHYA_PREFIX[component] + "text_projection"
            out_f, in_f, kernel = shape[0], shape[1], tuple(shape[2:])
            cols = in_f * (kernel[0] * kernel[1] if kernel else 1)
            t: dict[str, torch.Tensor] = {"alpha": torch.tensor(float(rank) / 2)}
            if kind in ("LoCon", "DoRA"):
                t["lora_down.weight"], t["lora_up.weight"] = rand(rank, in_f, *kernel), rand(out_f, rank, *[1] * len(kernel))
            elif kind == "LoHa":
                for side in (1, 2):
                    if kernel not in ((), (1, 1)):
                        t[f"hada_t{side}"], t[f"hada_w{side}_a"] = rand(rank, rank, *kernel), rand(rank, out_f)
                        t[f"hada_w{side}_b"] = rand(rank, in_f)
                    else:
                        t[f"hada_w{side}_a"], t[f"hada_w{side}_b"] = rand(out_f, rank), rand(rank, cols)
            elif kind == "LoKr":
                (o1, o2), (i1, i2) = _split(out_f), _split(in_f)
                t["lokr_w1"] = rand(o1, i1)
                if kernel not in ((), (1, 1)):
                    t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = rand(rank, rank, *kernel), rand(rank, o2), rand(rank, i2)
                else:
                    t["lokr_w2_a"], t["lokr_w2_b"] = rand(o2, rank), rand(rank, cols // i1)
            if kind == "DoRA":
                w = weights[component][name].float()
                t["dora_scale"] = w.flatten(1).norm(dim=1).reshape(out_f, *[1] * (len(shape) - 1)) * 1.1
            tensors.update({f"{key}.{k}": v.contiguous() for k, v in t.items()})
    save_file(tensors, str(path))
    return len({k.partition(".")[0] for k in tensors})


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
    ap.add_argument("--kinds", default="LoRA,LoCon,LoHa,LoKr,DoRA",
                    help="LoRA (diffusers format, every layer: the baseline), LoCon, LoHa, LoKr, DoRA (kohya/LyCORIS)")
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
    modules = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    shapes = lora_weight_shapes(modules)
    weights = {c: {n: p.detach().cpu() for n, p in m.named_parameters()} for c, m in modules.items()}
    del base, modules
    loras = work / "loras"
    loras.mkdir()
    kinds = args.kinds.split(",")
    layers = {}
    for i, kind in enumerate(kinds):
        for j, ab in enumerate("AB"):
            path = loras / f"{kind}-{ab}.safetensors"
            if kind == "LoRA":
                _write_lora(path, shapes, rank=args.rank, seed=1 + j)
                layers[kind] = sum(len(v) for v in shapes.values())
            else:
                layers[kind] = _write_kohya(path, kind, shapes, weights, rank=args.rank, seed=10 * i + j)
    del weights

    rows = []
    for backend in args.backends.split(","):
        precision = "fp32" if args.device == "cpu" else "fp16"
        engines = work / backend
        build_engines(BuildOptions(model=args.model, out=engines, backend=backend, precision=precision,
                                   device=args.device, buckets=args.size or "all"))
        pipe = Pipeline.load(engines, device=args.device, lora_dirs=[loras])
        bucket = pipe.buckets[0]
        req = dict(prompt="a lighthouse at dusk", width=bucket.width, height=bucket.height, steps=args.steps, seed=1)
        pipe.generate(GenerationRequest(**req))  # warm caches (and capture graphs on CUDA)
        no_lora = None
        for kind in kinds:
            A, B = ((f"{kind}-A", 1.0),), ((f"{kind}-B", 1.0),)
            pipe.loras.read_set(A), pipe.loras.read_set(B)  # files read before timing: a switch, not a file read, is timed
            switches = {}
            for label, target in (("base -> A (first)", A), ("A -> B (first)", B), ("B -> A (kept)", A),
                                  ("A -> base", ())):
                switches[label] = pipe.loras.activate(target)
            per_image = {}
            for label, loras_set in (("no LoRA", ()), ("LoRA A", A)):
                if label == "no LoRA" and no_lora is not None:
                    per_image[label] = no_lora
                    continue
                pipe.loras.activate(loras_set)
                request = GenerationRequest(**req, loras=loras_set)
                pipe.generate(request)
                times = [_timed(lambda p=pipe, r=request: p.generate(r)) for _ in range(args.runs)]
                per_image[label] = statistics.median(times)
            no_lora = per_image["no LoRA"]
            pipe.loras.activate(())
            rows.append({"backend": backend, "precision": precision, "size": str(bucket), "kind": kind,
                         "layers": layers[kind], "switch_s": switches, "image_s": per_image})
            log.warning("%s %s: %s", backend, kind, rows[-1])

    report = {"model": args.model, "device": args.device, "platform": platform.platform(), "python": sys.version,
              "torch": torch.__version__, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "threads": torch.get_num_threads(), "lora_layers": layers, "rank": args.rank, "steps": args.steps,
              "runs": args.runs, "baseline": kinds[0], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lora-{args.model}-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    labels = list(rows[0]["switch_s"]) if rows else []
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    lines = [f"# LoRA switching per kind ({args.model}, {args.device}, rank {args.rank}, {args.steps} steps, "
             f"median of {args.runs}; baseline {kinds[0]})", "",
             f"{report['cpus']} CPUs, {report['threads']} torch threads, load average at the end {load} "
             "(other processes share the machine when it is above the CPU count).", "",
             "| backend | kind | layers | " + " | ".join(f"switch {k} (s)" for k in labels)
             + " | first switch vs baseline | image, no LoRA (s) | image, LoRA (s) |",
             "|---|---|---|" + "---|" * (len(labels) + 3)]
    for r in rows:
        first = next(x for x in rows if x["backend"] == r["backend"] and x["kind"] == kinds[0])
        ratio = r["switch_s"][labels[0]] / max(first["switch_s"][labels[0]], 1e-9)
        lines.append(f"| {r['backend']} {r['precision']} | {r['kind']} | {r['layers']} | "
                     + " | ".join(f"{r['switch_s'][k]:.3f}" for k in labels)
                     + f" | {ratio:.2f}x | {r['image_s']['no LoRA']:.3f} | {r['image_s']['LoRA A']:.3f} |")
    lines += ["", "LoRA: diffusers-format factors on all Linear/Conv layers; the others: kohya/LyCORIS files over the "
              "layers kohya trainers target. A switch computes every touched weight from the kept base (DoRA also "
              "renormalises it per output channel); ONNX Runtime then builds a session with those initializers, "
              "torch writes them in place.", "",
              f"Command: `python benchmarks/bench_lora.py --model {args.model} --backends {args.backends} "
              f"--device {args.device} --runs {args.runs} --kinds {args.kinds}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
