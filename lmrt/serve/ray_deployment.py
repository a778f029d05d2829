"""``lmrt serve --ray``: many replicas of the engine behind one OpenAI endpoint, on Ray Serve (the
``ray`` extra; nothing else in lmrt imports ray).

Each replica is a Ray Serve deployment replica holding one runtime Engine and the same FastAPI app
``lmrt serve`` runs (``app.create_app``), built at the replica's start. Ray's proxy takes the HTTP
requests and routes each to a replica; streamed answers pass through as Ray's streaming responses,
and a client that leaves cancels its request on the replica, which frees its engine slot. Every
answer carries an ``x-lmrt-replica`` header naming the replica that produced it.

With ``--min-replicas``/``--max-replicas`` the replica count follows the engines' own load: each
replica reports its busy slots and the requests waiting for one (``record_autoscaling_stats``), and
``slot_autoscaling_policy`` asks for as many replicas as it takes to give every request a slot.
Each replica's /metrics figures are also exported to Ray's metrics with a ``replica`` tag.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Callable
from urllib.parse import unquote, urlparse

import ray
from ray import serve
from ray.util import metrics as ray_metrics

from . import MAX_BODY_BYTES, ServeError
from . import metrics as lmrt_metrics
from .settings import ServeSettings

APP_NAME = "lmrt"
REPLICA_HEADER = "x-lmrt-replica"
EXPORT_PERIOD_S = 2.0


def model_path(source: str) -> str:
    """The local directory of a model given as a path or a ``file://`` URI. Every replica reads it
    from its own node's disk, so on a cluster of several machines the path must exist on each
    (shared storage, or the same copy everywhere). Other URI schemes are refused."""
    if "://" not in source:
        return source
    url = urlparse(source)
    if url.scheme != "file" or url.netloc not in ("", "localhost"):
        raise ServeError(f"{source}: only a path or a file:// URI can be served on Ray (copy the model to each node's disk)")
    return unquote(url.path)


@serve.ingress()
class LmrtReplica:
    """One engine and one copy of lmrt's HTTP app."""

    def __init__(self, settings: ServeSettings):
        from ..runtime import Engine, LoadedModel
        from .app import ServerState
        from .response_store import ResponseStore

        self.replica = serve.get_replica_context().replica_id.unique_id
        model = LoadedModel(settings.model_dir, provider=settings.provider, threads=settings.threads)
        self.engine = Engine(model, settings.engine_settings())
        self.state = ServerState(settings.model_name, settings.api_key, MAX_BODY_BYTES, settings.body_timeout, engine=self.engine,
                                 response_store=ResponseStore(settings.stored_responses))
        self._stop = threading.Event()
        self._exporter = _MetricsExporter(self.replica)
        threading.Thread(target=self._export, name="lmrt-ray-metrics", daemon=True).start()

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.state)
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's load, for ``slot_autoscaling_policy``."""
        s = self.engine.status()
        return {"lmrt_slots": s.slots, "lmrt_busy_slots": s.slots_in_use, "lmrt_waiting": s.requests_waiting}

    def _export(self) -> None:
        while not self._stop.wait(EXPORT_PERIOD_S):
            self._exporter.update(self.engine.status())

    def __del__(self):
        self._stop.set()
        self.engine.close()


