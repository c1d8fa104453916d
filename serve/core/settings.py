"""``ServeSettings``: everything ``sdxl-trt serve`` is configured with, free of any web library."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_ENV = "SDXL_TRT_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Service limits and knobs. ``api_key`` stays out of ``repr`` so it never reaches a log line."""

    engines: Path
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = field(default=None, repr=False)
    max_batch: int | None = None  # images per batch; default: the engines' max batch
    batch_window_ms: float = 10.0  # how long a batch's oldest request waits for batch-mates
    max_queue: int = 64  # requests waiting; one more is refused with 429
    max_images: int = 8  # images per request
    max_steps: int = 150
    request_timeout_s: float = 300.0  # longest wait in the queue before 504
    drain_timeout_s: float = 30.0  # on SIGTERM, how long queued and running work may take to finish
    max_body_mb: float = 32.0
    lora_dirs: tuple[str, ...] = ()  # --lora-dir: NAME.safetensors files requests may name (never a client's path)
    max_prompt_chars: int = 8192  # per text field (prompt, negative prompt, ...), refused with 400 before queueing
    # Edge limits: a connection's request headers must arrive within header_timeout_s, its whole body within
    # body_timeout_s with no gap over chunk_timeout_s (else 408 and the connection closed); more than
    # limit_concurrency connections or running requests at once are refused by uvicorn with 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    chunk_timeout_s: float = 15.0
    limit_concurrency: int = 512
    max_header_kb: float = 64.0  # a request's headers (request line included): one byte more is a 431, closed
    # Host header values served (exact names, or "*.example.com" for its subdomains; "*": any); None: the
    # loopback names for a keyless server on loopback, any name otherwise (see ``hosts_allowed``).
    allowed_hosts: tuple[str, ...] | None = None
    http: str = "auto"  # uvicorn's HTTP parser: auto (httptools where installed, else h11), httptools or h11
    device: str | None = None
    # Buckets captured at start, before /ready turns 200: "all" built buckets, "none", or a tuple of "WxH".
    warmup: str | tuple[str, ...] = "all"
    warmup_steps: int = 2  # steps per warm-up generation: the captured step serves any step count
    # Samplers and guidance scales captured at start (a step is captured per sampler and per guidance on/off):
    # None: the model's own sampler; guidance <= 1 captures the step without classifier-free guidance.
    warmup_schedulers: tuple[str, ...] | None = None
    warmup_guidance: tuple[float, ...] = (5.0,)
    warmup_prompt_chunks: int = 2  # prompts of up to this many 75-token chunks replay captured graphs
    ui: bool = True  # the playground on / and the OpenAPI page on /docs; --no-ui turns both off

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_header_bytes(self) -> int:
        return int(self.max_header_kb * 1024)

    @property
    def hosts_allowed(self) -> tuple[str, ...]:
        """``allowed_hosts``, or its default: a keyless server on loopback answers only loopback names, so a
        page elsewhere cannot use it through DNS rebinding (its own name resolving to 127.0.0.1) or a form
        posted to 127.0.0.1; a server with a key is guarded by the key (a page cannot send it), and one
        listening elsewhere is reached by names it cannot know (the CLI warns when it has no key either)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.api_key is None and is_loopback(self.host):
            return tuple(dict.fromkeys(("localhost", "127.0.0.1", "::1", self.host.strip("[]").lower())))
        return ("*",)

    @property
    def max_text_body_bytes(self) -> int:
        """Largest body of an endpoint that takes only text (txt2img): room for many fields at the character cap
        (JSON escapes take up to 6 bytes a character), so a 15 MB prompt is refused from its Content-Length."""
        return min(self.max_body_bytes, max(2**20, 128 * self.max_prompt_chars))

    @property
    def warmup_buckets(self) -> list[str] | None:
        """The buckets to warm up: None for every built one, [] for none."""
        if self.warmup == "all":
            return None
        if self.warmup == "none":
            return []
        return list(self.warmup)

    @staticmethod
    def key_from_env() -> str | None:
        """``$SDXL_TRT_API_KEY``; None when unset. Set but empty is returned as "" (the CLI refuses it)."""
        return os.environ.get(API_KEY_ENV)


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"
