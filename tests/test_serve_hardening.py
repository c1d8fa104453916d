"""``sdxl-trt serve`` as an attacker and a sloppy client meet it (issue 14), each against a real server process on
loopback: slow connections closed within their deadlines and their memory given back, huge prompts refused in
milliseconds while another request generates, inputs that used to give 500s refused with a 400 on a connection
that stays usable, an empty key refused at start, a key from a file, a pipeline that raises or hangs leaving
the server answering, EXIF-rotated photos upright, 16-bit masks scaled, fully opaque edit masks refused.

Two kinds of server: the real one on the tiny engines (pixels and prompts), and the same server over a
misbehaving pipeline double (``support/serve_double.py``) where only the edge and the worker matter.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from support.serve_server import API_KEY, ServerProcess, auth, decode_png, metric, png_b64
from support.serve_server import start as _start

from sdxl_trt.request import GenerationRequest

TIMEOUT = 120.0
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server over a pipeline double, with short edge deadlines so the slow-client tests take seconds."""
    log = tmp_path_factory.mktemp("double") / "server.log"
    srv = _start(ServerProcess(None, log, "--header-timeout-s", "1", "--body-timeout-s", "6", "--chunk-timeout-s",
                               "3", "--max-body-mb", "40", "--request-timeout-s", "2", "--batch-window-ms", "200",
                               "--limit-concurrency", "40", double=True))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert API_KEY not in srv.log()


