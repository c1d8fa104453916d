"""``sdxl-trt serve``: flags -> ServeSettings -> the app on uvicorn, with a drain on SIGTERM.

On SIGTERM (or Ctrl-C): ``/ready`` turns 503 and new requests get 503 while queued and running ones finish
(up to ``--drain-timeout-s``); then uvicorn's graceful shutdown closes the connections and the process
exits 0. A second signal stops at once. If the engines fail to load, the process exits 2 with the reason;
after a sticky CUDA error while serving (every later call would fail), 3, so the orchestrator replaces it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sdxl_trt.buckets import Bucket
from sdxl_trt.errors import InvalidRequestError, SdxlTrtError
from sdxl_trt.serve.core.settings import API_KEY_ENV, ServeSettings, is_loopback

if TYPE_CHECKING:
    from sdxl_trt.serve.core.service import PipelineFactory

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve engines over HTTP: OpenAI Images and AUTOMATIC1111 APIs")
    d = ServeSettings(engines=Path("."))
    p.add_argument("--engines", required=True, help="engine directory made by `sdxl-trt build`")
    p.add_argument("--host", default=d.host, help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Bearer, or Basic password); default: ${API_KEY_ENV}. An empty key is "
                        "refused (exit 2), never taken as 'no key'")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="read the key from this file (first line), so it does not show in `ps`")
    p.add_argument("--max-batch", type=_positive(int), default=None,
                   help="images per batch (default: the engines' max batch)")
    p.add_argument("--batch-window-ms", type=_non_negative, default=d.batch_window_ms,
                   help="how long a batch waits for compatible requests to fill it")
    p.add_argument("--max-queue", type=_positive(int), default=d.max_queue,
                   help="waiting requests; more are refused with 429")
    p.add_argument("--max-images", type=_positive(int), default=d.max_images, help="images per request")
    p.add_argument("--max-steps", type=_positive(int), default=d.max_steps)
    p.add_argument("--request-timeout-s", type=_positive(float), default=d.request_timeout_s,
                   help="longest wait in the queue; then 504")
    p.add_argument("--drain-timeout-s", type=_non_negative, default=d.drain_timeout_s,
                   help="on SIGTERM, how long queued and running requests may take to finish")
    p.add_argument("--max-body-mb", type=_positive(float), default=d.max_body_mb, help="largest request body")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="LoRAs (NAME.safetensors) requests may name: OpenAI 'loras', A1111 <lora:NAME:WEIGHT>; "
                        "repeatable")
    p.add_argument("--max-prompt-chars", type=_positive(int), default=d.max_prompt_chars,
                   help="longest text field (prompt, negative prompt, ...), refused with 400 before queueing")
    p.add_argument("--header-timeout-s", type=_positive(float), default=d.header_timeout_s,
                   help="a connection's request headers must arrive within this (else 408, connection closed)")
    p.add_argument("--body-timeout-s", type=_positive(float), default=d.body_timeout_s,
                   help="a request's whole body must arrive within this (else 408, connection closed)")
    p.add_argument("--chunk-timeout-s", type=_positive(float), default=d.chunk_timeout_s,
                   help="longest gap between two parts of a request body (else 408, connection closed)")
    p.add_argument("--limit-concurrency", type=_positive(int), default=d.limit_concurrency,
                   help="connections and running requests at once; more are refused with 503 (keep it above "
                        "--max-queue plus --max-batch)")
    p.add_argument("--max-header-kb", type=_positive(float), default=d.max_header_kb,
                   help="largest request headers, request line included (else 431, connection closed, before "
                        "authentication)")
    p.add_argument("--allowed-hosts", type=_hosts, default=None, metavar="NAME,...",
                   help="Host header values served (exact, *.domain for its subdomains, * for any; else 400), and "
                        "the pages (Origin) that may call it (else 403); default: localhost, 127.0.0.1 and ::1 "
                        "for a keyless server on loopback (against DNS rebinding), any name otherwise")
    p.add_argument("--http", choices=("auto", "httptools", "h11"), default=d.http,
                   help="uvicorn's HTTP parser (default auto: httptools where installed, else h11)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--warmup", type=_warmup, default=d.warmup, metavar="all|none|WxH,...",
                   help="buckets whose CUDA graphs are captured at start, at every batch size up to --max-batch, "
                        "while /ready answers 503 (default: all built buckets); none: the first request of each "
                        "shape captures on its own path")
    p.add_argument("--warmup-schedulers", type=_warmup_schedulers, default=d.warmup_schedulers, metavar="NAME,...",
                   help="samplers whose steps are captured at start (default: the model's own; a step is captured "
                        "per sampler, so list the ones clients ask for)")
    p.add_argument("--warmup-guidance", type=_warmup_guidance, default=d.warmup_guidance, metavar="G,...",
                   help="guidance scales captured at start (default 5; a value <= 1 captures the step without "
                        "classifier-free guidance, as few-step recipes run: e.g. 5,0 for both)")
    p.add_argument("--warmup-prompt-chunks", type=int, default=d.warmup_prompt_chunks, metavar="N",
                   help="prompts of up to N chunks of 75 tokens are captured at start (default 2: 150 tokens; "
                        "longer prompts run their steps eagerly)")
    p.add_argument("--no-ui", action="store_true",
                   help="serve no playground page on / and no OpenAPI page on /docs (the APIs are unchanged)")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Serve: a local cluster, or the one in $RAY_ADDRESS (needs the ray extra)")
    p.add_argument("--replicas", type=_positive(int), default=None,
                   help="with --ray: replicas, one GPU each where the cluster has GPUs (default: 1)")
    p.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                   help="with --ray: scale between MIN and MAX replicas on ongoing requests")
    p.set_defaults(func=cmd_serve)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _hosts(text: str) -> tuple[str, ...]:
    """A comma-separated list of host names (no ports, no schemes)."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    bad = [n for n in names if "/" in n or (":" in n and not n.startswith("[") and n.count(":") == 1)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"give host names without scheme or port, e.g. localhost,api.example.com "
                                         f"or '*'; got {text!r}")
    return names


