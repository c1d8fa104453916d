"""INT8 / FP8 calibration + Q/DQ writing: peak host memory and wall time, the bounded path beside ONNX Runtime's.

Each configuration (model, size, calibration backend) runs in its own process, so every peak is that
configuration's own: the child loads the model, then runs ``build_int8_unet`` (calibration on a few prompts and
steps, then the Q/DQ file; no held-out error, which is not part of calibration) and reports its peak resident set
(``ru_maxrss``), the peak of each phase (Linux's ``/proc/self/clear_refs`` resets the high-water mark between
them), the peak device memory on a GPU, and the wall times. Before that it measures one UNet forward's activation
volume (the bytes of every leaf module's output), which is what ONNX Runtime's calibrator holds on the host per
sample: a configuration of the old path that would not fit in this machine's memory is recorded as not run, with
the estimate (old-path peak measured on tiny, scaled by activation volume), instead of being started.

The FP32 UNet ONNX each configuration reads is exported first (in another process, not measured). For the
full-size base UNet the export uses a copy of the UNet whose weights are views into one random buffer: the
exporter then holds one copy of the weights (10 GB) instead of two, which a 24 GiB machine can afford; the Q/DQ
writing reads and writes the same bytes as with the real weights, and calibration runs the real (random-weight)
``sdxl-base-1.0`` pipeline. So the full-size row measures memory and time, not accuracy.

CPU (the committed report)::

    python benchmarks/bench_int8_memory.py --configs tiny:256x256,tiny:1024x1024,sdxl-base-1.0:512x512:1x2x2 \\
        --prompts 2 --steps 4 --samples 4

GPU (``--device cuda``; add ``sdxl-base-1.0:1024x1024``).

FP8 beside INT8 (``--formats``: the same bounded path writing E4M3 Q/DQ; ``fp8-attention`` also observes every
attention's matmul inputs inside ``scaled_dot_product_attention``; torch backend only)::

    python benchmarks/bench_int8_memory.py --configs tiny:256x256,tiny:1024x1024 --backends torch \
        --formats int8,fp8,fp8-attention --prompts 2 --steps 4 --samples 4 --name fp8-memory-cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
log = logging.getLogger("bench_int8_memory")


# --------------------------------------------------------------------------------------------------------------
# Child side: one configuration, one process
# --------------------------------------------------------------------------------------------------------------


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _activation_bytes(unet: Any, width: int, height: int, device: str) -> int:
    """Bytes of every leaf module's output in one guided UNet call (B = 2) at ``width`` x ``height``."""
    import torch

    total = 0

    def hook(_m: Any, _i: Any, out: Any) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in unet.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    cfg = unet.config
    try:
        with torch.inference_mode():
            unet(
                torch.randn(2, cfg.in_channels, height // 8, width // 8, device=device),
                torch.tensor([500.0, 500.0], device=device),
                torch.randn(2, 77, cfg.cross_attention_dim, device=device),
                added_cond_kwargs={
                    "text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                               device=device),
                    "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32,
                                             device=device),
                },
            )
    finally:
        for h in handles:
            h.remove()
    return total


