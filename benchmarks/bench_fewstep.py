"""Few-step recipes against the usual 30 guided steps: time per image at 1, 2, 4 and 8 steps for each family's
recipe (sampler, spacing or timesteps, guidance; ../shared/SDXL_FACTS.md "Few-step recipes"), and the speedup.

The recipes run on the model given (random weights: speed does not depend on weight values, and no distilled
checkpoint is downloaded); the guidance-embedding LCM UNet runs on ``--lcm-model`` (default ``tiny-lcm``).
Writes ``fewstep-<model>-<backend>-<precision>-<device>.{json,md}`` to ``benchmarks/results/``.

CPU on the tiny model::

    python benchmarks/bench_fewstep.py --model tiny --runs 5

GPU (full-size SDXL; LCM-distilled SDXL's UNet shape for the guidance-embedding row)::

    python benchmarks/bench_fewstep.py --model sdxl-base-1.0 --lcm-model none --backend torch --precision fp16 \\
        --device cuda --size 1024x1024 --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = (1, 2, 4, 8)
log = logging.getLogger("bench_fewstep")


@dataclass(frozen=True)
class Recipe:
    """One family's recipe: the request fields it sets (per step count where the schedule is explicit)."""

    family: str
    scheduler: str
    guidance: float = 0.0
    spacing: str | None = None
    eta: float | None = None
    timesteps: dict[int, tuple[int, ...]] = field(default_factory=dict)  # steps -> explicit schedule
    steps: tuple[int, ...] = STEPS  # the step counts the recipe defines
    lcm_unet: bool = False  # runs on the guidance-embedding model
    note: str = ""

    def request_fields(self, steps: int) -> dict[str, Any] | None:
        """GenerationRequest fields for ``steps`` (None: the recipe has no such step count)."""
        if steps not in self.steps or (self.timesteps and steps not in self.timesteps):
            return None
        fields: dict[str, Any] = {"scheduler": self.scheduler, "guidance_scale": self.guidance, "steps": steps}
        if self.timesteps:
            fields["timesteps"] = self.timesteps[steps]
        if self.spacing:
            fields["timestep_spacing"] = self.spacing
        if self.eta is not None:
            fields["eta"] = self.eta
        return fields

    def command(self) -> str:
        """The recipe as an ``sdxl-trt run`` command (for the report)."""
        parts = [f"--scheduler {self.scheduler}", f"--guidance {self.guidance:g}"]
        if self.timesteps:
            parts.append("--timesteps " + ",".join(map(str, max(self.timesteps.items())[1])))
        else:
            parts.append(f"--steps {4 if 4 in self.steps else self.steps[0]}")
        if self.spacing:
            parts.append(f"--timestep-spacing {self.spacing}")
        if self.eta is not None:
            parts.append(f"--eta {self.eta:g}")
        return " ".join(parts)


RECIPES = (
    Recipe("SDXL-Turbo", "euler_a", spacing="trailing"),
    Recipe("SDXL-Lightning", "euler", spacing="trailing"),
    Recipe("LCM-LoRA", "lcm"),
    Recipe("LCM-distilled UNet", "lcm", guidance=7.0, lcm_unet=True, note="guidance embedding, no CFG batch"),
    Recipe("Hyper-SD", "ddim", spacing="trailing"),
    Recipe("Hyper-SD 1-step", "tcd", eta=1.0, steps=(1,)),
    Recipe("DMD2", "lcm", timesteps={1: (399,), 4: (999, 749, 499, 249)}),
    Recipe("TCD", "tcd", eta=0.3),
)
BASELINE = {"scheduler": "euler", "guidance_scale": 5.0, "steps": 30}


