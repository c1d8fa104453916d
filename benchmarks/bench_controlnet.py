"""What ControlNet costs per step: time per image with none, one and two ControlNets, ours against diffusers'
eager SDXL ControlNet pipeline on the same weights in the same run.

One engine directory holds the base model and two ControlNets (``--controlnet`` twice); the "none" row runs that
same directory without ControlNets (its UNet takes zero residuals), and a plain build of the model gives the
UNet without residual inputs, so the report also shows what building for ControlNet costs a request that uses
none. Writes ``controlnet-<model>-<backend>-<precision>-<device>.{json,md,png}`` to ``benchmarks/results/``.

CPU on the tiny model::

    python benchmarks/bench_controlnet.py --model tiny --runs 5

GPU (full-size SDXL and full-size ControlNets with random weights; no diffusers on the GPU machine)::

    python benchmarks/bench_controlnet.py --model sdxl-base-1.0 --controlnet sdxl-controlnet --backend torch \\
        --precision fp16 --device cuda --size 1024x1024 --steps 30 --baseline none
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a lighthouse on a cliff at dusk, photograph"
log = logging.getLogger("bench_controlnet")


def control_images(size: tuple[int, int]) -> list[Any]:
    """Two fixed control maps (a grid of edges, a gradient) at the image size."""
    import numpy as np
    from PIL import Image

    w, h = size
    edges = np.zeros((h, w, 3), np.uint8)
    edges[::16, :] = 255
    edges[:, ::16] = 255
    ramp = np.repeat(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], h, 0).repeat(3, 2)
    return [Image.fromarray(edges), Image.fromarray(ramp)]


CASES = ("0 ControlNets", "1 ControlNet", "2 ControlNets")
"""Row names by the number of ControlNets a request uses."""


def timed(fn: Any, runs: int, device: str) -> dict[str, Any]:
    """Latency summary (``p50_s``, ``min_s``, ...) of ``fn`` over ``runs`` calls after one warm-up call, timed
    as ``sdxl-trt bench`` times (synchronised at both ends, CUDA events on a GPU)."""
    import torch

    from sdxl_trt.bench.measure import latency_summary
    from sdxl_trt.bench.measure import timed as timed_once

    fn()
    dev = torch.device(device)
    return latency_summary([timed_once(fn, dev)[0] for _ in range(runs)])


def ours(args: argparse.Namespace, root: Path, size: tuple[int, int]) -> dict[str, dict[str, Any]]:
    from sdxl_trt.engine.build import BuildOptions, build_engines
    from sdxl_trt.request import ControlNetUnit, GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    common = dict(model=args.model, backend=args.backend, precision=args.precision, buckets=args.size, max_batch=1,
                  device=args.device)
    plain_dir, cn_dir = Path(args.plain_engines) if args.plain_engines else root / "plain", root / "controlnet"
    if not args.plain_engines:
        build_engines(BuildOptions(out=plain_dir, **common))
    build_engines(BuildOptions(out=cn_dir, controlnets=(f"{args.controlnet}:a", f"{args.controlnet}:b"), **common))
    images = control_images(size)
    base = dict(prompt=PROMPT, width=size[0], height=size[1], steps=args.steps, guidance_scale=5.0, seed=0)
    out = {}
    plain = Pipeline.load(plain_dir, device=args.device)
    out["plain engines, no ControlNet"] = timed(lambda p=plain: p.generate(GenerationRequest(**base)), args.runs,
                                                args.device)
    del plain  # its engines' memory, before the ControlNet build's load
    pipe = Pipeline.load(cn_dir, device=args.device)
    for k in (0, 1, 2):
        units = tuple(ControlNetUnit(n, im, scale=0.8) for n, im in zip("ab", images, strict=True))[:k]
        req = GenerationRequest(**base, controlnets=units)
        out[CASES[k]] = timed(lambda r=req: pipe.generate(r), args.runs, args.device)
        log.info("ours, %s: %.3f s", CASES[k], out[CASES[k]]["p50_s"])
    return out


def diffusers_baseline(args: argparse.Namespace, size: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """diffusers' StableDiffusionXLPipeline and StableDiffusionXLControlNetPipeline (one and two ControlNets) on
    the same PyTorch weights, eager."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from sdxl_trt.export.controlnet import load_controlnet
    from sdxl_trt.export.loading import load_model

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    base = load_model(args.model, dtype=dtype, device=args.device)
    nets = [load_controlnet(args.controlnet, base_unet=dict(base.unet.config), dtype=dtype, device=args.device)
            for _ in range(2)]
    common = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                  tokenizer=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer")),
                  tokenizer_2=CLIPTokenizer.from_pretrained(str(base.config_dir / "tokenizer_2")), unet=base.unet,
                  scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(base.config_dir / "scheduler")),
                  add_watermarker=False)
    images = control_images(size)
    call = dict(prompt=PROMPT, width=size[0], height=size[1], num_inference_steps=args.steps, guidance_scale=5.0,
                output_type="pil")
    out = {}
    with torch.no_grad():
        plain = diffusers.StableDiffusionXLPipeline(**common)
        plain.set_progress_bar_config(disable=True)
        out[CASES[0]] = timed(lambda: plain(**call, generator=torch.Generator().manual_seed(0)), args.runs,
                              args.device)
        for k in (1, 2):
            net = nets[0] if k == 1 else diffusers.models.controlnets.MultiControlNetModel(nets)
            pipe = diffusers.StableDiffusionXLControlNetPipeline(controlnet=net, **common)
            pipe.set_progress_bar_config(disable=True)
            image = images[0] if k == 1 else images
            scale = 0.8 if k == 1 else [0.8, 0.8]
            out[CASES[k]] = timed(lambda p=pipe, i=image, s=scale: p(**call, image=i, controlnet_conditioning_scale=s,
                                                                  generator=torch.Generator().manual_seed(0)),
                                  args.runs, args.device)
            log.info("diffusers, %s: %.3f s", CASES[k], out[CASES[k]]["p50_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--controlnet", default="tiny-controlnet", help="a ControlNet preset or local path (built twice)")
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--baseline", default="diffusers", choices=["diffusers", "none"])
    p.add_argument("--plain-engines", help="an engine directory of the same model without ControlNets (else built)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", help="report file name (default controlnet-<model>-<backend>-<precision>-<device>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sdxl_trt").setLevel(logging.WARNING)

    width, height = (int(v) for v in args.size.split("x"))
    size = (width, height)
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as work:  # the engines it builds: GBs at full size
        rows = {"sdxl-trt": ours(args, Path(work), size)}
    if args.baseline == "diffusers":
        rows["diffusers eager"] = diffusers_baseline(args, size)
    report = {"model": args.model, "controlnet": args.controlnet, "backend": args.backend,
              "precision": args.precision, "device": args.device, "size": args.size, "steps": args.steps,
              "runs": args.runs, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average": round(os.getloadavg()[0], 1), "rows": rows}
    name = args.name or f"controlnet-{args.model}-{args.backend}-{args.precision}-{args.device}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
    print(markdown(report))
    return 0


def per_step_ms(row: dict[str, dict[str, Any]], key: str, steps: int) -> float | None:
    """Milliseconds each step pays for ``key``'s ControlNets over the same run without any."""
    if key not in row or CASES[0] not in row or key == CASES[0]:
        return None
    return 1000 * (row[key]["p50_s"] - row[CASES[0]]["p50_s"]) / steps


def markdown(report: dict[str, Any]) -> str:
    steps = report["steps"]
    lines = [
        f"# ControlNet cost: {report['model']} + {report['controlnet']} ({report['backend']} {report['precision']}, "
        f"{report['device']}, {report['size']}, {steps} steps, guidance 5, median of {report['runs']})",
        "",
        "Seconds per image (median, best in brackets), and what the ControlNets add to each step over the same "
        "implementation without them. `plain engines` is a build without --controlnet (a UNet with no residual "
        "inputs); `0 ControlNets` runs the ControlNet build with none (zero residuals).",
        f"Machine: {report.get('cpus')} CPUs, load average {report.get('load_average')} at the end (shared machines "
        "inflate absolute times; compare within the run).",
        "",
        "| implementation | case | s / image | added ms / step |",
        "|---|---|---|---|",
    ]
    for impl, row in report["rows"].items():
        for key, t in row.items():
            added = per_step_ms(row, key, steps)
            lines.append(f"| {impl} | {key} | {t['p50_s']:.3f} ({t['min_s']:.3f}) | "
                         f"{'—' if added is None else f'{added:+.1f}'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(CASES)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(report["rows"])
    for i, (impl, row) in enumerate(report["rows"].items()):
        xs = [c + i * width for c in range(len(cases))]
        ax.bar(xs, [row[c]["p50_s"] if c in row else 0 for c in cases], width, label=impl)
    ax.set_xticks([c + width * (len(report["rows"]) - 1) / 2 for c in range(len(cases))], cases)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title(f"{report['model']}, {report['size']}, {report['steps']} steps, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
