"""``sdxl-trt serve`` against a hostile client, round two (issue 25): small requests that used to cost gigabytes or
seconds, and what a client could learn, each against a real server process on loopback.

Memory is the server's peak RSS (``VmHWM`` from ``/proc``, reset before each attack through ``clear_refs``); it
must grow by less than 150 MB. Refusals that used to take seconds must come in under 3 s, while a plain request
made meanwhile answers in under 5 s. Every refusal is a 4xx in the called API's error shape, and the next good
request is served. Servers are shared per module: the pipeline double (``support/serve_double.py``, claiming
one ControlNet so control images are decoded and preprocessed) for the edge and decoding, the tiny engines with
a LoRA folder for LoRAs and leaks.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.serve_server import API_KEY, ServerProcess, auth, decode_png
from support.serve_server import start as _start
from test_lora_build import lora_files  # noqa: F401 - the module fixture lora_dir reads

TIMEOUT = 120.0
GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
A1111 = {"prompt": "x", "width": 256, "height": 256, "steps": 2}
PEAK_GROWTH_MB = 150
REFUSED_S = 3.0
MEANWHILE_S = 5.0


def _double_env(**extra: str) -> dict[str, str]:
    return {"SDXL_TRT_API_KEY": API_KEY, "SDXL_TRT_DOUBLE_CONTROLNETS": "edges", **extra}


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("double2") / "server.log"
    srv = _start(ServerProcess(None, log, "--max-body-mb", "40", "--request-timeout-s", "20", "--batch-window-ms", "0",
                               double=True, env=_double_env()))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def _peak_growth_mb(pid: int, attack: Callable[[], Any]) -> tuple[float, Any]:
    """How far the process's peak RSS rose above its RSS while ``attack()`` ran (and what it returned)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    base = _status(pid, "VmRSS")
    out = attack()
    return _status(pid, "VmHWM") - base, out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _meanwhile(srv: ServerProcess, attack: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``attack()`` while a plain A1111 txt2img is made once it has started; its answer and seconds."""
    out: list[Any] = []
    runner = threading.Thread(target=lambda: out.append(attack()))
    runner.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    r = httpx.post(srv.url + TXT2IMG, json={**A1111, "prompt": "plain"}, headers=auth(), timeout=TIMEOUT)
    plain_s = time.monotonic() - t0
    assert r.status_code == 200, r.text[:300]
    runner.join(TIMEOUT)
    return out[0], plain_s


def _with_health_probed(srv: ServerProcess, attack: Callable[[], Any]) -> tuple[Any, float]:
    """``attack()``'s result, and the slowest of the ``/health`` requests made every 50 ms while it ran."""
    done = threading.Event()
    slowest = [0.0]

    def probe() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            ok = httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200
            slowest[0] = max(slowest[0], time.monotonic() - t0 if ok else float("inf"))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        return attack(), slowest[0]
    finally:
        done.set()
        prober.join(TIMEOUT)


def _a1111_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:400])
    body = r.json()
    assert set(body) >= {"error", "detail", "errors"}, body  # A1111's error shape
    assert all(w in body["detail"] for w in words), body


def _openai_error(r: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:400])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err  # OpenAI's error shape
    assert param is None or err["param"] == param, err
    assert all(w in err["message"] for w in words), err


def _good(srv: ServerProcess) -> None:
    r = httpx.post(srv.url + TXT2IMG, json=A1111, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]


# ------------------------------------------------------------------ 1: sizes and counts before the work
def _unit(image: str, **fields: Any) -> dict[str, Any]:
    return {"alwayson_scripts": {"controlnet": {"args": [{"model": "edges", "image": image, **fields}]}}}


def test_a1111_size_is_checked_before_control_units_are_resized(double: ServerProcess) -> None:
    tiny_png = _b64(_png(Image.new("RGB", (1, 2), (10, 20, 30))))
    body = {"prompt": "x", "width": 8192, "height": 8192, **_unit(tiny_png, resize_mode=2)}
    assert len(json.dumps(body)) < 400
    t0 = time.monotonic()
    growth, r = _peak_growth_mb(double.proc.pid, lambda: httpx.post(double.url + TXT2IMG, json=body, headers=auth(),
                                                                     timeout=TIMEOUT))
    print(f"\n8192x8192 with a 1x2 control image: peak RSS +{growth:.0f} MB, refused in {time.monotonic() - t0:.3f} s")
    _a1111_error(r, 400, "width", "256x256")
    assert growth < PEAK_GROWTH_MB
    for value in (-256, 10**30, 2**31, 0, "wide"):
        r = httpx.post(double.url + TXT2IMG, json={**body, "width": value, "height": 256}, headers=auth(),
                       timeout=TIMEOUT)
        assert r.status_code == 400 and "width" in r.json()["detail"], (value, r.status_code, r.text[:300])
    _good(double)