def time_request(pipe: Any, fields: dict[str, Any], *, size: tuple[int, int], runs: int) -> dict[str, float]:
    """Median and best seconds per image over ``runs`` timed calls after one warm-up."""
    from sdxl_trt.request import GenerationRequest

    req = GenerationRequest(prompt="a lighthouse on a cliff at dusk, photograph", width=size[0], height=size[1],
                            seed=0, **fields)
    pipe.generate(req)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pipe.generate(req)
        times.append(time.perf_counter() - t0)
    return {"p50_s": statistics.median(times), "min_s": min(times)}


def build(model: str, args: argparse.Namespace, root: Path) -> Path:
    from sdxl_trt.engine.build import BuildOptions, build_engines

    out = root / model
    build_engines(BuildOptions(model=model, out=out, backend=args.backend, precision=args.precision, buckets=args.size,
                               max_batch=1, device=args.device))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--lcm-model", default="tiny-lcm", help="guidance-embedding model for the LCM UNet row, or 'none'")
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp16", "int8", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="256x256")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sdxl_trt").setLevel(logging.WARNING)

    from sdxl_trt.runtime.pipeline import Pipeline

    width, height = (int(v) for v in args.size.split("x"))
    size = (width, height)
    root = Path(tempfile.mkdtemp(prefix="bench-fewstep-"))
    pipes = {"base": Pipeline.load(build(args.model, args, root), device=args.device)}
    if args.lcm_model != "none":
        pipes["lcm"] = Pipeline.load(build(args.lcm_model, args, root), device=args.device)

    baseline = time_request(pipes["base"], BASELINE, size=size, runs=args.runs)
    log.info("baseline euler 30 steps guidance 5: %.3f s", baseline["p50_s"])
    rows = []
    for recipe in RECIPES:
        pipe = pipes.get("lcm" if recipe.lcm_unet else "base")
        if pipe is None:
            continue
        row: dict[str, Any] = {"family": recipe.family, "command": recipe.command(), "note": recipe.note, "steps": {}}
        for steps in STEPS:
            fields = recipe.request_fields(steps)
            if fields is None:
                continue
            t = time_request(pipe, fields, size=size, runs=args.runs)
            t["speedup"] = baseline["p50_s"] / t["p50_s"]
            row["steps"][steps] = t
            log.info("%s %d steps: %.3f s (%.1fx)", recipe.family, steps, t["p50_s"], t["speedup"])
        rows.append(row)

    name = f"fewstep-{args.model}-{args.backend}-{args.precision}-{args.device}"
    report = {"model": args.model, "lcm_model": args.lcm_model, "backend": args.backend, "precision": args.precision,
              "device": args.device, "size": args.size, "runs": args.runs, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1),
              "baseline": {**BASELINE, **baseline}, "recipes": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def rewrite_markdown(json_path: Path) -> None:
    """Write the Markdown report again from a JSON report (after a change of format, without re-measuring)."""
    json_path.with_suffix(".md").write_text(markdown(json.loads(json_path.read_text())))


def markdown(report: dict[str, Any]) -> str:
    b = report["baseline"]
    lines = [
        f"# Few-step recipes: {report['model']} ({report['backend']} {report['precision']}, {report['device']}, "
        f"{report['size']}, median of {report['runs']})",
        "",
        f"Baseline: euler, {b['steps']} steps, guidance {b['guidance_scale']:g} (CFG): **{b['p50_s']:.3f} s** per image "
        f"(best {b['min_s']:.3f} s).",
        "Each cell: seconds per image (median), the speedup of the medians over the baseline's, and of the best runs "
        "(less sensitive to a loaded machine); guidance off unless stated.",
        f"Machine: {report.get('cpus')} CPUs, load average {report.get('load_average')} at the end of the run (shared "
        "machines inflate absolute times; the ratios are what carries over).",
        "",
        "| recipe | flags | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for row in report["recipes"]:
        cells = []
        for s in STEPS:
            t = row["steps"].get(s) or row["steps"].get(str(s))
            cells.append(f"{t['p50_s']:.3f} s, {t['speedup']:.1f}x (best {b['min_s'] / t['min_s']:.1f}x)" if t else "—")
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['family']}{note} | `{row['command']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
