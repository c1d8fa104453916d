"""Load benchmark: real HTTP clients against a running ``sdxl-trt serve`` (or one it spawns), per load level.

For each concurrency (closed loop: N clients, each sends its next request when the last one is answered) or
arrival rate (open loop: Poisson arrivals at R requests/s) it runs for ``--duration-s`` or ``--requests``,
whichever ends first, on the OpenAI endpoint (``POST /v1/images/generations``), and reports: latency
p50/p90/p99 of accepted requests, images/s, the queue depth scraped from ``/metrics`` during the level, the
mean batch size (from the ``sdxl_trt_batch_size`` histogram's delta), every outcome (ok, 429, 503, 504,
other HTTP codes, transport errors), and whether every accepted (2xx) request carried complete, decodable
images of the requested size. Refused requests (429/503) back off for their ``Retry-After`` (capped by
``--max-backoff-s``) before the client sends again, as a well-behaved client would.

``--in-process-engines DIR`` also times ``Pipeline.generate`` in this process for the same request, so the
report shows the serving overhead (server p50 at concurrency 1 against in-process p50). After the levels, one
HTTP request and one in-process generation alternate, so both see the same machine (neighbours on a shared
host move both alike); the overhead is the median paired difference. The server's own histograms add a
per-level breakdown: the app's time per request and the pipeline's time per batch.

Writes ``<out>/<name>.json``, ``.md`` and ``.png``; the name holds the device and the date.

CPU run on the tiny engines (what the committed report is)::

    sdxl-trt build --model tiny --out /tmp/lb-engines --backend onnxruntime --max-batch 4
    python benchmarks/load_bench.py --spawn-engines /tmp/lb-engines --concurrency 1,4,8 --duration-s 30 \\
        --steps 4 --in-process-engines /tmp/lb-engines

Overload (more clients than the queue holds; expect 429s, no 5xx, no lost accepted request)::

    python benchmarks/load_bench.py --spawn-engines /tmp/lb-engines --server-args="--max-queue 4" \\
        --concurrency 16 --duration-s 20 --steps 4 --name-suffix overload

Against a server that is already running (``SDXL_TRT_API_KEY`` or ``--api-key`` if it wants one)::

    python benchmarks/load_bench.py http://127.0.0.1:7860 --concurrency 1,2,4 --size 1024x1024 --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import datetime
import io
import json
import logging
import math
import os
import platform
import random
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

log = logging.getLogger("load_bench")
ENDPOINT = "/v1/images/generations"
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
KEY_ENV = "SDXL_TRT_API_KEY"


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RequestSpec:
    """What every request of a run asks for; seeds differ per request (``seed + i``), the cost does not."""

    size: str = "256x256"
    steps: int = 4
    n: int = 1
    seed: int = 0
    guidance_scale: float = 5.0
    prompt: str = PROMPT

    @property
    def width_height(self) -> tuple[int, int]:
        w, h = (int(v) for v in self.size.lower().split("x"))
        return w, h

    def body(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompt, "size": self.size, "n": self.n, "steps": self.steps,
                "seed": self.seed + i, "guidance_scale": self.guidance_scale, "response_format": "b64_json"}


@dataclass
class Shot:
    """One request as the client saw it."""

    start: float
    end: float
    outcome: str  # "ok", "429", "503", "504", "http_<code>", "invalid_image", or a transport error's class
    images: int = 0
    detail: str = ""


def classify(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    return str(status) if status in (429, 503, 504) else f"http_{status}"


def check_images(payload: Any, spec: RequestSpec) -> str | None:
    """Why an accepted answer is not ``n`` complete, decodable PNGs of the requested size (None if it is)."""
    try:
        data = payload["data"]
    except (TypeError, KeyError):
        return "no 'data' in the answer"
    if len(data) != spec.n:
        return f"{len(data)} images, asked for {spec.n}"
    for k, item in enumerate(data):
        try:
            raw = base64.b64decode(item["b64_json"], validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()  # decodes every row: a truncated PNG fails here
                size = im.size
        except (KeyError, TypeError, binascii.Error, OSError, ValueError) as e:
            return f"image {k} does not decode: {e}"
        if size != spec.width_height:
            return f"image {k} is {size[0]}x{size[1]}, asked for {spec.size}"
    return None


async def send_one(client: httpx.AsyncClient, url: str, spec: RequestSpec, i: int) -> tuple[Shot, float]:
    """One request; returns its record and how long the client should back off before its next one."""
    t0 = time.monotonic()
    try:
        r = await client.post(url + ENDPOINT, json=spec.body(i))
    except httpx.HTTPError as e:
        return Shot(t0, time.monotonic(), type(e).__name__, detail=str(e)[:200]), 0.0
    end = time.monotonic()
    outcome = classify(r.status_code)
    if outcome != "ok":
        retry_after = _retry_after(r.headers.get("retry-after"))
        return Shot(t0, end, outcome, detail=r.text[:200]), retry_after
    try:
        problem = check_images(r.json(), spec)
    except ValueError as e:
        problem = f"answer is not JSON: {e}"
    if problem:
        return Shot(t0, end, "invalid_image", detail=problem), 0.0
    return Shot(t0, end, "ok", images=spec.n), 0.0


def is_transport_error(outcome: str) -> bool:
    """An outcome with no HTTP answer at all (timeout, refused or dropped connection)."""
    return not (outcome in ("ok", "invalid_image") or outcome.isdigit() or outcome.startswith("http_"))


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.1
    except ValueError:
        return 0.1


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


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    try:
        r = await client.get(url + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


async def watch_queue(client: httpx.AsyncClient, url: str, interval_s: float, samples: list[float],
                      stop: asyncio.Event) -> None:
    while not stop.is_set():
        m = await scrape(client, url)
        if m is not None and "sdxl_trt_queue_depth" in m:
            samples.append(m["sdxl_trt_queue_depth"])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


# --------------------------------------------------------------------------------------------- one level
@dataclass(frozen=True)
class Level:
    """A load level: ``concurrency`` closed-loop clients, or open-loop arrivals at ``rate`` requests/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"