def test_every_count_and_size_is_refused_before_images_are_decoded(double: ServerProcess) -> None:
    """Each body pairs one field over its limit with an image that cannot be decoded: the refusal must name the
    field, so nothing was decoded (or preprocessed) for it."""
    junk = _b64(b"not an image, and it would be decoded first")
    a1111 = [({"batch_size": 10**6}, "batch_size"), ({"n_iter": 10**6}, "batch_size"), ({"steps": 10**9}, "steps"),
             ({"width": 256, "height": 10**30}, "height"), ({"width": 256, "height": None}, "height")]
    for fields, name in a1111:
        r = httpx.post(double.url + IMG2IMG, json={**A1111, "init_images": [junk], **fields}, headers=auth(),
                       timeout=TIMEOUT)
        assert r.status_code == 400 and name in r.json()["detail"], (fields, r.text[:300])
        r = httpx.post(double.url + TXT2IMG, json={**A1111, **_unit(junk), **fields}, headers=auth(), timeout=TIMEOUT)
        assert r.status_code == 400 and name in r.json()["detail"], (fields, r.text[:300])
    two = {"alwayson_scripts": {"controlnet": {"args": [{"model": "edges", "image": junk}] * 2}}}
    r = httpx.post(double.url + TXT2IMG, json={**A1111, **two}, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 400 and "once" in r.json()["detail"], r.text[:300]
    unit = {"name": "edges", "image": junk}
    for fields, param in (({"n": 10**6}, "n"), ({"steps": 10**9}, "steps"), ({"size": "99999x99999"}, "size"),
                          ({"controlnets": [unit, unit]}, "controlnets")):
        r = httpx.post(double.url + GEN, json={"prompt": "x", "controlnets": [unit], **fields}, headers=auth(),
                       timeout=TIMEOUT)
        _openai_error(r, 400, param)
        form = {"prompt": "x", **{k: str(v) for k, v in fields.items() if k != "controlnets"}}
        if "controlnets" not in fields:
            r = httpx.post(double.url + EDITS, data=form, files=[("image", ("i.png", b"junk", "image/png"))],
                           headers=auth(), timeout=TIMEOUT)
            _openai_error(r, 400, param)
    _good(double)


# ------------------------------------------------------------------ 2: canny's long side
def test_canny_processor_res_bounds_both_sides(double: ServerProcess) -> None:
    thin = _b64(_png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 64, 3), dtype=np.uint8))))
    body = {**A1111, **_unit(thin, module="canny", processor_res=2048)}
    assert len(thin) < 300_000

    def attack() -> tuple[httpx.Response, float]:
        t0 = time.monotonic()
        r = httpx.post(double.url + TXT2IMG, json=body, headers=auth(), timeout=TIMEOUT)
        return r, time.monotonic() - t0

    growth, ((r, refused_s), plain_s) = _peak_growth_mb(double.proc.pid, lambda: _meanwhile(double, attack))
    print(f"\ncanny of 64x1024 at 2048: peak RSS +{growth:.0f} MB, answered {r.status_code} in {refused_s:.2f} s; "
          f"a plain request meanwhile: {plain_s:.2f} s")
    _a1111_error(r, 400, "processor_res")
    assert growth < PEAK_GROWTH_MB and refused_s < REFUSED_S and plain_s < MEANWHILE_S
    pixel_perfect = {**A1111, **_unit(thin, module="canny", pixel_perfect=True)}
    _a1111_error(httpx.post(double.url + TXT2IMG, json=pixel_perfect, headers=auth(), timeout=TIMEOUT), 400,
                 "processor_res")
    square = _b64(_png(Image.new("RGB", (256, 256), (90, 90, 90))))
    r = httpx.post(double.url + TXT2IMG, json={**A1111, **_unit(square, module="canny")}, headers=auth(),
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]