def _lora_dirs(dirs: list[str]) -> list[str]:
    missing = [d for d in dirs if not Path(d).is_dir()]
    if missing:
        raise SdxlTrtError(f"--lora-dir {missing[0]} is not a directory; give a folder of NAME.safetensors LoRAs")
    return [str(Path(d).resolve()) for d in dirs]


def _warmup(text: str) -> str | tuple[str, ...]:
    """``all``, ``none`` or a comma-separated list of WxH buckets (checked against the engines at start)."""
    word = text.strip().lower()
    if word in ("all", "none"):
        return word
    buckets = []
    for part in text.split(","):
        try:
            buckets.append(str(Bucket.parse(part)))
        except InvalidRequestError:
            raise argparse.ArgumentTypeError(f"{part!r} is not WIDTHxHEIGHT; give all, none or e.g. "
                                             "1024x1024,1152x896") from None
    return tuple(buckets)


def _warmup_schedulers(text: str) -> tuple[str, ...]:
    """A comma-separated list of the runtime's sampler names."""
    from sdxl_trt.samplers import SCHEDULERS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCHEDULERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(SCHEDULERS)}")
    return names


def _warmup_guidance(text: str) -> tuple[float, ...]:
    """A comma-separated list of guidance scales in 0..100."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers; e.g. 5 or 5,0") from None
    if not all(0.0 <= v <= 100.0 for v in values):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"guidance scales must be numbers in 0..100, got {text!r}")
    return values


def _check_warmup(settings: ServeSettings, built: list[str]) -> None:
    unknown = [b for b in settings.warmup_buckets or [] if b not in built]
    if unknown:
        raise SdxlTrtError(f"--warmup names {', '.join(unknown)}, which these engines were not built for; "
                           f"built: {', '.join(built)}")


def _autoscale(text: str) -> tuple[int, int]:
    from sdxl_trt.serve.deploy.ray_app import parse_autoscale

    try:
        return parse_autoscale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $SDXL_TRT_API_KEY; None for no key. An empty key is an error: an
    empty variable in a deployment script must not turn authentication off."""
    if args.api_key is not None and args.api_key_file is not None:
        raise SdxlTrtError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            key, source = args.api_key_file.read_text().partition("\n")[0].strip(), f"--api-key-file {args.api_key_file}"
        except OSError as e:
            raise SdxlTrtError(f"--api-key-file: cannot read {args.api_key_file}: {e.strerror}") from None
    elif args.api_key is not None:
        key, source = args.api_key, "--api-key"
    else:
        env = ServeSettings.key_from_env()
        if env is None:
            return None
        key, source = env, f"${API_KEY_ENV}"
    if not key.strip():
        raise SdxlTrtError(f"{source} is empty; give a non-empty key, or leave it unset to serve without a key "
                           "(loopback only is the default)")
    if key != key.strip():
        raise SdxlTrtError(f"{source} starts or ends with whitespace; remove it (clients would not send it)")
    try:
        key.encode("utf-8")  # keys are compared as UTF-8 bytes
    except UnicodeEncodeError:
        raise SdxlTrtError(f"{source} is not valid UTF-8 text; give the key as UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise SdxlTrtError(f"{source} holds control characters, which no HTTP header can carry; remove them")
    return key


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        engines=Path(args.engines), host=args.host, port=args.port,
        api_key=api_key_from_args(args), max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, max_queue=args.max_queue, max_images=args.max_images,
        max_steps=args.max_steps, request_timeout_s=args.request_timeout_s, drain_timeout_s=args.drain_timeout_s,
        max_body_mb=args.max_body_mb, device=args.device, warmup=args.warmup,
        warmup_schedulers=args.warmup_schedulers, warmup_guidance=args.warmup_guidance,
        warmup_prompt_chunks=args.warmup_prompt_chunks,
        max_prompt_chars=args.max_prompt_chars, header_timeout_s=args.header_timeout_s,
        lora_dirs=tuple(_lora_dirs(args.lora_dir)),
        body_timeout_s=args.body_timeout_s, chunk_timeout_s=args.chunk_timeout_s,
        limit_concurrency=args.limit_concurrency, ui=not args.no_ui, max_header_kb=args.max_header_kb,
        allowed_hosts=args.allowed_hosts, http=args.http,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        return _cmd_serve_ray(args)
    if args.replicas is not None or args.autoscale is not None:
        raise SdxlTrtError("--replicas and --autoscale need --ray")
    from sdxl_trt.engine_dir.manifest import open_engine_dir

    settings = settings_from_args(args)
    manifest = open_engine_dir(settings.engines, verify_hashes=False)  # a wrong directory fails now, in one line
    _check_warmup(settings, list(manifest.buckets))
    return run_server(settings)


def run_server(settings: ServeSettings, pipeline_factory: PipelineFactory | None = None) -> int:
    """Serve on uvicorn with the edge limits until SIGTERM drains it: 0 when drained, 2 when the engines failed
    to load, 3 when the GPU failed while serving (a sticky CUDA error), 1 when the drain timed out.
    ``pipeline_factory`` is for tests (a pipeline double)."""
    try:
        import uvicorn

        from sdxl_trt.serve.http.app import create_app
        from sdxl_trt.serve.http.edge import header_deadline_protocol, uvicorn_protocol
        from sdxl_trt.serve.http.server import DrainingServer
    except ImportError as e:
        raise SdxlTrtError(f"sdxl-trt serve needs the serve extra ({e.name} is missing): "
                           "pip install 'sdxl-trt[serve]'") from None
    _warn_exposed(settings)
    if settings.limit_concurrency <= settings.max_queue + (settings.max_batch or 1):
        log.warning("--limit-concurrency %d is not above --max-queue %d plus a batch: overload will get uvicorn's "
                    "503 before the queue's 429", settings.limit_concurrency, settings.max_queue)
    app = create_app(settings) if pipeline_factory is None else create_app(settings, pipeline_factory)
    protocol = header_deadline_protocol(settings.header_timeout_s, uvicorn_protocol(settings.http),
                                        max_header_bytes=settings.max_header_bytes)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=10, server_header=False, http=protocol,
                            limit_concurrency=settings.limit_concurrency,
                            # h11's own cap on an incomplete event (headers) stays above ours, so ours answers
                            h11_max_incomplete_event_size=settings.max_header_bytes + 2**18)
    service = app.state.service
    server = DrainingServer(config, service)
    server.run()
    if service.state == "failed":
        print(f"sdxl-trt serve: error: {service.error}", file=sys.stderr)
        return 3 if service.device_error is not None else 2
    return 0 if server.drained else 1


def _cmd_serve_ray(args: argparse.Namespace) -> int:
    from sdxl_trt.engine_dir.manifest import open_engine_dir
    from sdxl_trt.serve.deploy.ray_app import RayOptions, serve_on_ray

    if args.replicas is not None and args.autoscale is not None:
        raise SdxlTrtError("give --replicas or --autoscale, not both")
    settings = settings_from_args(args)
    manifest = open_engine_dir(settings.engines, verify_hashes=False)  # a wrong directory fails now, in one line
    _check_warmup(settings, list(manifest.buckets))
    _warn_exposed(settings)
    return serve_on_ray(settings, RayOptions(replicas=args.replicas or 1, autoscale=args.autoscale))


def _warn_exposed(settings: ServeSettings) -> None:
    if settings.api_key is None and not is_loopback(settings.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use the GPU%s", settings.host,
                    "" if settings.allowed_hosts else ", and any web page its users open can call it (set "
                    "--allowed-hosts to the names clients use)")