def child(args: argparse.Namespace) -> int:
    import torch

    from sdxl_trt.engine.int8 import build_int8_unet
    from sdxl_trt.export.loading import load_model

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters())
               for name, m in (("unet", model.unet), ("text_encoder", model.text_encoder),
                               ("text_encoder_2", model.text_encoder_2), ("vae", model.vae)) if m is not None}
    activations = _activation_bytes(model.unet, width, height, args.device)
    loaded_kib = _status_kib("VmRSS")
    phases: dict[str, float] = {"load_peak_gib": _status_kib("VmHWM") / 1024**2}  # load + one measuring forward
    can_reset = _reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    holder = {"model": model}
    del model

    def loader() -> Any:
        return holder.pop("model")

    # build_int8_unet calls loader() once and drops the model before writing: wrapping the writer (either path's)
    # splits the run into the calibration phase (model held) and the writing phase, each with its own peak.
    import sdxl_trt.engine.int8 as int8_mod

    real_writer = int8_mod.quantize_unet_from_ranges
    real_ort = int8_mod.quantize_unet

    def mark_then(fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            phases["calibration_peak_gib"] = _status_kib("VmHWM") / 1024**2
            phases["rss_before_writing_gib"] = _status_kib("VmRSS") / 1024**2
            _reset_peak()
            t = time.perf_counter()
            out = fn(*a, **k)
            phases["writing_s"] = time.perf_counter() - t
            phases["writing_peak_gib"] = _status_kib("VmHWM") / 1024**2
            return out
        return wrapped

    int8_mod.quantize_unet_from_ranges = mark_then(real_writer)
    int8_mod.quantize_unet = mark_then(real_ort)
    t1 = time.perf_counter()
    report = build_int8_unet(loader, Path(args.fp32), Path(args.out), num_prompts=args.prompts, steps=args.steps,
                             width=width, height=height, num_eval_prompts=0, max_samples=args.samples,
                             backend=args.backend, fmt="int8" if args.format == "int8" else "fp8",
                             attention=args.format == "fp8-attention")
    total_s = time.perf_counter() - t1
    result = {
        # ru_maxrss follows the high-water mark the phases reset, so the run's peak is the largest phase peak
        "peak_rss_gib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                            *(v for k, v in phases.items() if k.endswith("_peak_gib"))),
        "rss_after_load_gib": loaded_kib / 1024**2,
        "phase_peaks_measured": can_reset,
        **phases,
        "calibration_s": report.collection_seconds,
        "calibration_and_writing_s": total_s,
        "load_s": load_s,
        "weights_gib": {k: v / GIB for k, v in weights.items()},
        "activation_gib_per_call": activations / GIB,
        "device_peak_gib": torch.cuda.max_memory_allocated() / GIB if args.device.startswith("cuda") else None,
        "quantized_nodes": report.quantized_nodes,
        "attention_matmuls": report.attention_matmuls,
        "samples": report.calibration_samples,
        "int8_bytes": sum(p.stat().st_size for p in Path(args.out).parent.glob(Path(args.out).name + "*")),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def export_child(args: argparse.Namespace) -> int:
    """Export the FP32 UNet ONNX of ``args.model`` to ``args.fp32`` (full size: shared-buffer weights, see above)."""
    import torch

    from sdxl_trt.contracts import ModelDims, component_specs
    from sdxl_trt.export.loading import load_model, model_dims
    from sdxl_trt.export.onnx_export import ONNX_OPSET, TRACE_DIMS, export_onnx, sample_inputs
    from sdxl_trt.export.wrappers import UNetWrapper, wrap_components

    out = Path(args.fp32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        model = load_model("tiny")
        export_onnx(wrap_components(model)["unet"], component_specs(model_dims(model))["unet"], out,
                    precision=torch.float32)
        return 0
    from diffusers import UNet2DConditionModel

    from sdxl_trt.presets import PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(PRESETS[args.model].unet)
    buf = torch.randn(64 * 2**20) * 0.02  # 256 MB; each weight a view at its own offset, so no two are equal
    for i, (name, p) in enumerate(list(unet.named_parameters())):
        owner_name, _, attr = name.rpartition(".")
        start = (i * 1_000_003) % (buf.numel() - p.numel())
        view = buf[start:start + p.numel()].view(p.shape)
        setattr(unet.get_submodule(owner_name), attr, torch.nn.Parameter(view, requires_grad=False))
    for name, b in list(unet.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        unet.get_submodule(owner_name).register_buffer(attr, torch.zeros(b.shape, dtype=b.dtype))
    unet.eval()
    spec = component_specs(ModelDims(refiner_downsamples=0))["unet"]
    inputs = sample_inputs(spec, TRACE_DIMS, torch.float32)
    with torch.inference_mode():
        torch.onnx.export(
            UNetWrapper(unet), tuple(inputs[n] for n in spec.input_names), str(out), input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes={t.name: t.dynamic_axes() for t in spec.tensors if t.dynamic_axes()},
            opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False,
        )
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent side: the configurations, each in a subprocess, and the report
# --------------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return run.returncode, run.stdout + run.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\ntimed out after {timeout:.0f} s", time.perf_counter() - t


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def _machine() -> dict[str, Any]:
    import torch

    total = next((int(ln.split()[1]) / 1024**2 for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:")), None)
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "memory_gib": total,
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny:256x256,tiny:1024x1024,sdxl-base-1.0:512x512:1x2x2",
                   help="model:WxH[:PROMPTSxSTEPSxSAMPLES],... (each runs with every backend; the optional third "
                   "part overrides --prompts/--steps/--samples for that configuration)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="torch first: its row measures the activation volume the old path's estimate needs")
    p.add_argument("--formats", default="int8",
                   help="comma-separated Q/DQ formats: int8, fp8, fp8-attention (fp8 ones: torch backend only)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=1800, help="per configuration")
    p.add_argument("--old-path-budget-gib", type=float, default=None,
                   help="skip an onnxruntime configuration whose estimated peak exceeds this (default: memory "
                   "available now minus 2 GiB)")
    p.add_argument("--work", default="/tmp/bench-int8", help="folder for the ONNX files (large at full size)")
    p.add_argument("--name", default=None, help="report name (default int8-memory-<device>)")
    # child modes
    p.add_argument("--child", choices=["measure", "export"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--format", default="int8", help=argparse.SUPPRESS)
    p.add_argument("--fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child == "measure":
        return child(args)
    if args.child == "export":
        return export_child(args)

    work = Path(args.work)
    configs = []
    for c in args.configs.split(","):
        parts = c.split(":")
        effort = [int(v) for v in parts[2].split("x")] if len(parts) > 2 else [args.prompts, args.steps, args.samples]
        configs.append((parts[0], parts[1], effort))
    backends = args.backends.split(",")
    formats = args.formats.split(",")
    bad = [f for f in formats if f not in ("int8", "fp8", "fp8-attention")]
    if bad or any(f != "int8" for f in formats) and backends != ["torch"]:
        raise SystemExit(f"--formats must be int8, fp8, fp8-attention (fp8 ones with --backends torch), got {formats}")
    rows: list[dict[str, Any]] = []
    old_tiny: tuple[float, float] | None = None  # (activation GiB, old-path peak GiB) of the largest tiny row
    for model, size, (prompts, steps, samples) in configs:
        fp32 = work / model / "unet.onnx"
        if not fp32.exists():
            log.info("exporting the FP32 UNet of %s to %s (not measured)", model, fp32)
            rc, out, secs = _run([sys.executable, __file__, "--child", "export", "--model", model, "--fp32", str(fp32)],
                                 args.timeout_s)
            if rc != 0:
                raise SystemExit(f"export of {model} failed ({rc}):\n{out[-3000:]}")
            log.info("exported in %.0f s", secs)
        for backend, fmt in [(b, f) for b in backends for f in formats]:
            row: dict[str, Any] = {"model": model, "size": size, "backend": backend, "format": fmt,
                                   "prompts": prompts, "steps": steps, "requested_samples": samples}
            budget = args.old_path_budget_gib if args.old_path_budget_gib is not None else _available_gib() - 2
            activation = next((r.get("activation_gib_per_call") for r in rows
                               if r["model"] == model and r["size"] == size and r.get("activation_gib_per_call")), None)
            if backend == "onnxruntime" and activation and old_tiny and model != "tiny":
                ratio = old_tiny[1] / old_tiny[0]
                estimate = ratio * activation
                row["estimated_peak_rss_gib"] = estimate
                if estimate > budget:
                    row["not_run"] = (f"estimated peak {estimate:.0f} GiB (the old path's peak on tiny, {old_tiny[1]:.1f} "
                                      f"GiB for {old_tiny[0]:.2f} GiB of one forward's activations, scaled to "
                                      f"{activation:.2f} GiB here) exceeds the {budget:.0f} GiB free on this machine")
                    log.warning("%s %s %s: not run: %s", model, size, backend, row["not_run"])
                    rows.append(row)
                    continue
            out_onnx = work / model / f"unet.{fmt}.{backend}.{size}.onnx"
            cmd = [sys.executable, __file__, "--child", "measure", "--model", model, "--size", size, "--backend", backend,
                   "--format", fmt,
                   "--fp32", str(fp32), "--out", str(out_onnx), "--prompts", str(prompts), "--steps",
                   str(steps), "--samples", str(samples), "--device", args.device, "--threads",
                   str(args.threads)]
            log.info("measuring %s %s %s", model, size, backend)
            rc, out, secs = _run(cmd, args.timeout_s)
            line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
            if rc != 0 or line is None:
                row["not_run"] = f"failed (exit {rc}) after {secs:.0f} s: {out.strip().splitlines()[-1][:300]}"
                log.error("%s\n%s", row["not_run"], out[-3000:])
            else:
                row.update(json.loads(line[len("RESULT "):]))
                if backend == "onnxruntime" and model == "tiny" and (
                        old_tiny is None or row["activation_gib_per_call"] > old_tiny[0]):
                    old_tiny = (row["activation_gib_per_call"], row["peak_rss_gib"])
                log.info("%s %s %s %s: peak %.2f GiB, %.0f s", model, size, backend, fmt, row["peak_rss_gib"],
                         row["calibration_and_writing_s"])
            for f in out_onnx.parent.glob(out_onnx.name + "*"):
                f.unlink()
            rows.append(row)
    report = {
        "what": "INT8 calibration + Q/DQ writing: peak host RSS and wall time per configuration, each in its own process",
        "settings": {"prompts": args.prompts, "steps": args.steps, "samples": args.samples, "device": args.device,
                     "threads": args.threads, "formats": formats},
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_int8_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
        "notes": [
            "Phase peaks: 'calibration' runs from after the model load to the moment the model is dropped, "
            "'writing' from then to the Q/DQ file's checks; the whole-run peak also covers the load and one "
            "benchmark-only UNet forward that measures the activation volume.",
            "The full-size FP32 ONNX is exported from a UNet whose weights are views of one random buffer "
            "(see the program's docstring): memory and time, not accuracy. Accuracy: tests/test_int8.py and "
            "int8-accuracy-*.md.",
        ],
    }
    name = args.name or f"int8-memory-{args.device.split(':')[0]}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report, name))
    _plot(report, RESULTS / f"{name}.png")
    log.info("wrote %s.{json,md}", RESULTS / name)
    return 0


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any], name: str) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# INT8 / FP8 calibration memory and time",
        "",
        f"{report['date']}; {m['cores']} cores, {_fmt(m['memory_gib'], '.1f')} GiB RAM, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}. Default effort {s['prompts']} prompts x {s['steps']} steps, {s['samples']} samples "
        f"(per-row effort in the table), on {s['device']}, {s['threads']} threads. Each row in its own process.",
        "",
        f"`{report['command']}`",
        "",
        "Backends: `onnxruntime` is the old path (record the UNet inputs, then ONNX Runtime's calibrator and "
        "`quantize_static` on the FP32 file); `torch` is the new default (ranges from PyTorch forward hooks during "
        "denoising, Q/DQ written weight by weight). Peak = whole run (model load, calibration, Q/DQ writing); "
        "the phase columns split it where the model is dropped.",
        "",
        "Formats: `int8`; `fp8` (the same ranges as E4M3 Q/DQ, weights per tensor); `fp8-attention` (also the "
        "attention matmuls' inputs, observed inside `scaled_dot_product_attention`, softmax in chunks).",
        "",
        "| model | size | backend | format | prompts x steps (samples) | peak RSS (GiB) | calibration peak | writing peak | UNet fp32 weights | all fp32 weights "
        "| one forward's activations | calibration (s) | writing (s) | total (s) | device peak (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r.get("not_run"):
            lines.append(f"| {r['model']} | {r['size']} | {r['backend']} | {r.get('format', 'int8')} | "
                         f"{r['prompts']} x {r['steps']} | "
                         f"not run: {r['not_run']} |" + " |" * 9)
            continue
        w = r["weights_gib"]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['backend']} | {r.get('format', 'int8')} | "
            f"{r['prompts']} x {r['steps']} ({r['samples']}) | "
            f"**{r['peak_rss_gib']:.2f}** | "
            f"{_fmt(r.get('calibration_peak_gib'))} | {_fmt(r.get('writing_peak_gib'))} | {w['unet']:.2f} | "
            f"{sum(w.values()):.2f} | {r['activation_gib_per_call']:.2f} | {r['calibration_s']:.0f} | "
            f"{_fmt(r.get('writing_s'), '.0f')} | {r['calibration_and_writing_s']:.0f} | {_fmt(r.get('device_peak_gib'))} |"
        )
    lines += ["", *(f"* {n}" for n in report.get("notes", [])), "", f"![peaks]({name}.png)", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot")
        return
    rows = [r for r in report["rows"] if not r.get("not_run")]
    labels = [f"{r['model']}\n{r['size']}\n{r['backend']} {r.get('format', 'int8')}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar(labels, [r["peak_rss_gib"] for r in rows], color=["#d62728" if r["backend"] == "onnxruntime" else "#1f77b4"
                                                             for r in rows])
    ax.set_ylabel("peak host RSS (GiB); dashed: fp32 weights")
    ax.set_title("INT8 calibration + Q/DQ writing\nred: ONNX Runtime calibrator (old), blue: PyTorch hooks (new)",
                 fontsize=9)
    for i, r in enumerate(rows):  # the loaded model's fp32 weights, the floor any path must hold
        w = sum(r["weights_gib"].values())
        ax.hlines(w, i - 0.4, i + 0.4, colors="black", linestyles="dashed", linewidth=1)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