# ------------------------------------------------------------------ 3: decoding bombs
def _jpeg_scan_bomb(scans: int) -> bytes:
    """A progressive JPEG with ``scans`` extra 12-byte DC scans (each costs a pass over the image)."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x10\x00\x00"
    return data[:end] + scan * scans + data[end:]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_chunk_bomb(chunks: int) -> bytes:
    """A 64x64 PNG with ``chunks`` tiny text chunks before its pixels (Pillow reads each in Python)."""
    png = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
    return png[:33] + _png_chunk(b"tEXt", b"k\x00v") * chunks + png[33:]


def test_progressive_jpeg_scan_bombs_are_refused_at_once(double: ServerProcess) -> None:
    bomb = _b64(_jpeg_scan_bomb(100_000))
    assert len(bomb) < 2 * 2**20

    def attack() -> list[tuple[httpx.Response, float]]:
        def one(_: int) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = httpx.post(double.url + IMG2IMG, json={**A1111, "init_images": [bomb]}, headers=auth(),
                           timeout=TIMEOUT)
            return r, time.monotonic() - t0

        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(one, range(6)))

    answers, plain_s = _meanwhile(double, attack)
    print(f"\nsix 100k-scan JPEGs: refused in {max(s for _, s in answers):.2f} s at most; a plain txt2img "
          f"meanwhile: {plain_s:.2f} s")
    for r, _ in answers:
        _a1111_error(r, 400, "init_images", "scans")
    assert max(s for _, s in answers) < REFUSED_S and plain_s < MEANWHILE_S
    # The same decoder behind every image field: a control image, an OpenAI edit, a PNG of a million chunks.
    t0 = time.monotonic()
    _a1111_error(httpx.post(double.url + TXT2IMG, json={**A1111, **_unit(bomb)}, headers=auth(), timeout=TIMEOUT),
                 400, "image", "scans")
    chunky = _png_chunk_bomb(1_000_000)
    r = httpx.post(double.url + EDITS, data={"prompt": "x"}, files=[("image", ("i.png", chunky, "image/png"))],
                   headers=auth(), timeout=TIMEOUT)
    _openai_error(r, 400, "image", "chunks")
    assert time.monotonic() - t0 < 2 * REFUSED_S
    frames = [Image.new("RGB", (64, 64), (80 * k, 0, 0)) for k in range(3)]
    for kind in ("WEBP", "PNG"):  # animations: one frame of them would be decoded, the rest sent for nothing
        buf = io.BytesIO()
        frames[0].save(buf, format=kind, save_all=True, append_images=frames[1:], duration=100)
        _a1111_error(httpx.post(double.url + IMG2IMG, json={**A1111, "init_images": [_b64(buf.getvalue())]},
                                headers=auth(), timeout=TIMEOUT), 400, "init_images", "frames")
    ok = {**A1111, "init_images": [_b64(_png(Image.new("RGB", (256, 256), (5, 5, 5))))]}
    assert httpx.post(double.url + IMG2IMG, json=ok, headers=auth(), timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------ 4: header bytes
def _refused_431(port: int, *, key: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        if key:
            head += f"Authorization: Bearer {API_KEY}\r\n".encode()
        body = json.dumps(A1111).encode()
        try:
            s.sendall(head + b"X-Big: " + b"a" * (6 * 2**20) + b"\r\nContent-Length: " + str(len(body)).encode() +
                      b"\r\n\r\n" + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what it answered is still readable
        s.settimeout(10)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got  # the whole stream up to the close: one answer, then nothing


def _stream_header(port: int, megabytes: int) -> int:
    """Stream one ``X-Big`` header of up to ``megabytes``; the bytes the server took before closing."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        block = b"b" * 2**20
        try:
            for _ in range(megabytes):
                s.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_request_headers_over_the_cap_get_431_and_a_closed_connection(http_impl: str, double: ServerProcess,
                                                                      tmp_path: Path) -> None:
    srv = double if http_impl == "httptools" else _start(ServerProcess(
        None, tmp_path / "server.log", "--http", "h11", "--batch-window-ms", "0", double=True, env=_double_env()))
    try:
        for key in (True, False):  # before authentication: the same answer with or without the key
            got = _refused_431(srv.port, key=key)
            assert got.startswith(b"HTTP/1.1 431 "), got[:300]
            head, _, body = got.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower() and got.count(b"HTTP/1.1") == 1, got[:300]
            err = json.loads(body)
            assert err["error"] == "RequestHeaderFieldsTooLarge" and "64 KiB" in err["detail"], err

        growth, (sent, health_s) = _peak_growth_mb(
            srv.proc.pid, lambda: _with_health_probed(srv, lambda: _stream_header(srv.port, 300)))
        print(f"\n{http_impl}: a streamed header was cut after {sent / 2**20:.0f} MB sent; peak RSS +{growth:.0f} MB; "
              f"/health at most {health_s:.2f} s meanwhile")
        assert growth < PEAK_GROWTH_MB and health_s < MEANWHILE_S
        assert sent < 300 * 2**20  # the server closed the connection long before the header ended
        big_but_fine = {"X-Fine": "c" * 32_000}
        assert httpx.get(srv.url + "/health", headers=big_but_fine, timeout=TIMEOUT).status_code == 200
        _good(srv)
    finally:
        if srv is not double:
            assert srv.stop() == 0, srv.log()[-3000:]