@dataclass
class Budget:
    duration_s: float
    max_requests: int | None
    max_backoff_s: float
    sent: int = 0

    def take(self, deadline: float) -> int | None:
        """The next request's index, or None when the level's time or request count is spent."""
        if time.monotonic() >= deadline or (self.max_requests is not None and self.sent >= self.max_requests):
            return None
        self.sent += 1
        return self.sent - 1


async def closed_loop(client: httpx.AsyncClient, url: str, spec: RequestSpec, concurrency: int, budget: Budget,
                      first: int) -> list[Shot]:
    shots: list[Shot] = []
    deadline = time.monotonic() + budget.duration_s

    async def worker() -> None:
        while (i := budget.take(deadline)) is not None:
            shot, backoff = await send_one(client, url, spec, first + i)
            shots.append(shot)
            if backoff:
                await asyncio.sleep(min(backoff, budget.max_backoff_s, max(0.0, deadline - time.monotonic())))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return shots


async def open_loop(client: httpx.AsyncClient, url: str, spec: RequestSpec, rate: float, budget: Budget,
                    first: int, rng: random.Random) -> list[Shot]:
    deadline = time.monotonic() + budget.duration_s
    tasks: list[asyncio.Task[tuple[Shot, float]]] = []
    next_at = time.monotonic()
    while (i := budget.take(deadline)) is not None:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        tasks.append(asyncio.create_task(send_one(client, url, spec, first + i)))
        next_at += rng.expovariate(rate)
    return [shot for shot, _ in await asyncio.gather(*tasks)]


