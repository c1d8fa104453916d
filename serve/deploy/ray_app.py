"""Scale-out on Ray Serve: the app from ``create_app`` as a deployment, one replica per GPU.

Scale-out is Ray Serve's job, not ours, so this module only adapts: each replica builds its own app (and so
its own ``Service`` and ``AsyncPipeline``) with ``create_app``, and Ray's proxy serves the same HTTP API on
``--host``/``--port``. Rules of this module (keep them):

* Ray is imported lazily, inside functions, so ``sdxl_trt.serve`` works without it. Ray Serve 2.47 or later:
  the replica's app comes from an ingress builder function (``serve.ingress(fn)``), which 2.46 lacks.
* A replica is only routed to once its engines are loaded and warm: :class:`ReplicaApp` holds the ASGI
  lifespan startup until the ``Service`` is ready (Ray runs the lifespan while the replica is STARTING), and
  a failed load fails the replica's start with the reason instead of answering 503 forever.
* Overload is still refused by our bounded queue (429), not hidden in Ray's router: each replica accepts
  ``max_queue + max_batch`` ongoing requests, enough to fill its own queue and a running batch.
* Every answer names the replica that gave it (``x-sdxl-trt-replica``, ``x-sdxl-trt-pid``), so operators
  and tests can tell replicas apart behind the one proxy.
* ``/metrics`` through the proxy is one replica's registry (whichever answered); scrape replicas directly
  or use Ray's own metrics for a cluster-wide view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from sdxl_trt.errors import SdxlTrtError

from ..core.service import PipelineFactory, Service, load_pipeline
from ..core.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application
    from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-sdxl-trt-replica"
PID_HEADER = "x-sdxl-trt-pid"
DEPLOYMENT_NAME = "sdxl_trt"
CLUSTER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RayOptions:
    """How the deployment is placed and scaled; the service's own knobs stay in :class:`ServeSettings`."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; overrides ``replicas``
    target_ongoing_requests: float | None = None  # per replica, for autoscaling; default: 2 x max batch
    address: str | None = None  # a running cluster; default: $RAY_ADDRESS, else a local cluster
    gpus_per_replica: float | None = None  # default: 1 where the cluster has GPUs, else 0 (CPU replicas)
    cpus_per_replica: float = 1.0
    threads_per_replica: int | None = None  # torch threads per replica; default: its CPUs (CPU replicas)
    app_name: str = "sdxl-trt"
    local_cpus: int | None = None  # CPUs a local cluster offers; default: all of this machine's
    dashboard: bool = False  # Ray's dashboard on a local cluster (slower start; needed by ray.util.state)


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max), with the bad value and the fix in the error."""
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"autoscale must be MIN:MAX replicas, e.g. 1:4, got {text!r}") from None
    if not 0 <= lo <= hi or hi < 1:
        raise ValueError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return lo, hi


def deployment_options(settings: ServeSettings, options: RayOptions, *, gpus: float, max_batch: int) -> dict[str, Any]:
    """The ``@serve.deployment`` options: placement, scaling and limits that keep our own overload rules."""
    out: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        # Our queue refuses overload with 429; Ray's router must not queue in front of it.
        "max_ongoing_requests": settings.max_queue + max_batch,
        # Ray waits this long for a stopping replica's requests before it runs the lifespan shutdown (drain).
        "graceful_shutdown_timeout_s": settings.drain_timeout_s + 5.0,
    }
    if options.autoscale is None:
        out["num_replicas"] = options.replicas
    else:
        lo, hi = options.autoscale
        out["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": options.target_ongoing_requests or 2.0 * max_batch,
        }
    return out


class ReplicaApp:
    """``create_app``'s app as one Ray Serve replica runs it.

    Holds the lifespan startup until the engines are loaded (so Ray routes nothing to a loading replica, and
    a failed load fails the replica's start with its reason), and adds the replica's id and pid to every
    HTTP answer.
    """

    def __init__(self, app: FastAPI, service: Service, *, replica_id: str) -> None:
        self.app = app
        self.service = service
        self.replica_id = replica_id
        self._headers = [(REPLICA_HEADER.encode(), replica_id.encode()), (PID_HEADER.encode(), str(os.getpid()).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._hold_startup(send))
        elif scope["type"] == "http":
            await self.app(scope, receive, self._name_replica(send))
        else:
            await self.app(scope, receive, send)

    def add_exception_handler(self, exc_class: type[Exception], handler: Callable[..., Any]) -> None:
        """Ray Serve registers its own errors here (back-pressure -> 503); they belong to the FastAPI app."""
        self.app.add_exception_handler(exc_class, handler)

    def _hold_startup(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.service.wait_loaded()
                if not self.service.ready:
                    reason = self.service.error or f"the service is {self.service.state}"
                    log.error("replica %s cannot serve: %s", self.replica_id, reason)
                    message = {"type": "lifespan.startup.failed", "message": f"replica {self.replica_id}: {reason}"}
                else:
                    log.info("replica %s (pid %d) ready", self.replica_id, os.getpid())
            await send(message)

        return wrapped

    def _name_replica(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *self._headers]}
            await send(message)

        return wrapped


def build_replica_app(settings: ServeSettings, pipeline_factory: PipelineFactory, *, replica_id: str) -> ReplicaApp:
    from ..http.app import create_app

    app = create_app(settings, pipeline_factory)
    return ReplicaApp(app, app.state.service, replica_id=replica_id)


def build_application(settings: ServeSettings, options: RayOptions, *, gpus: float, max_batch: int,
                      pipeline_factory: PipelineFactory = load_pipeline) -> Application:
    """The bound Ray Serve application: one deployment whose replicas each build their own app."""
    from ray import serve

    threads = options.threads_per_replica

    def build_on_replica() -> ReplicaApp:
        """Ray's ingress builder: runs in each replica as it starts, so each has its own app and engines."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        return build_replica_app(settings, pipeline_factory, replica_id=serve.get_replica_context().replica_tag)

    ingress = serve.ingress(build_on_replica)()
    deployment = serve.deployment(**deployment_options(settings, options, gpus=gpus, max_batch=max_batch))
    return deployment(ingress).bind()


class RayServer:
    """A Ray cluster (local, or joined through ``address``) running the app behind Ray Serve's proxy.

    ``start()`` returns once every replica is loaded and warm; ``stop()`` removes the app (and, on a cluster
    we started, Serve and the cluster itself). Use ``run_forever()`` for the CLI's signal handling.
    """

    def __init__(self, settings: ServeSettings, options: RayOptions, *,
                 pipeline_factory: PipelineFactory = load_pipeline) -> None:
        self.settings = settings
        self.options = options
        self.pipeline_factory = pipeline_factory
        self.address = options.address or os.environ.get("RAY_ADDRESS") or None
        self.url = f"http://{settings.host}:{settings.port}"
        self._started = False
        self._cluster: subprocess.Popen[bytes] | None = None  # the local cluster we started, if any

    def start(self) -> None:
        """Join or start the cluster, then deploy; returns once every replica is loaded and warm."""
        self.connect()
        self.deploy()

    def connect(self) -> None:
        """Join ``address``, or start a local cluster in its own session and join it.

        A local cluster from ``ray.init()`` would share this process's group: a SIGTERM sent to the group (a
        supervisor, ``kill -- -PGID``, dumb-init) would kill Ray's GCS and raylet before we drain, and the
        driver would then wait 60 s for the lost GCS and exit 1. ``ray start --head --block`` in a new
        session gets no group signal; we drain first and stop it ourselves in :meth:`stop`.
        """
        import ray

        address = self.address
        if address is None:
            address = self._start_local_cluster()
        ray.init(address=address, configure_logging=False)
        self._started = True

    def _start_local_cluster(self) -> str:
        port = _free_port()
        cmd = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start",
               "--head", "--block", f"--port={port}", "--disable-usage-stats",
               f"--include-dashboard={'true' if self.options.dashboard else 'false'}"]
        if self.options.local_cpus is not None:
            cmd.append(f"--num-cpus={self.options.local_cpus}")
        local_cluster_auth()
        log.info("starting a local Ray cluster on port %d", port)
        self._cluster = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while not _listening(port):
            if self._cluster.poll() is not None:
                raise SdxlTrtError(f"the local Ray cluster exited with {self._cluster.returncode} while starting; "
                                   "its log is under /tmp/ray/session_latest/logs/")
            if time.monotonic() > deadline:
                self._stop_cluster()
                raise SdxlTrtError(f"the local Ray cluster did not start within {CLUSTER_START_TIMEOUT_S:g} s")
            time.sleep(0.2)
        return f"127.0.0.1:{port}"

    def _stop_cluster(self) -> None:
        """Stop the local cluster we started (``ray start --block`` stops its processes on SIGTERM)."""
        cluster, self._cluster = self._cluster, None
        if cluster is None or cluster.poll() is not None:
            return
        cluster.terminate()
        try:
            cluster.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the local Ray cluster did not stop within 30 s; killing it")
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait(10)

    def deploy(self) -> None:
        import ray
        from ray import serve

        from sdxl_trt.engine_dir.manifest import Manifest

        s, o = self.settings, self.options
        gpus = o.gpus_per_replica if o.gpus_per_replica is not None else self._default_gpus(ray.cluster_resources())
        self._check_fits(ray.cluster_resources(), gpus)
        if gpus == 0:  # CPU replicas: the CPU device, and no more threads than the CPUs Ray reserved
            s = s if s.device is not None else dataclasses.replace(s, device="cpu")
            if not o.threads_per_replica:
                o = dataclasses.replace(o, threads_per_replica=max(1, int(o.cpus_per_replica)))
        max_batch = s.max_batch or Manifest.load(s.engines).max_batch
        app = build_application(s, o, gpus=gpus, max_batch=max_batch, pipeline_factory=self.pipeline_factory)
        serve.start(http_options={"host": s.host, "port": s.port})
        log.info("deploying %s on Ray (%s): %s, %s per replica", o.app_name, self.address or "local cluster",
                 f"autoscale {o.autoscale[0]}..{o.autoscale[1]}" if o.autoscale else f"{o.replicas} replicas",
                 f"{gpus:g} GPU" if gpus else f"{o.cpus_per_replica:g} CPU")
        try:
            serve.run(app, name=o.app_name, route_prefix="/")
        except RuntimeError as e:  # Ray's "Deploying application ... failed"; the replicas logged why
            raise SdxlTrtError(f"{e}; the replicas' log lines above (also under /tmp/ray/session_latest/logs/"
                               "serve/) give the reason") from None
        log.info("serving on %s", self.url)

    def _default_gpus(self, resources: dict[str, float]) -> float:
        if self.settings.device == "cpu" or resources.get("GPU", 0) < 1:
            return 0.0
        return 1.0

    def _check_fits(self, resources: dict[str, float], gpus: float) -> None:
        """On a local cluster, refuse replicas that could never be placed (Ray would wait for them forever)."""
        if self.address is not None:
            return  # a joined cluster may add nodes
        wanted = self.options.autoscale[0] if self.options.autoscale else self.options.replicas
        have_gpus, have_cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        if gpus and wanted * gpus > have_gpus:
            raise SdxlTrtError(f"{wanted} replicas need {wanted * gpus:g} GPUs but this machine has {have_gpus:g}; "
                             f"lower --replicas, or join a larger cluster with RAY_ADDRESS")
        if wanted * self.options.cpus_per_replica > have_cpus:
            raise SdxlTrtError(f"{wanted} replicas need {wanted * self.options.cpus_per_replica:g} CPUs but the "
                             f"local cluster has {have_cpus:g}; lower --replicas")

    def stop(self) -> None:
        """Drain and remove the app; on a cluster we started, stop Serve and Ray too. Safe to call twice.

        ``serve.delete`` comes first: the proxy stays up while each replica finishes what it holds (up to
        ``graceful_shutdown_timeout_s``) and then drains its Service, so accepted requests are answered.
        """
        if not self._started:
            self._stop_cluster()
            return
        import ray
        from ray import serve

        self._started = False
        try:
            with contextlib.suppress(Exception):  # nothing deployed yet, or already gone
                serve.delete(self.options.app_name)
            if self.address is None:
                serve.shutdown()  # our own cluster; on a shared one, other apps keep running
        finally:
            ray.shutdown()
            self._stop_cluster()
        log.info("stopped")

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until SIGTERM or Ctrl-C (or ``stop`` is set), then stop cleanly."""
        stop = stop or threading.Event()
        previous: dict[int, Any] = {}
        try:
            self.connect()
            previous = _install_signal_handlers(stop)  # after ray.init, which installs its own
            self.deploy()
            stop.wait()
            log.info("stopping: draining replicas")
        finally:
            try:
                self.stop()
            finally:  # only now: Ray's own SIGTERM handler exits 1, and a signal may come during the drain
                _restore_signal_handlers(previous)


def local_cluster_auth() -> None:
    """Token authentication for a local cluster, as ``ray.init()`` has it: unless the environment says otherwise,
    one fresh token for the cluster, this driver and the replicas (all inherit this environment). Ray reads
    it when imported, so call this before ``import ray``."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                       or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _die_with_parent() -> None:
    """In the cluster's process: SIGKILL when this server dies, so a killed server leaves no cluster behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handle(sig: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop waiting for the drain
        log.info("%s: shutting down", signal.Signals(sig).name)
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def serve_on_ray(settings: ServeSettings, options: RayOptions,
                 pipeline_factory: Callable[[ServeSettings], Any] = load_pipeline) -> int:
    """The ``sdxl-trt serve --ray`` entry point: 0 after a clean stop.

    What a user can fix (Ray missing, replicas that cannot be placed, replicas that fail to load the engines)
    raises :class:`SdxlTrtError`, which the CLI prints as one line and exits 2.
    """
    if options.address is None and not os.environ.get("RAY_ADDRESS"):
        local_cluster_auth()  # before Ray is imported
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SdxlTrtError("sdxl-trt serve --ray needs Ray Serve: pip install 'sdxl-trt[ray]'") from None
    RayServer(settings, options, pipeline_factory=pipeline_factory).run_forever()
    return 0
