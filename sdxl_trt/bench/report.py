"""The benchmark's report: JSON (everything), Markdown (the tables a README quotes), a plot when matplotlib
imports (a machine without it still gets JSON and Markdown and a zero exit)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def report_name(report: dict[str, Any]) -> str:
    e, env = report["engines"], report["environment"]
    model = Path(str(e["model"])).name or "model"
    cache = f"-cache{report['settings']['cache_interval']}" if report["settings"].get("cache_interval", 1) > 1 else ""
    return f"bench-{model}-{e['backend']}-{e['precision']}-{env['device'].split(':')[0]}{cache}"


def _f(v: float | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    return "n/a" if v is None else format(v * scale, fmt)


def _lat(d: dict[str, Any] | None) -> str:
    return "n/a" if d is None else f"{d['p50_s']:.3f} / {d['p90_s']:.3f} / {d['min_s']:.3f}"


def _mem(p: dict[str, Any] | None) -> str:
    if p is None:
        return "n/a"
    m = p["memory"]
    if m["peak_reserved_gib"] is None:
        return "n/a (CPU)"
    return f"{m['peak_reserved_gib']:.2f} / {m['peak_allocated_gib']:.2f} / {m['device_used_gib']:.2f}"


def summary_table(report: dict[str, Any]) -> str:
    """One line per row: what the acceptance script prints last."""
    lines = ["| size | pipeline | sdxl-trt p50 (s) | diffusers p50 (s) | speedup | base step (ms) | "
             "step, events (ms) | err vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        o = r["sdxl_trt"]
        lines.append(f"| {r['size']} | {r['pipeline']} | {o['p50_s']:.3f} | "
                     f"{_f(r['diffusers'] and r['diffusers']['p50_s'])} | "
                     f"{_f(r['speedup_p50'], '.2f')}{'x' if r['speedup_p50'] else ''} | {o['step_ms']['base']:.1f} | "
                     f"{_f(o['step_ms_events'], '.1f')} | {_f(r['error_vs_fp32']['sdxl_trt'], '.2e')} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    env, s, e = report["environment"], report["settings"], report["engines"]
    device = (f"{env['gpu']}, driver {env.get('driver')}" if env.get("gpu")
              else f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads)")
    ours, theirs = report["pipelines"]["sdxl_trt"], report["pipelines"]["diffusers"]
    lines = [
        f"# sdxl-trt bench: {e['model']}" + (f" + {e['refiner']}" if e.get("refiner") else "")
        + f", {e['backend']} {e['precision']}" + (", compiled" if s["compile"] else ""),
        "",
        f"Device: {device}; torch {env['torch']}; commit {env['commit']}; {json.dumps(env['versions'])}",
        f"Settings: {s['steps']} steps, {s['scheduler']}, guidance {s['guidance']}, seed {s['seed']}, "
        f"{s['runs']} timed runs per row after {s['warmup_runs']} untimed"
        + (f"; refiner {s['refiner_mode']} (start {s['refiner_start']}, strength {s['refiner_strength']})"
           if s["refiner_mode"] else "")
        + (f"; step caching: interval {s['cache_interval']}, branch {e.get('cache_branch')} (the baseline with "
           "DeepCacheSDHelper at the same)" if s.get("cache_interval", 1) > 1 else "") + ".",
        f"Timing: {report['timing_method']}.",
        f"Stages: {report['stage_timers']}",
        f"Reference for the image error: {report['reference']['description']}.",
        "",
        "| size | pipeline | sdxl-trt p50 / p90 / min (s) | diffusers p50 / p90 / min (s) | speedup (p50) "
        "| steps base+refiner | base step (ms) | refiner step (ms) | step, events (ms) | text enc (ms) "
        "| VAE decode (ms) | error vs fp32: sdxl-trt / diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        o = r["sdxl_trt"]
        st = o["stages_s"]
        err = r["error_vs_fp32"]
        lines.append(
            f"| {r['size']} | {r['pipeline']} | {_lat(o)} | {_lat(r['diffusers'])} | "
            f"{_f(r['speedup_p50'], '.2f')}{'x' if r['speedup_p50'] else ''} | "
            f"{o['steps']['base']}+{o['steps']['refiner']} | {o['step_ms']['base']:.1f} | "
            f"{_f(o['step_ms']['refiner'], '.1f')} | {_f(o['step_ms_events'], '.1f')} | "
            f"{_f(st.get('text_encoders'), '.1f', 1000)} | {_f(st.get('vae_decode'), '.1f', 1000)} | "
            f"{_f(err['sdxl_trt'], '.2e')} / {_f(err['diffusers'], '.2e')} |")
    lines += ["", "Pipelines (memory: peak reserved / peak allocated / device used, GiB, deltas for this pipeline "
              "alone):", "", "| pipeline | load (s) | warm-up (s) | CUDA graphs | memory (GiB) |", "|---|---|---|---|---|",
              f"| sdxl-trt | {ours['load_s']:.2f} | {ours['warmup_s']:.2f} | "
              f"{ours['cuda_graphs_at_end'].get('graphs')} | {_mem(ours)} |"]
    if theirs:
        lines.append(f"| diffusers | {theirs['load_s']:.2f} | n/a | n/a | {_mem(theirs)} |")
    lines += ["", "Throughput (one request of n images):", "",
              "| size | n | sdxl-trt images/s | sdxl-trt p50 (s) | diffusers images/s | diffusers p50 (s) |",
              "|---|---|---|---|---|---|"]
    for t in report["throughput"]:
        o, d = t["sdxl_trt"], t["diffusers"]
        lines.append(f"| {t['size']} | {t['batch']} | {o['images_per_s']:.2f} | {o['p50_s']:.3f} | "
                     f"{_f(d and d['images_per_s'], '.2f')} | {_f(d and d['p50_s'])} |")
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot_latency(report: dict[str, Any], path: Path) -> Path | None:
    """A bar chart of p50 latency per row; None (and a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot (JSON and Markdown are written)")
        return None
    labels = [f"{r['size']}\n{r['pipeline']}" for r in report["rows"]]
    ours = [r["sdxl_trt"]["p50_s"] for r in report["rows"]]
    theirs = [r["diffusers"]["p50_s"] if r["diffusers"] else 0.0 for r in report["rows"]]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 4))
    if any(theirs):
        ax.bar([i - 0.2 for i in x], theirs, 0.4, label="diffusers (eager)")
    ax.bar([i + 0.2 for i in x], ours, 0.4, label="sdxl-trt")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("end-to-end latency, p50 (s)")
    env, e = report["environment"], report["engines"]
    ax.set_title(f"{e['model']} {e['backend']} {e['precision']} on {env.get('gpu') or 'CPU'}, "
                 f"{report['settings']['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path, name: str | None = None, *,
                 plot: bool = True) -> dict[str, Path | None]:
    """``<out>/<name>.json`` and ``.md`` always, ``.png`` when asked and matplotlib imports. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    name = name or report_name(report)
    paths: dict[str, Path | None] = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))  # type: ignore[union-attr]
    paths["md"].write_text(markdown(report))  # type: ignore[union-attr]
    paths["png"] = plot_latency(report, out / f"{name}.png") if plot else None
    return paths
