"""Ray Serve scale-out: two CPU replicas of the same app over tiny engines, loopback only.

The server is ``sdxl-trt serve --ray --replicas 2`` in its own process, so Ray's state and signal handlers
never touch the test process; one local cluster serves the whole module (ready in about 15-25 s on 2 cores).
The kill test SIGKILLs one replica's process in the middle of a bounded load and checks what clients see: at
most the requests that replica held fail (at once, with an HTTP error, never a hang), Ray starts a
replacement, and every request sent after the kill succeeds. The last test stops the server with SIGTERM
while requests are running: they are answered, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.serve_server import decode_png, free_port

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'sdxl-trt[ray]')")

from sdxl_trt.serve.core.settings import ServeSettings  # noqa: E402
from sdxl_trt.serve.deploy.ray_app import (  # noqa: E402 - after the skip
    PID_HEADER,
    REPLICA_HEADER,
    RayOptions,
    deployment_options,
    parse_autoscale,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

BODY = {"prompt": "a red cube", "size": "256x256", "steps": 2, "response_format": "b64_json"}
CLIENT_TIMEOUT_S = 60.0


@dataclass
class RayServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def ray_server(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServerProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray") / "server.log"
    # A local cluster of this machine's CPUs (CPU replicas: one CPU and one torch thread each), no API key.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SDXL_TRT_API_KEY")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdxl_trt.cli", "serve", "--ray", "--replicas", "2", "--engines", str(tiny_engines),
             "--host", "127.0.0.1", "--port", str(port), "--batch-window-ms", "5", "--drain-timeout-s", "10",
             "--warmup", "256x256"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = RayServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 150
        while not _ready(server.url):
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{server.log()}"
            assert time.monotonic() < deadline, f"not ready after 150 s:\n{server.log()}"
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | str  # HTTP status, or the transport error's class name
    pid: str | None
    detail: str = ""


async def _one(client: httpx.AsyncClient, url: str, seed: int) -> Outcome:
    t0 = time.monotonic()
    try:
        r = await client.post(f"{url}/v1/images/generations", json={**BODY, "seed": seed})
    except httpx.HTTPError as e:
        return Outcome(t0, time.monotonic(), type(e).__name__, None, str(e))
    if r.status_code == 200:
        image = decode_png(r.json()["data"][0]["b64_json"])
        assert image.shape == (256, 256, 3)
    return Outcome(t0, time.monotonic(), r.status_code, r.headers.get(PID_HEADER),
                   "" if r.status_code == 200 else r.text[:200])


def test_same_api_on_both_replicas(ray_server: RayServerProcess) -> None:
    replicas: dict[str, str] = {}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for seed in range(40):  # bounded: Ray's router spreads load, so both show up long before this
            r = client.post(f"{ray_server.url}/v1/images/generations", json={**BODY, "seed": seed})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 1
            replicas[r.headers[REPLICA_HEADER]] = r.headers[PID_HEADER]
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, f"only {replicas} answered"
        health = client.get(f"{ray_server.url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.headers[REPLICA_HEADER] in replicas
        assert client.get(f"{ray_server.url}/ready").status_code == 200
        metrics = client.get(f"{ray_server.url}/metrics").text
        assert "sdxl_trt_queue_depth" in metrics and "sdxl_trt_batch_size" in metrics
        bad = client.post(f"{ray_server.url}/v1/images/generations", json={**BODY, "size": "1000x10"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"


def test_killed_replica_is_replaced(ray_server: RayServerProcess) -> None:
    outcomes, killed_at, victim, replaced_s = asyncio.run(_load_with_kill(ray_server))
    before = [o for o in outcomes if o.started < killed_at]
    after = [o for o in outcomes if o.started >= killed_at]
    in_flight = [o for o in before if o.ended >= killed_at]
    failed = [o for o in outcomes if o.status != 200]
    summary = {
        "before_kill": dict(collections.Counter(o.status for o in before)),
        "in_flight_at_kill": len(in_flight),
        "after_kill": dict(collections.Counter(o.status for o in after)),
        "failed": [(round(o.started - killed_at, 2), round(o.ended - killed_at, 2), o.status, o.detail)
                   for o in failed],
        "replacement_serving_after_s": round(replaced_s, 1),
    }
    log.warning("kill test, what clients saw: %s", summary)
    print(f"\nkill test outcomes: {summary}")

    # Only requests the dead replica held may fail: they started before the kill and were still running.
    assert all(o in in_flight for o in failed), summary
    # ... and they fail fast with an HTTP error, not a hang or a dropped connection.
    assert all(isinstance(o.status, int) and o.status >= 500 and o.ended - killed_at < 10 for o in failed), summary
    # Every request sent after the kill succeeded, served by the survivor and then the replacement.
    assert after and all(o.status == 200 for o in after), summary
    assert victim not in {o.pid for o in after}
    assert _ready(ray_server.url)


async def _load_with_kill(server: RayServerProcess) -> tuple[list[Outcome], float, str, float]:
    """Four clients in closed loops; kill one replica once both have answered; run until its replacement
    has answered too (bounded: about 90 s), then 2 s more."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, first_seed: int) -> None:
        seed = first_seed
        while not stop.is_set():
            outcomes.append(await _one(client, server.url, seed))
            seed += 4

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        tasks = [asyncio.create_task(client_loop(client, k)) for k in range(4)]
        try:
            pids = await _wait_for(lambda: {o.pid for o in outcomes if o.pid}, lambda p: len(p) >= 2, 60)
            victim = sorted(pids)[0]
            killed_at = time.monotonic()
            os.kill(int(victim), signal.SIGKILL)
            new = await _wait_for(lambda: {o.pid for o in outcomes if o.pid and o.started > killed_at} - pids,
                                  bool, 90)
            replaced_s = time.monotonic() - killed_at
            log.info("replica pid %s killed; replacement %s serving after %.1f s", victim, new, replaced_s)
            await asyncio.sleep(2)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), CLIENT_TIMEOUT_S + 5)
    return outcomes, killed_at, victim, replaced_s