@pytest.fixture(scope="module")
def tiny(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tiny") / "server.log"
    srv = _start(ServerProcess(tiny_engines, log, "--warmup", "256x256", "--max-body-mb", "20", "--max-steps", "10"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _held_bytes(srv: ServerProcess) -> float:
    text = httpx.get(srv.url + "/metrics", headers=auth(), timeout=TIMEOUT).text
    return metric(text, "sdxl_trt_request_body_bytes")


def _closed_after(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (bounded by ``limit_s``), and what it sent first."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return time.monotonic() - t0, got


# ------------------------------------------------------------------------------------------- 1: slow clients
def test_silent_and_half_header_connections_are_closed_at_the_header_deadline(double: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", double.port)) as silent, \
            socket.create_connection(("127.0.0.1", double.port)) as half:
        half.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        for sock in (silent, half):
            seconds, got = _closed_after(sock, 10)
            assert seconds < 3, seconds  # --header-timeout-s 1, plus scheduling slack on 2 busy cores
            assert got.startswith(b"HTTP/1.1 408"), got
    assert httpx.get(double.url + "/ready", timeout=TIMEOUT).status_code == 200


def _whole_response(data: bytes) -> bool:
    """Headers and the Content-Length body have arrived (they may come in separate packets)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lengths = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return len(body) >= (lengths[0] if lengths else 0)


def test_slow_and_stalled_bodies_get_408_and_their_memory_back(double: ServerProcess) -> None:
    head = (f"POST /sdapi/v1/img2img HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n")
    # A body that trickles (a byte every 0.25 s, under the 3 s chunk timeout) hits the 6 s body deadline.
    with socket.create_connection(("127.0.0.1", double.port)) as slow:
        slow.sendall(head.format(n=1000).encode())
        t0 = time.monotonic()
        slow.settimeout(0.25)
        got = b""
        for _ in range(60):  # bounded: 15 s
            try:
                slow.sendall(b" ")
                chunk = slow.recv(65536)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                continue
            got += chunk
            if not chunk or _whole_response(got):
                break
        assert got.startswith(b"HTTP/1.1 408") and b"within 6 s" in got, got
        assert time.monotonic() - t0 < 8

    # Ten connections each send 30 MB of a 35 MB body and stop: the server holds 300 MB, then drops them at the
    # chunk timeout and gives the memory back.
    base = _rss_mb(double.proc.pid)
    socks = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", double.port))
            s.sendall(head.format(n=35 * 2**20).encode())
            socks.append(s)
        blob = b"x" * 2**20
        senders = [threading.Thread(target=lambda s=s: [s.sendall(blob) for _ in range(30)]) for s in socks]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        peak_rss = _rss_mb(double.proc.pid)
        held = _held_bytes(double)
        outcomes = [_closed_after(s, 10) for s in socks]
    finally:
        for s in socks:
            s.close()
    print(f"\nstalled bodies: rss {base:.0f} MB -> {peak_rss:.0f} MB while held ({held / 2**20:.0f} MB of bodies "
          f"counted); after: {_rss_mb(double.proc.pid):.0f} MB")
    assert all(got.startswith(b"HTTP/1.1 408") for _, got in outcomes), outcomes[0]  # stalled (or, on a
    # starved machine, still sending at the body deadline): refused either way
    assert held >= 200 * 2**20  # they were really held ...
    for _ in range(50):  # ... and are given back (bounded: 5 s)
        if _held_bytes(double) == 0 and _rss_mb(double.proc.pid) < base + 100:
            break
        time.sleep(0.1)
    assert _held_bytes(double) == 0
    assert _rss_mb(double.proc.pid) < base + 100, (base, peak_rss, _rss_mb(double.proc.pid))
    assert httpx.post(double.url + GEN, json={"prompt": "ok"}, headers=auth(), timeout=TIMEOUT).status_code == 200


def test_limit_concurrency_refuses_with_503(double: ServerProcess) -> None:
    """--limit-concurrency 40: with 40 connections open, the next request is refused at once, not queued."""
    socks = [socket.create_connection(("127.0.0.1", double.port)) for _ in range(40)]
    try:
        r = httpx.get(double.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 503  # uvicorn's own refusal, before our app: plain text, logged by name
        assert "Exceeded concurrency limit" in double.log()
    finally:
        for s in socks:
            s.close()
    for _ in range(50):  # bounded: 5 s, until the server saw the closes
        if httpx.get(double.url + "/health", timeout=TIMEOUT).status_code == 200:
            break
        time.sleep(0.1)
    assert httpx.get(double.url + "/health", timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------------------- 2, 3: prompts
def test_15mb_prompt_is_refused_in_under_a_second_while_another_generates(tiny: ServerProcess) -> None:
    body = {"prompt": "a slow one", "size": "256x256", "steps": 10, "seed": 3}
    results: list[httpx.Response] = []

    def generate() -> None:  # another client, on a connection of its own: the refusal below closes the refused
        # client's connection early, and with one shared httpx.Client that once broke this request's read (EBADF)
        with httpx.Client(headers=auth(), timeout=TIMEOUT) as other:
            results.append(other.post(tiny.url + GEN, json=body))

    with httpx.Client(headers=auth(), timeout=TIMEOUT) as client:
        busy = threading.Thread(target=generate)
        busy.start()
        for _ in range(200):  # until it runs (bounded: 10 s)
            if client.get(tiny.url + "/sdapi/v1/progress").json()["state"]["job_count"] >= 1:
                break
            time.sleep(0.05)
        # 15 MB: over the body limit of a text-only endpoint, refused from its Content-Length (413).
        huge = json.dumps({"prompt": "a" * 15_000_000, "size": "256x256", "steps": 2}).encode()
        t0 = time.monotonic()
        r = client.post(tiny.url + GEN, content=huge, headers={"Content-Type": "application/json"})
        refused_s = time.monotonic() - t0
        assert r.status_code == 413 and "only text" in r.json()["error"]["message"], r.text[:300]
        # 100 000 characters: within the body limit, refused by the character cap, naming the field (400).
        t0 = time.monotonic()
        r = client.post(tiny.url + GEN, json={"prompt": "a" * 100_000, "size": "256x256", "steps": 2})
        capped_s = time.monotonic() - t0
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text[:300]
        assert "8192" in r.json()["error"]["message"]
        assert client.get(tiny.url + "/sdapi/v1/progress").json()["state"]["job_count"] >= 1  # still generating
        busy.join(TIMEOUT)
    print(f"\n15 MB prompt refused in {refused_s:.3f} s, 100k-character prompt in {capped_s:.3f} s, while another "
          "request generated")
    assert refused_s < 1.0 and capped_s < 1.0
    assert results and results[0].status_code == 200


def test_whitespace_prompts_are_refused_or_answered_small(tiny: ServerProcess) -> None:
    padded = "a" + " " * 4_000_000
    body = {"prompt": padded, "negative_prompt": padded, "width": 256, "height": 256, "steps": 1, "batch_size": 8}
    t0 = time.monotonic()
    r = httpx.post(tiny.url + "/sdapi/v1/txt2img", json=body, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 413 and "only text" in r.json()["detail"], r.text[:300]
    assert time.monotonic() - t0 < 1.0
    r = httpx.post(tiny.url + "/sdapi/v1/txt2img", json={**body, "prompt": "a" + " " * 9000, "negative_prompt": ""},
                   headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 400 and "prompt" in r.json()["detail"] and "8192" in r.json()["detail"], r.text[:300]
    # Just under the cap: answered, and the prompts echoed stay small next to the images.
    near = "a" + " " * 8000
    r = httpx.post(tiny.url + "/sdapi/v1/txt2img", json={**body, "prompt": near, "negative_prompt": near},
                   headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    per_image = len(r.content) / len(r.json()["images"])
    print(f"\nwhitespace prompt at the cap, batch_size 8: {len(r.content) / 2**20:.2f} MB, {per_image / 2**10:.0f} kB "
          "per image")
    assert per_image < 2**20


# ------------------------------------------------------------------------------------------- 4: 400, not 500
A1111 = {"prompt": "x", "width": 256, "height": 256, "steps": 1}
BAD_INPUTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("size_superscript", GEN, {"prompt": "x", "steps": 1, "size": "\u00b2x256"}, "size"),
    ("size_5000_digits", GEN, {"prompt": "x", "steps": 1, "size": "9" * 5000 + "x256"}, "size"),
    ("alwayson_args_not_list", "/sdapi/v1/txt2img", {**A1111, "alwayson_scripts": {"a": {"args": 5}}},
     "alwayson_scripts.a.args"),
    ("override_checkpoint_list", "/sdapi/v1/txt2img", {**A1111, "override_settings": {"sd_model_checkpoint": [1]}},
     "override_settings"),
    ("a1111_prompt_surrogate", "/sdapi/v1/txt2img", {**A1111, "prompt": "a \ud800 b"}, "prompt"),
    ("a1111_negative_surrogate", "/sdapi/v1/txt2img", {**A1111, "negative_prompt": "\ud800"}, "negative_prompt"),
    ("openai_negative_surrogate", GEN, {"prompt": "x", "steps": 1, "negative_prompt": "\ud800"}, "negative_prompt"),
]


def test_each_bad_input_is_a_400_and_the_connection_stays_usable(tiny: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tiny.port, timeout=TIMEOUT)
    headers = {**auth(), "Content-Type": "application/json"}
    good = json.dumps({"prompt": "ok", "size": "256x256", "steps": 1, "seed": 1})
    try:
        for name, path, body, field in BAD_INPUTS:
            conn.request("POST", path, body=json.dumps(body), headers=headers)  # ASCII JSON: \ud800 as an escape
            r = conn.getresponse()
            text = r.read().decode()
            assert r.status == 400, (name, r.status, text[:300])
            assert r.getheader("connection") != "close", name
            err = json.loads(text)
            assert field in (err["error"]["param"] if path == GEN else err["detail"]), (name, err)
            sock = conn.sock
            conn.request("POST", GEN, body=good, headers=headers)
            ok = conn.getresponse()
            assert ok.status == 200, (name, ok.read()[:300])
            ok.read()
            assert conn.sock is sock, f"{name}: the server closed the connection"
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------- 5: the key
def test_empty_key_is_refused_at_start(tiny_engines: Path, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "sdxl_trt.cli", "serve", "--engines", str(tiny_engines), "--port", "1"]
    env = {k: v for k, v in os.environ.items() if k != "SDXL_TRT_API_KEY"}
    empty_file = tmp_path / "empty.key"
    empty_file.write_text("\n")
    for extra, extra_env, names in ((["--api-key", ""], {}, "--api-key"),
                                    ([], {"SDXL_TRT_API_KEY": ""}, "SDXL_TRT_API_KEY"),
                                    (["--api-key-file", str(empty_file)], {}, "--api-key-file"),
                                    (["--api-key-file", str(tmp_path / "missing")], {}, "missing")):
        r = subprocess.run([*base, *extra], env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and names in r.stderr, (extra, extra_env, r.returncode, r.stderr[-500:])


def test_key_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key-91c4\n")
    srv = _start(ServerProcess(None, tmp_path / "server.log", "--api-key-file", str(key_file), double=True, env={}))
    try:
        assert "file-key-91c4" not in " ".join(srv.proc.args)  # not on the command line (ps)
        assert httpx.post(srv.url + GEN, json={"prompt": "x"}, timeout=TIMEOUT).status_code == 401
        r = httpx.post(srv.url + GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer file-key-91c4"},
                       timeout=TIMEOUT)
        assert r.status_code == 200, r.text
    finally:
        assert srv.stop() == 0


# ------------------------------------------------------------------------------------------- 6: the worker
def test_a_pipeline_that_raises_or_misbehaves_leaves_the_server_answering(double: ServerProcess) -> None:
    with httpx.Client(headers=auth(), timeout=TIMEOUT) as client:
        def post(prompt: str) -> httpx.Response:
            return client.post(double.url + GEN, json={"prompt": prompt, "size": "256x256"})

        for bad in ("boom", "short"):  # each in a batch with two good requests (200 ms batch window)
            with ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(post, [bad, "good one", "good two"]))
            assert answers[0].status_code == 500 and answers[0].json()["error"]["code"] == "internal_error", bad
            assert [a.status_code for a in answers[1:]] == [200, 200], [a.text for a in answers]
            assert post("after").status_code == 200
        assert client.get(double.url + "/ready").status_code == 200

        # A hung engine: the request gets 504 at its deadline (--request-timeout-s 2), the watchdog turns /ready
        # 503, and when the engine returns the server answers again.
        t0 = time.monotonic()
        r = post("hang")
        assert r.status_code == 504 and time.monotonic() - t0 < 6, r.text
        ready = client.get(double.url + "/ready")
        assert ready.status_code == 503 and "past its deadline" in ready.json()["worker"]
        for _ in range(100):  # bounded: 10 s (the double hangs for 8 s)
            if client.get(double.url + "/ready").status_code == 200:
                break
            time.sleep(0.1)
        assert client.get(double.url + "/ready").status_code == 200
        assert post("after the hang").status_code == 200


# ------------------------------------------------------------------------------------------- 7: images
def _pattern(width: int = 256, height: int = 256) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    top = (y < height // 3)[..., None]
    arr = np.where(top, 250, np.stack([x * 255 // width, y * 255 // height, (x + y) % 64 * 4], axis=-1))
    return Image.fromarray(arr.astype(np.uint8))


def test_exif_rotated_jpeg_arrives_upright(tiny: ServerProcess, tiny_pipeline) -> None:
    upright = _pattern()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's pixels; EXIF 6 says: turn them back
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    jpeg = out.getvalue()
    with Image.open(io.BytesIO(jpeg)) as im:
        shown = ImageOps.exif_transpose(im).convert("RGB")  # what a photo viewer shows
    assert np.asarray(shown)[:40].mean() > 200  # the white band is at the top when viewed
    body = {"prompt": "a wall", "width": 256, "height": 256, "steps": 2, "seed": 4, "sampler_name": "Euler",
            "cfg_scale": 5, "denoising_strength": 0.5, "init_images": [base64.b64encode(jpeg).decode()]}
    r = httpx.post(tiny.url + "/sdapi/v1/img2img", json=body, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a wall", width=256, height=256, steps=2, seed=4,
                                                   scheduler="euler", guidance_scale=5.0, init_image=shown,
                                                   strength=0.5))
    assert np.array_equal(decode_png(r.json()["images"][0]), np.asarray(ref.images[0].convert("RGB")))


def test_16bit_mask_is_scaled_not_clipped(tiny: ServerProcess, tiny_pipeline) -> None:
    deep = np.full((256, 256), 20000, dtype=np.uint16)  # 20000/65535 of white: 78 in 8 bits, not 255
    deep[:, :128] = 65535
    out = io.BytesIO()
    Image.fromarray(deep).save(out, format="PNG")
    init = _pattern()
    body = {"prompt": "a door", "width": 256, "height": 256, "steps": 2, "seed": 5, "sampler_name": "Euler",
            "cfg_scale": 5, "denoising_strength": 0.9, "init_images": [png_b64(init)], "mask_blur": 0,
            "mask": base64.b64encode(out.getvalue()).decode()}
    r = httpx.post(tiny.url + "/sdapi/v1/img2img", json=body, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    mask8 = np.full((256, 256), 78, dtype=np.uint8)
    mask8[:, :128] = 255
    ref = tiny_pipeline.generate(GenerationRequest(prompt="a door", width=256, height=256, steps=2, seed=5,
                                                   scheduler="euler", guidance_scale=5.0, init_image=init,
                                                   strength=0.9, mask_image=Image.fromarray(mask8, mode="L")))
    assert np.array_equal(decode_png(r.json()["images"][0]), np.asarray(ref.images[0].convert("RGB")))


def test_fully_opaque_edit_mask_is_refused(double: ServerProcess) -> None:
    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    files = [("image", ("image.png", png(Image.new("RGB", (256, 256), (9, 9, 9))), "image/png")),
             ("mask", ("mask.png", png(Image.new("RGBA", (256, 256), (0, 0, 0, 255))), "image/png"))]
    r = httpx.post(double.url + "/v1/images/edits", data={"prompt": "x"}, files=files, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask", r.text
    assert "opaque" in r.json()["error"]["message"]
