"""uvicorn's server with a drain before its graceful shutdown.

uvicorn on SIGTERM stops listening at once and, once stopped, re-raises the signal (the process then dies by
signal, not with exit code 0). Here the first SIGTERM or SIGINT starts the service's drain while the
listener stays open, so ``/ready`` answers 503 and new requests get 503 instead of a refused connection;
queued and running requests finish, then uvicorn's graceful shutdown runs and ``run()`` returns. A second
signal stops at once. When the service fails while serving (a sticky CUDA error), ``/ready`` answers 503 for
``FAILED_LINGER_S`` (probes and in-flight clients see why), then the server stops and the CLI exits 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Generator
from types import FrameType

import uvicorn

from ..core.service import Service

log = logging.getLogger(__name__)

FAILED_LINGER_S = 2.0
"""Seconds a service that failed while serving keeps answering (503) before the process exits."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.drained = True
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._failed_at: float | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, without re-raising the signal after a clean shutdown."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            log.warning("%s again: stopping without waiting", signal.Signals(sig).name)
            self.drained = False
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        log.info("%s: draining (new requests get 503; queued and running ones finish)", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="sdxl-trt-drain")

    async def _drain(self) -> None:
        self.drained = await self.service.drain()
        log.info("drained%s; shutting down", "" if self.drained else " only partly (timed out)")
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.service.state == "failed":
            now = time.monotonic()
            if self._failed_at is None:
                self._failed_at = now
                if self.service.device_error is not None:
                    log.critical("stopping in %g s: %s", FAILED_LINGER_S, self.service.error)
            if self.service.device_error is None or now - self._failed_at >= FAILED_LINGER_S:
                self.should_exit = True
        return await super().on_tick(counter)