async def _wait_for(read, done, timeout_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = read()
        if done(value):
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s; last value {read()!r}")


def test_sigterm_to_the_process_group_answers_running_requests_then_exits_0(ray_server: RayServerProcess) -> None:
    """Runs last: SIGTERM while two slow requests run, sent as an orchestrator stops it, to the whole process group
    (a supervisor, dumb-init, ``kill -- -PGID``). Both requests are answered, then the process exits 0: Ray's own
    processes must not die first (the driver would wait 60 s for the lost GCS and exit 1); the server drains, stops
    its cluster and exits."""
    answers: dict[int, int | str] = {}

    def slow(seed: int) -> None:
        try:
            r = httpx.post(f"{ray_server.url}/v1/images/generations", json={**BODY, "steps": 30, "seed": seed},
                           timeout=CLIENT_TIMEOUT_S)
            answers[seed] = r.status_code
        except httpx.HTTPError as e:
            answers[seed] = type(e).__name__

    threads = [threading.Thread(target=slow, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    os.killpg(ray_server.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 5)
    rc = ray_server.proc.wait(60)
    print(f"\nSIGTERM with 2 requests running: answers {answers}, exit {rc} after {time.monotonic() - t0:.1f} s")
    assert answers == {0: 200, 1: 200}, ray_server.log()
    assert rc == 0, ray_server.log()
    assert time.monotonic() - t0 < 40
    assert not _ready(ray_server.url)


def test_parse_autoscale() -> None:
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4:1", "x", "1:2:3", "0:0"):
        with pytest.raises(ValueError, match="MIN"):
            parse_autoscale(bad)


def test_deployment_options_keep_our_overload_rules(tmp_path: Path) -> None:
    settings = ServeSettings(engines=tmp_path, max_queue=10, drain_timeout_s=7.0)
    fixed = deployment_options(settings, RayOptions(replicas=3), gpus=1.0, max_batch=4)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert fixed["max_ongoing_requests"] == 14  # our queue (429 beyond it) plus one running batch
    assert fixed["graceful_shutdown_timeout_s"] > settings.drain_timeout_s
    auto = deployment_options(settings, RayOptions(autoscale=(1, 4)), gpus=0.0, max_batch=4)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 8.0}