class _ReplicaHeader:
    """ASGI middleware: adds ``x-lmrt-replica: <replica id>`` to every answer (streams included)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class _MetricsExporter:
    """A replica's /metrics figures as Ray metrics (names with ``_`` for ``:``, tag ``replica``):
    gauges set to their value, counters advanced by what they grew since the last update."""

    def __init__(self, replica: str):
        self.tags = {"replica": replica}
        self.metrics: dict[str, object] = {}
        self.last: dict[str, float] = {}

    def update(self, status) -> None:
        for name, kind, help_text, value in lmrt_metrics.rows(status):
            ray_name = name.replace(":", "_")
            if kind == "counter":
                ray_name = ray_name.removesuffix("_total")  # Ray's exporter appends _total to counters
            metric = self.metrics.get(ray_name)
            if metric is None:
                cls = ray_metrics.Counter if kind == "counter" else ray_metrics.Gauge
                metric = self.metrics[ray_name] = cls(ray_name, description=help_text, tag_keys=("replica",))
            if kind == "counter":
                grown = value - self.last.get(ray_name, 0)
                if grown > 0:
                    metric.inc(grown, tags=self.tags)
                self.last[ray_name] = value
            else:
                metric.set(value, tags=self.tags)


def slot_autoscaling_policy(ctx):
    """Ray Serve autoscaling policy: as many replicas as it takes to give every request a slot.

    Load = slots in use + requests waiting for a slot (both reported by the replicas' engines) +
    requests queued in Ray's routers. Scales up as soon as requests wait; scales down once the load
    has fitted in fewer replicas for ``downscale_delay_s``."""
    metrics = ctx.aggregated_metrics or {}
    slots = metrics.get("lmrt_slots") or {}
    state = dict(ctx.policy_state or {})
    if not slots:  # no replica has reported yet
        return ctx.target_num_replicas, state
    load = sum((metrics.get("lmrt_busy_slots") or {}).values()) + sum((metrics.get("lmrt_waiting") or {}).values())
    load += ctx.total_queued_requests or 0
    desired = max(1, math.ceil(load / max(slots.values())))
    now = ctx.current_time or time.time()
    if desired < ctx.target_num_replicas:
        since = state.setdefault("lmrt_lower_since", now)
        if now - since < ctx.config.downscale_delay_s:
            return ctx.target_num_replicas, state
    state.pop("lmrt_lower_since", None)
    return desired, state


def deployment_options(settings: ServeSettings, replicas: int | None, min_replicas: int | None, max_replicas: int | None) -> dict:
    """Ray Serve options: a fixed replica count or autoscaling on the engines' load. A replica takes
    ``threads`` CPUs (1 when not given) and at most slots + max-queue requests at once."""
    options = {
        "ray_actor_options": {"num_cpus": settings.threads or 1},
        "max_ongoing_requests": settings.slots + settings.max_queue,
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": 5,
        "graceful_shutdown_wait_loop_s": 1,
    }
    if min_replicas is None and max_replicas is None:
        options["num_replicas"] = replicas or 1
    else:
        options["autoscaling_config"] = {
            "min_replicas": min_replicas or 1,
            "max_replicas": max_replicas or max(min_replicas or 1, 1),
            "initial_replicas": min_replicas or 1,
            "downscale_delay_s": 60,  # read by slot_autoscaling_policy, which scales up without a delay
            "policy": {"policy_function": f"{__name__}:slot_autoscaling_policy"},
        }
    return options


def serve_on_ray(
    settings: ServeSettings,
    report: Callable[[str], None],
    address: str | None,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
) -> None:
    """Start (no ``address``) or join a Ray cluster, run the replicas (each built from ``settings``)
    and Ray's HTTP proxy on the settings' host and port, and block until SIGINT/SIGTERM; then the
    application is deleted from a joined cluster, or the cluster this call started is stopped."""
    options = deployment_options(settings, replicas, min_replicas, max_replicas)
    context = ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False,
                       configure_logging=True)  # fmt: skip
    try:
        gcs = context.address_info.get("gcs_address") or context.address_info.get("address")
        report(f"lmrt serve: Ray cluster at {gcs}; starting {_count(options)} (model {settings.model_dir})")
        host, port = settings.host, settings.port
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(LmrtReplica, name="LmrtReplica", **options)
        serve.run(deployment.bind(settings), name=APP_NAME, route_prefix="/")
        shown = host if ":" not in host else f"[{host}]"
        report(f"lmrt serve: http://{shown}:{port}/v1  model {settings.model_name} on Ray Serve, {_count(options)} "
               f"x {settings.slots} slots x {settings.ctx_size} tokens")  # fmt: skip
        _wait_for_signal()
        if address is not None:  # a cluster of this call's own goes with ray.shutdown()
            serve.delete(APP_NAME)
    except RuntimeError as e:  # the deployment failed to start (a replica's constructor raised)
        raise ServeError(f"cannot start the replicas: {str(e).strip().splitlines()[0]}") from None
    finally:
        ray.shutdown()


def _count(options: dict) -> str:
    if "num_replicas" in options:
        n = options["num_replicas"]
        return f"{n} replica{'s' if n != 1 else ''}"
    a = options["autoscaling_config"]
    return f"{a['min_replicas']} to {a['max_replicas']} replicas"


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def check_replicas(replicas: int | None, min_replicas: int | None, max_replicas: int | None, port: int) -> None:
    """One-line errors for --replicas/--min-replicas/--max-replicas/--port with --ray."""
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ServeError("--replicas and --min-replicas/--max-replicas contradict each other; give a count or a range")
    for flag, value in (("--replicas", replicas), ("--min-replicas", min_replicas), ("--max-replicas", max_replicas)):
        if value is not None and value < 1:
            raise ServeError(f"{flag} must be at least 1, got {value}")
    if min_replicas is not None and max_replicas is not None and max_replicas < min_replicas:
        raise ServeError(f"--max-replicas ({max_replicas}) is less than --min-replicas ({min_replicas})")
    if port == 0:
        raise ServeError("--port 0 is not supported with --ray: Ray's HTTP proxy needs a fixed port")


__all__ = ["LmrtReplica", "model_path", "serve_on_ray", "slot_autoscaling_policy"]
