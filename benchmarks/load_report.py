"""Load benchmark, the report side: per-level statistics from what the clients saw and the server's ``/metrics``
deltas, the environment, and the JSON + Markdown + plot written to ``--out``.

``load_bench.py`` generates the load (clients, levels, the spawned server, the paired in-process baseline) and
hands its shots here; nothing in this module sends a request.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ENDPOINT = "/v1/images/generations"


@dataclass
class Shot:
    """One request as the client saw it."""

    start: float
    end: float
    outcome: str  # "ok", "429", "503", "504", "http_<code>", "invalid_image", or a transport error's class
    images: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Level:
    """A load level: ``concurrency`` closed-loop clients, or open-loop arrivals at ``rate`` requests/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"


def is_transport_error(outcome: str) -> bool:
    """An outcome with no HTTP answer at all (timeout, refused or dropped connection)."""
    return not (outcome in ("ok", "invalid_image") or outcome.isdigit() or outcome.startswith("http_"))


# --------------------------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; enough for the few samples read here."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _requests_by_outcome(m: dict[str, float]) -> dict[str, float]:
    prefix = f'sdxl_trt_requests_total{{endpoint="{ENDPOINT}",outcome="'
    return {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix)}


def _time_breakdown(before: dict[str, float], after: dict[str, float], batches: float) -> dict[str, float | None]:
    """Where a request's time went, from the server's own histograms over the same requests: the app's time
    per request (``sdxl_trt_request_seconds``) and the pipeline's time per batch (``sdxl_trt_stage_seconds``)."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    label = f'{{endpoint="{ENDPOINT}"}}'
    answered = delta(f"sdxl_trt_request_seconds_count{label}")
    stages = sum(delta(k) for k in after if k.startswith("sdxl_trt_stage_seconds_sum{"))
    return {"app_s_per_answer": delta(f"sdxl_trt_request_seconds_sum{label}") / answered if answered else None,
            "pipeline_s_per_batch": stages / batches if batches else None}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summarize(level: Level, shots: list[Shot], wall: float, queue: list[float], before: dict[str, float] | None,
              after: dict[str, float] | None) -> dict[str, Any]:
    ok = [s.end - s.start for s in shots if s.outcome == "ok"]
    outcomes = Counter(s.outcome for s in shots)
    refused = [s.end - s.start for s in shots if s.outcome in ("429", "503")]
    server: dict[str, Any] = {"mean_batch_size": None, "batches": None, "requests_by_outcome": None}
    if before is not None and after is not None:
        batches = after.get("sdxl_trt_batch_size_count", 0) - before.get("sdxl_trt_batch_size_count", 0)
        images = after.get("sdxl_trt_batch_size_sum", 0) - before.get("sdxl_trt_batch_size_sum", 0)
        server["batches"] = int(batches)
        server["mean_batch_size"] = images / batches if batches else None
        b, a = _requests_by_outcome(before), _requests_by_outcome(after)
        server["requests_by_outcome"] = {k: int(a[k] - b.get(k, 0)) for k in a if a[k] - b.get(k, 0)}
        server.update(_time_breakdown(before, after, batches))
    errors = sorted({s.detail for s in shots if s.outcome not in ("ok", "429") and s.detail})[:5]
    return {
        "level": level.label, "concurrency": level.concurrency, "rate": level.rate,
        "requests": len(shots), "wall_s": wall, "outcomes": dict(sorted(outcomes.items())),
        "latency_s": {"p50": percentile(ok, 0.5), "p90": percentile(ok, 0.9), "p99": percentile(ok, 0.99),
                      "mean": statistics.fmean(ok) if ok else None, "max": max(ok, default=None)},
        "refusal_latency_s_p50": percentile(refused, 0.5),
        "images_per_s": sum(s.images for s in shots) / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "queue_depth": {"mean": statistics.fmean(queue) if queue else None, "max": max(queue, default=None),
                        "samples": len(queue)},
        "server": server,
        "all_accepted_complete": outcomes.get("invalid_image", 0) == 0,
        "server_5xx": sum(v for k, v in outcomes.items() if k in ("503", "504") or k.startswith("http_5")),
        "transport_errors": sum(v for k, v in outcomes.items() if is_transport_error(k)),
        "error_samples": errors,
    }


# --------------------------------------------------------------------------------------------- report
def device_label(override: str | None) -> tuple[str, str]:
    """(human label, short tag for file names): the GPU where this process sees one, else the CPU."""
    if override:
        return override, override.split()[0].lower()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            return name, name.replace("NVIDIA ", "").split()[0].lower()
    return f"CPU ({_cpu_name()}, {os.cpu_count()} cores)", "cpu"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(label: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "device": label,
                           "httpx": httpx.__version__}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    return env


def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    lines = [
        f"# sdxl-trt load benchmark: {report['model']} over HTTP ({'spawned server' if s['spawn_engines'] else s['url']})",
        "",
        f"Device: {env['device']}; commit {env['commit']}; {report['date']}.",
        f"Request: OpenAI `{ENDPOINT}`, size {s['size']}, n {s['n']}, {s['steps']} steps, b64_json. "
        f"Each level: {s['duration_s']:g} s" + (f" or {s['requests']} requests" if s["requests"] else "")
        + f"; server args: `{s['server_args'] or '(defaults)'}`.",
        "",
        "| level | requests | outcomes | p50 / p90 / p99 (s) | images/s | queue depth mean / max | mean batch "
        "| server-side outcomes | accepted all complete | host load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        lat, q, srv = lv["latency_s"], lv["queue_depth"], lv["server"]
        outcomes = ", ".join(f"{k} {v}" for k, v in lv["outcomes"].items())
        server = ", ".join(f"{k} {v}" for k, v in (srv["requests_by_outcome"] or {}).items()) or "n/a"
        lines.append(
            f"| {lv['level']} | {lv['requests']} | {outcomes} | {_fmt(lat['p50'])} / {_fmt(lat['p90'])} / "
            f"{_fmt(lat['p99'])} | {lv['images_per_s']:.2f} | {_fmt(q['mean'], digits=1)} / {_fmt(q['max'], digits=0)} "
            f"| {_fmt(srv['mean_batch_size'], digits=2)} | {server} | {'yes' if lv['all_accepted_complete'] else 'NO'} "
            f"| {lv['host_loadavg_1m']['before']:.1f} / {lv['host_loadavg_1m']['after']:.1f} |")
    lines += ["", "Where the time went (server-side figures from its own histograms over the same requests):", "",
              "| level | client mean (s) | app time per answer, refusals included (s) | pipeline time per batch (s) "
              "| mean batch | outside the pipeline (ms) |",
              "|---|---|---|---|---|---|"]
    for lv in report["levels"]:
        srv, mean = lv["server"], lv["latency_s"]["mean"]
        batch_s = srv.get("pipeline_s_per_batch")
        outside = mean - batch_s if mean is not None and batch_s is not None else None
        lines.append(f"| {lv['level']} | {_fmt(mean)} | {_fmt(srv.get('app_s_per_answer'))} | {_fmt(batch_s)} | "
                     f"{_fmt(srv['mean_batch_size'], digits=2)} | {_fmt(outside, 1000, 0)} |")
    lines += ["", "Outside the pipeline = client mean - pipeline time per batch: at concurrency 1 that is the serving "
                  "overhead (batch window, HTTP, JSON, PNG + base64, the client's decode); above it, mostly waiting "
                  "for the batch ahead."]
    base = report.get("in_process")
    if base:
        lines += ["", f"Serving overhead, paired ({base['runs']} alternating pairs on an otherwise idle server: one "
                      f"HTTP request at concurrency 1, then `Pipeline.generate` in-process, same request, "
                      f"{base['device']}): server p50 {base['server_c1']['p50_s']:.3f} s, in-process p50 "
                      f"{base['in_process']['p50_s']:.3f} s; median paired difference "
                      f"{1000 * base['overhead_s_p50']:.0f} ms ({100 * base['overhead_fraction']:.0f}%): HTTP, JSON, "
                      "PNG + base64, the batch window and the client's decode."]
    refusals = [(lv["level"], lv["refusal_latency_s_p50"]) for lv in report["levels"] if lv["refusal_latency_s_p50"]]
    if refusals:
        lines += ["", "Refusals (429/503) answered in p50 " + ", ".join(f"{1000 * v:.1f} ms at {k}" for k, v in refusals)
                  + "."]
    lines += ["", "Outcomes: `ok` = 2xx with every image present, decodable and of the asked size; `invalid_image` "
                  "= a 2xx that was not; 429/503/504 = refused, unavailable, timed out in the queue; other names are "
                  "HTTP codes or client transport errors. Queue depth is sampled from `/metrics` every "
                  f"{s['scrape_s']:g} s; mean batch = images / batches from the `sdxl_trt_batch_size` histogram delta. "
                  "Host load is the 1-minute load average (client, server and anything else on the machine)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in report["levels"] if lv["latency_s"]["p50"] is not None]
    closed = all(lv["concurrency"] is not None for lv in levels)
    x = [lv["concurrency"] if closed else lv["rate"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(x, [lv["latency_s"]["p50"] for lv in levels], "o-", label="server p50")
    ax1.plot(x, [lv["latency_s"]["p99"] for lv in levels], "s--", label="server p99")
    if report.get("in_process"):
        ax1.axhline(report["in_process"]["in_process"]["p50_s"], color="gray", linestyle=":",
                    label="in-process p50 (paired)")
    ax1.set_ylabel("latency (s)")
    ax2.plot(x, [lv["images_per_s"] for lv in levels], "o-", color="tab:green")
    ax2.set_ylabel("images/s")
    for ax in (ax1, ax2):
        ax.set_xlabel("concurrent clients" if closed else "arrival rate (requests/s)")
        ax.set_xticks(x)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.legend()
    s = report["settings"]
    fig.suptitle(f"{report['model']} over HTTP on {report['environment']['device']}: {s['size']}, {s['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text.lower()).strip("-") or "model"


def write(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / report["name"]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