# ------------------------------------------------------------------ 5: nesting
def test_deep_json_is_a_400_before_the_work(double: ServerProcess) -> None:
    nested: Any = "end"
    for _ in range(300):
        nested = {"a": nested}
    body = {**A1111, "comments": nested}
    r = httpx.post(double.url + TXT2IMG, content=json.dumps(body), headers={**auth(), "Content-Type": "application/json"},
                   timeout=TIMEOUT)
    _a1111_error(r, 400, "JSON")
    # A lone surrogate still reaches the field check (the one case the slower parser is for), even nested.
    surrogate = json.dumps({**A1111, "comments": {"a": [nested, "\ud800"]}})
    r = httpx.post(double.url + TXT2IMG, content=surrogate, headers={**auth(), "Content-Type": "application/json"},
                   timeout=TIMEOUT)
    _a1111_error(r, 400)
    r = httpx.post(double.url + TXT2IMG, content=json.dumps({**A1111, "prompt": "a \ud800"}),
                   headers={**auth(), "Content-Type": "application/json"}, timeout=TIMEOUT)
    _a1111_error(r, 400, "prompt", "surrogate")
    shallow: Any = "end"
    for _ in range(150):
        shallow = {"a": shallow}
    r = httpx.post(double.url + TXT2IMG, json={**A1111, "comments": shallow}, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]


