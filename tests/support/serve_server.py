"""A real ``sdxl-trt serve`` subprocess on a free loopback port, for the HTTP tests."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

API_KEY = "test-key-0f8e2c"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DOUBLE = Path(__file__).with_name("serve_double.py")


class ServerProcess:
    """``sdxl-trt serve`` on ``engines``; with ``double=True`` the same server over a misbehaving pipeline double
    (``serve_double.py``, engines unused). ``env`` replaces the test key's environment entry when given."""

    def __init__(self, engines: Path | None, log_path: Path, *args: str, double: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        base = {k: v for k, v in os.environ.items() if k != "SDXL_TRT_API_KEY"}
        full_env = {**base, **(env if env is not None else {"SDXL_TRT_API_KEY": API_KEY}), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, str(DOUBLE)] if double else [
            sys.executable, "-m", "sdxl_trt.cli", "serve", "--engines", str(engines)]
        self.proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start(srv: ServerProcess) -> ServerProcess:
    """``srv`` once ready (stopped if it never gets there)."""
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


def served(engines: Path | None, log_path: Path, *args: str, clean_exit: bool = False,
           secret: str | None = None) -> Iterator[ServerProcess]:
    """A module fixture's whole body (``yield from served(...)``): the server started and ready, yielded, stopped.
    With ``clean_exit`` it must then have exited 0 with no traceback (nor ``secret``) in its log."""
    srv = ServerProcess(engines, log_path, *args)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        text = srv.log()
    if clean_exit:
        assert code == 0, text[-3000:]
        assert secret is None or secret not in text, "the secret reached a log line"
        assert "Traceback" not in text, text[-3000:]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def decode_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0
