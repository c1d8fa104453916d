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

Writes ``<out>/<name>.json``, ``.md`` and ``.png``; the name holds the device and the date. The statistics and
the report are ``load_report.py``'s; this file generates the load.

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
import logging
import os
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_report beside this file, also when loaded by path
from load_report import (  # noqa: E402
    ENDPOINT,
    Level,
    Shot,
    _fmt,
    _slug,
    device_label,
    environment,
    markdown,
    parse_metrics,
    percentile,
    summarize,
    write,
)

log = logging.getLogger("load_bench")
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


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.1
    except ValueError:
        return 0.1


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
        if exc[0] is None and self.proc is not None and self.proc.returncode == 0:
            Path(self.log_file.name).unlink(missing_ok=True)
        else:  # kept for whoever reads the failure
            log.warning("the server's log is kept at %s", self.log_file.name)

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