async def run_level(url: str, headers: dict[str, str], spec: RequestSpec, level: Level, budget: Budget, *,
                    first_seed: int, timeout_s: float, scrape_s: float, rng: random.Random) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=(level.concurrency + 4) if level.concurrency else None,
                          max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client, \
            httpx.AsyncClient(headers=headers, timeout=10.0) as scraper:
        before = await scrape(scraper, url)
        load_before = os.getloadavg()[0]
        queue: list[float] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_queue(scraper, url, scrape_s, queue, stop))
        t0 = time.monotonic()
        if level.concurrency is not None:
            shots = await closed_loop(client, url, spec, level.concurrency, budget, first_seed)
        else:
            assert level.rate is not None
            shots = await open_loop(client, url, spec, level.rate, budget, first_seed, rng)
        wall = max((s.end for s in shots), default=t0) - t0
        stop.set()
        await watcher
        await asyncio.sleep(0.1)  # the server counts an answer just after sending it
        after = await scrape(scraper, url)
    result = summarize(level, shots, wall, queue, before, after)
    result["host_loadavg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    return result


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


# --------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    """``sdxl-trt serve`` as a subprocess on a free loopback port, with its own API key; stopped by SIGTERM."""

    def __init__(self, engines: Path, extra_args: list[str], *, ready_timeout_s: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_hex(8)
        self.log_file = tempfile.NamedTemporaryFile(prefix="load-bench-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.args = [sys.executable, "-m", "sdxl_trt.cli", "serve", "--engines", str(engines), "--host",
                     "127.0.0.1", "--port", str(self.port), *extra_args]
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpawnedServer:
        log.info("starting %s", shlex.join(self.args[1:]))
        env = {**os.environ, KEY_ENV: self.api_key, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise TimeoutError(f"the server was not ready after {self.ready_timeout_s} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()

    def log_tail(self, chars: int = 4000) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")[-chars:]


# --------------------------------------------------------------------------------------------- in-process
def paired_baseline(url: str, headers: dict[str, str], spec: RequestSpec, engines: Path, runs: int,
                    device: str | None) -> dict[str, Any]:
    """``Pipeline.generate`` in this process against the server at concurrency 1, for the same request.

    The two alternate, one HTTP request then one in-process generation, so both see the same machine: on a
    shared host a baseline timed before or after the levels measures the neighbours as much as the server.
    The overhead is the median of the paired differences.
    """
    from sdxl_trt.request import GenerationRequest
    from sdxl_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines, device=device)
    w, h = spec.width_height
    local: list[float] = []
    remote: list[float] = []
    with httpx.Client(headers=headers, timeout=300.0) as client:
        for k in range(runs + 1):  # the first pair is a warm-up
            t0 = time.perf_counter()
            r = client.post(url + ENDPOINT, json=spec.body(2_000_000 + k))
            t1 = time.perf_counter()
            if r.status_code != 200 or check_images(r.json(), spec):
                raise RuntimeError(f"baseline request failed: {r.status_code} {r.text[:200]}")
            req = GenerationRequest(prompt=spec.prompt, width=w, height=h, steps=spec.steps, seed=spec.seed + k,
                                    guidance_scale=spec.guidance_scale, num_images=spec.n)
            t2 = time.perf_counter()
            pipe.generate(req)
            t3 = time.perf_counter()
            if k:
                remote.append(t1 - t0)
                local.append(t3 - t2)
    diffs = [a - b for a, b in zip(remote, local, strict=True)]
    return {"runs": runs, "device": str(pipe.device),
            "in_process": {"p50_s": percentile(local, 0.5), "p90_s": percentile(local, 0.9), "min_s": min(local)},
            "server_c1": {"p50_s": percentile(remote, 0.5), "p90_s": percentile(remote, 0.9), "min_s": min(remote)},
            "overhead_s_p50": statistics.median(diffs),
            "overhead_fraction": statistics.median(diffs) / statistics.median(local)}


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


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", help="a running server, e.g. http://127.0.0.1:7860")
    p.add_argument("--spawn-engines", type=Path, help="start `sdxl-trt serve` on these engines instead of a URL")
    p.add_argument("--server-args", default="", help="extra `sdxl-trt serve` flags for --spawn-engines")
    p.add_argument("--api-key", default=None, help=f"default: ${KEY_ENV}")
    p.add_argument("--concurrency", default=None, help="closed-loop levels, e.g. 1,4,8 (default: 1,4,8)")
    p.add_argument("--rate", default=None, help="open-loop levels in requests/s, e.g. 1,2,4 (instead of clients)")
    p.add_argument("--duration-s", type=float, default=30.0, help="length of each level")
    p.add_argument("--requests", type=int, default=None, help="at most this many requests per level")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before the first level")
    p.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    p.add_argument("--max-backoff-s", type=float, default=1.0, help="cap on Retry-After after a refusal")
    p.add_argument("--scrape-s", type=float, default=0.5, help="how often /metrics is read during a level")
    p.add_argument("--in-process-engines", type=Path, help="also time Pipeline.generate in-process on these")
    p.add_argument("--in-process-runs", type=int, default=10)
    p.add_argument("--device", default=None, help="device for the in-process baseline (default: the pipeline's)")
    p.add_argument("--device-label", default=None, help="e.g. 'H100 80GB' for a remote server's device")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default=None, help="file stem (default: load-<model>-<device>-<date>[-suffix])")
    p.add_argument("--name-suffix", default=None)
    args = p.parse_args(argv)
    if (args.url is None) == (args.spawn_engines is None):
        p.error("give either a server URL or --spawn-engines DIR")
    if args.concurrency and args.rate:
        p.error("give --concurrency or --rate, not both")
    return args


def levels_from(args: argparse.Namespace) -> list[Level]:
    if args.rate:
        return [Level(rate=float(r)) for r in args.rate.split(",")]
    return [Level(concurrency=int(c)) for c in (args.concurrency or "1,4,8").split(",")]


async def measure(url: str, headers: dict[str, str], spec: RequestSpec, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout_s) as client:
        for i in range(args.warmup):
            shot, _ = await send_one(client, url, spec, 999_999 - i)
            if shot.outcome != "ok":
                raise RuntimeError(f"warm-up request failed: {shot.outcome} {shot.detail}")
        model = "unknown"
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            model = (await client.get(url + "/sdapi/v1/sd-models")).json()[0]["model_name"]
    results = []
    rng = random.Random(args.seed)
    for k, level in enumerate(levels_from(args)):
        budget = Budget(args.duration_s, args.requests, args.max_backoff_s)
        result = await run_level(url, headers, spec, level, budget, first_seed=1_000_000 * (k + 1),
                                 timeout_s=args.timeout_s, scrape_s=args.scrape_s, rng=rng)
        log.info("%s: %d requests, %s, p50 %s s, %.2f images/s", level.label, result["requests"],
                 result["outcomes"], _fmt(result["latency_s"]["p50"]), result["images_per_s"])
        results.append(result)
    return {"model": model, "levels": results}


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    if args.spawn_engines is None:
        yield args.url.rstrip("/"), args.api_key or os.environ.get(KEY_ENV)
        return
    with SpawnedServer(args.spawn_engines, shlex.split(args.server_args)) as server:
        yield server.url, server.api_key


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = RequestSpec(size=args.size, steps=args.steps, n=args.n, seed=args.seed, guidance_scale=args.guidance_scale)
    label, tag = device_label(args.device_label)
    today = datetime.date.today().isoformat()
    report: dict[str, Any] = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                           "request": asdict(spec)},
                              "environment": environment(label), "date": today}
    with target(args) as (url, key):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        report.update(asyncio.run(measure(url, headers, spec, args)))
        if args.in_process_engines:
            report["in_process"] = paired_baseline(url, headers, spec, args.in_process_engines, args.in_process_runs,
                                                   args.device)
    report["name"] = args.name or "-".join(
        filter(None, ["load", _slug(report["model"]), tag, today, args.name_suffix]))
    return report


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run(args)
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    bad = [lv["level"] for lv in report["levels"] if not lv["all_accepted_complete"]]
    if bad:
        print(f"accepted requests with missing or broken images at {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