# ------------------------------------------------------------------ 7: keys and hosts
def test_other_hosts_and_cross_site_pages_are_refused(tmp_path: Path) -> None:
    """A keyless server on loopback: the one a page elsewhere could use through DNS rebinding or a form."""
    srv = _start(ServerProcess(None, tmp_path / "server.log", "--batch-window-ms", "0", double=True, env={}))
    try:
        port = srv.port
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", f"localhost.:{port}"):
            r = httpx.post(srv.url + GEN, json={"prompt": "x"}, headers={"Host": host}, timeout=TIMEOUT)
            _openai_error(r, 400, None, "host")
            r = httpx.get(srv.url + "/health", headers={"Host": host}, timeout=TIMEOUT)
            assert r.status_code == 400, (host, r.text)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            r = httpx.post(srv.url + GEN, json={"prompt": "x"}, headers={"Host": host}, timeout=TIMEOUT)
            assert r.status_code == 200, (host, r.text[:300])
        # A form posted from a page elsewhere to 127.0.0.1 (a multipart edit needs no CORS preflight).
        files = [("image", ("i.png", _png(Image.new("RGBA", (256, 256), (0, 0, 0, 0))), "image/png"))]
        for origin in ("https://evil.example", "null"):
            r = httpx.post(srv.url + EDITS, data={"prompt": "x"}, files=files, headers={"Origin": origin},
                           timeout=TIMEOUT)
            _openai_error(r, 403, None, "cross-site")
        r = httpx.post(srv.url + EDITS, data={"prompt": "x"}, files=files,
                       headers={"Origin": f"http://localhost:{port}"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text[:300]
    finally:
        assert srv.stop() == 0


def test_allowed_hosts_flag_and_a_non_ascii_key(tmp_path: Path) -> None:
    from sdxl_trt.serve.core.settings import ServeSettings

    local = ServeSettings(engines=Path("."), host="127.0.0.1").hosts_allowed
    assert "*" not in local and {"localhost", "127.0.0.1", "::1"} <= set(local)
    assert ServeSettings(engines=Path("."), host="127.0.0.1", api_key="k").hosts_allowed == ("*",)
    assert ServeSettings(engines=Path("."), host="0.0.0.0", api_key="k").hosts_allowed == ("*",)
    key = "clé-ключ-鍵"
    srv = _start(ServerProcess(None, tmp_path / "server.log", "--allowed-hosts",
                               "api.example.com,*.example.org,127.0.0.1", double=True, env={"SDXL_TRT_API_KEY": key}))
    try:
        bearer = {b"Authorization": b"Bearer " + key.encode("utf-8")}
        for host, status in (("api.example.com", 200), ("a.b.example.org", 200), ("example.org", 400),
                             ("localhost", 400)):
            r = httpx.get(srv.url + "/sdapi/v1/samplers", headers={**bearer, b"Host": host.encode()}, timeout=TIMEOUT)
            assert r.status_code == status, (host, r.text[:200])
        # The key's UTF-8 bytes on either scheme (a latin-1 header used to be compared with UTF-8 bytes).
        basic = {b"Authorization": b"Basic " + base64.b64encode(b"user:" + key.encode("utf-8"))}
        for headers in (bearer, basic):
            r = httpx.post(srv.url + GEN, json={"prompt": "x"}, headers=headers, timeout=TIMEOUT)
            assert r.status_code == 200, (headers, r.text[:300])
        wrong = {b"Authorization": b"Bearer " + key.encode("latin-1", "replace")}
        _openai_error(httpx.post(srv.url + GEN, json={"prompt": "x"}, headers=wrong, timeout=TIMEOUT), 401, None)
    finally:
        assert srv.stop() == 0
        assert key not in srv.log()


# ------------------------------------------------------------------ 6, 7: LoRA files and server paths (tiny engines)
def _misfit_lora(path: Path, layers: int) -> None:
    """A diffusers-format LoRA of ``layers`` tiny layers that match no layer of the model: cheap to write,
    seconds of key conversion to read."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i in range(layers):
        base = f"unet.down_blocks.0.attentions.0.transformer_blocks.{i}.attn1.to_q"
        tensors[base + ".lora_A.weight"] = torch.zeros(1, 4)
        tensors[base + ".lora_B.weight"] = torch.zeros(4, 1)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_folder(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    (style, _), _ = request.getfixturevalue("lora_files")
    d = tmp_path_factory.mktemp("loras2")
    shutil.copy(style, d / "style.safetensors")
    shutil.copy(style, d / "café.safetensors")
    shutil.copy(style, d / "odd(1).safetensors")
    outside = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    shutil.copy(style, outside)
    os.symlink(outside, d / "escape.safetensors")
    _misfit_lora(d / "misfit.safetensors", 8000)
    return d


@pytest.fixture(scope="module")
def tiny_lora(tiny_engines: Path, lora_folder: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tiny-lora") / "server.log"
    srv = _start(ServerProcess(tiny_engines, log, "--lora-dir", str(lora_folder), "--warmup", "none",
                               "--batch-window-ms", "0", "--max-steps", "10"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _lora_gen(srv: ServerProcess, name: str) -> httpx.Response:
    body = {"prompt": "a harbour", "size": "256x256", "steps": 2, "seed": 9, "loras": [{"name": name, "scale": 0.8}]}
    return httpx.post(srv.url + GEN, json=body, headers=auth(), timeout=TIMEOUT)


def test_lora_files_are_read_off_the_loop_and_failures_remembered(tiny_lora: ServerProcess, lora_folder: Path) -> None:
    def attack() -> list[tuple[httpx.Response, float]]:
        def one(_: int) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            return _lora_gen(tiny_lora, "misfit"), time.monotonic() - t0

        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(one, range(4)))  # the first reads of a large misfit file (diffusers' import too)
        return first + [one(0) for _ in range(3)]  # then the same file, unchanged

    answers, health_s = _with_health_probed(tiny_lora, attack)
    print(f"\nmisfit LoRA: first refusals in {max(s for _, s in answers[:4]):.2f} s, the same file again in "
          f"{', '.join(f'{s:.2f}' for _, s in answers[4:])} s; /health at most {health_s:.2f} s meanwhile")
    for r, _ in answers:
        _openai_error(r, 400, "loras", "misfit.safetensors", "does not fit")
        assert str(lora_folder) not in r.text and str(lora_folder.resolve()) not in r.text  # a name, not a path
    assert health_s < MEANWHILE_S
    assert max(s for _, s in answers[4:]) < REFUSED_S
    # Changed (a good LoRA under the same name): read again, and applied.
    shutil.copy(lora_folder / "style.safetensors", lora_folder / "misfit.safetensors")
    try:
        r = _lora_gen(tiny_lora, "misfit")
        assert r.status_code == 200, r.text[:300]
        assert np.array_equal(decode_png(r.json()["data"][0]["b64_json"]),
                              decode_png(_lora_gen(tiny_lora, "style").json()["data"][0]["b64_json"]))
    finally:
        _misfit_lora(lora_folder / "misfit.safetensors", 8000)


def test_lora_names_symlinks_and_listing(tiny_lora: ServerProcess) -> None:
    listed = {e["name"] for e in httpx.get(tiny_lora.url + "/sdapi/v1/loras", headers=auth(), timeout=TIMEOUT).json()}
    assert {"style", "café", "misfit"} <= listed
    assert "escape" not in listed and "odd(1)" not in listed  # out of the folder; not a name a request can send
    _openai_error(_lora_gen(tiny_lora, "escape"), 400, "loras", "unknown LoRA")
    _openai_error(_lora_gen(tiny_lora, "style\n"), 400, "loras", "is not a name")
    cafe = _lora_gen(tiny_lora, "cafe\u0301")  # NFD, as some file systems and keyboards spell it
    assert cafe.status_code == 200, cafe.text[:300]
    style = _lora_gen(tiny_lora, "style")
    assert np.array_equal(decode_png(cafe.json()["data"][0]["b64_json"]), decode_png(style.json()["data"][0]["b64_json"]))
    r = httpx.post(tiny_lora.url + TXT2IMG, json={**A1111, "prompt": "x <lora:café:0.8>"}, headers=auth(),
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    assert "escape.safetensors" in tiny_lora.log()  # why it is left out: in the log


def test_no_server_path_in_error_bodies(tiny_lora: ServerProcess, tiny_engines: Path) -> None:
    """The ControlNet rebuild hint names the engine directory; a refused body must not."""
    control = _b64(_png(Image.new("RGB", (256, 256))))
    for r in (httpx.post(tiny_lora.url + GEN, json={"prompt": "x", "controlnets": [{"name": "edges", "image": control}]},
                         headers=auth(), timeout=TIMEOUT),
              httpx.post(tiny_lora.url + TXT2IMG, json={**A1111, **_unit(control)}, headers=auth(), timeout=TIMEOUT)):
        assert r.status_code == 400 and "--controlnet" in r.text, r.text[:300]
        for path in (str(tiny_engines), str(tiny_engines.resolve()), str(tiny_engines.parent)):
            assert path not in r.text, r.text
    ready = httpx.get(tiny_lora.url + "/ready", timeout=TIMEOUT).json()
    assert set(ready) <= {"ready", "state", "queue_depth", "worker"}, ready


def test_ready_says_only_its_state_after_a_failed_load() -> None:
    import asyncio

    from sdxl_trt.errors import ManifestError
    from sdxl_trt.serve.core.settings import ServeSettings
    from sdxl_trt.serve.http.app import create_app

    secret = "/srv/private/engines/sdxl"

    def factory(settings: ServeSettings) -> Any:
        raise ManifestError(f"the engines in {secret} were built for another GPU")

    async def run() -> None:
        app = create_app(ServeSettings(engines=Path(secret), warmup="none"), factory)
        async with app.router.lifespan_context(app):
            await app.state.service.wait_loaded()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                r = await client.get("/ready")
                assert r.status_code == 503 and r.json() == {"ready": False, "state": "failed"}, r.text

    asyncio.run(run())


# ------------------------------------------------------------------ the connection after refusals
def test_a_pooled_connection_survives_the_refusals(double: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", double.port, timeout=TIMEOUT)
    headers = {**auth(), "Content-Type": "application/json"}
    unit = _unit(_b64(_png(Image.new("RGB", (1, 2)))))
    try:
        for body in ({**A1111, **unit, "width": -256}, {**A1111, **unit, "width": 10**30},
                     {**A1111, **unit, "batch_size": 10**9}):
            conn.request("POST", TXT2IMG, body=json.dumps(body), headers=headers)
            r = conn.getresponse()
            assert r.status == 400, r.read()[:300]
            r.read()
            conn.request("POST", TXT2IMG, body=json.dumps(A1111), headers=headers)
            ok = conn.getresponse()
            assert ok.status == 200, ok.read()[:300]
            ok.read()
    finally:
        conn.close()
