"""`fmtune serve`: runs the front door of a deployment until Ctrl-C or SIGTERM.

`serve` is the blocking CLI entry point. Everything that can be checked is checked before
anything starts (`load_for_serving`: the DEPLOY.yaml's fields, each app's DAG, each local
model's folder; then the listening port is bound), so bad input fails in a second with one
line instead of after minutes of replica start-up. Then it sizes and starts its replicas
(cluster 'local') or takes its endpoints (cluster 'endpoints'), builds the front door over a
Router (runtime.serving.app.create_app), runs it under uvicorn with replacement of dead
replicas and the models' autoscalers, announces itself once it listens, and on Ctrl-C or
SIGTERM lets open requests finish for `shutdown_grace_s` before stopping everything.
`ServeConfig` (runtime.serving.config) is how the front door listens, authenticates, bounds
its load and judges its SLA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType

import uvicorn

from runtime.cluster import start_endpoints
from runtime.deployment import Deployment, load_deployment
from runtime.engine import models
from runtime.engine.pool import ReplicaPool
from runtime.errors import ConfigError, FmtuneError
from runtime.routing.prediction import StepModel
from runtime.routing.router import Endpoint, Router
from runtime.scaling.autoscaler import autoscalers_for, size_deployment
from runtime.scaling.replacer import ReplicaReplacer
from runtime.serving.app import build_apps, create_app
from runtime.serving.config import ServeConfig

logger = logging.getLogger(__name__)

#: Gives the router's step-time model per model key of a deployment served by this many
#: replicas (runtime.profiler.router_step_models: the stored profiles).
StepModelLookup = Callable[[Deployment, int], Mapping[str, StepModel]]


class ServeError(FmtuneError):
    """The front door could not start (e.g. its port is taken)."""


def load_for_serving(path: Path) -> Deployment:
    """A DEPLOY.yaml checked as far as it can be before anything starts; ConfigError naming
    the file, the field and the value otherwise.

    Beyond its fields (runtime.deployment.load_deployment): each app's DAG is built (as the
    front door will build it), and with cluster 'local' each model must be a prepared catalog
    model or a local model folder, which a replica would only find out after it started.
    """
    deployment = load_deployment(path)
    try:
        build_apps(deployment)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if deployment.cluster == "local":
        for key, model in deployment.models.items():
            try:
                models.resolve_model(model.engine.model)
            except ConfigError as error:
                raise ConfigError(f"{path}: models.{key}.engine.model: {error}") from None
    return deployment


def bind_listener(config: ServeConfig) -> socket.socket:
    """The front door's socket, bound to host:port but not yet listening (connections are
    refused, not queued, until the server runs on it); ServeError if the address is taken
    or cannot be bound. Bound before any replica starts, so a busy port fails at once.

    The protocol is named (IPPROTO_TCP, not 0) because asyncio turns Nagle's algorithm off
    only on sockets that say they are TCP; with it on, a response written as headers then
    body waits for the client's delayed ACK (about 40 ms a request, measured by
    benchmarks/serve_overhead.py). TCP_NODELAY is also set on the listener, which accepted
    connections inherit on Linux."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise ServeError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: serve() owns SIGINT/SIGTERM so that stopping
    always runs the cleanup (uvicorn re-raises a captured SIGTERM, which would kill the
    process before the replicas are stopped). `on_started` runs once it accepts connections."""

    on_started: Callable[[], None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handlers alone."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up, then `on_started` if it succeeded."""
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


class _ShutdownSignals:
    """SIGINT/SIGTERM while serving: first a graceful stop, a second one forces it; before the
    server runs, KeyboardInterrupt (unwinding through serve's cleanup)."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler (runs in the main thread)."""
        server = self.server
        if server is None:
            raise KeyboardInterrupt
        if server.should_exit:
            logger.warning("second %s: closing open connections now", signal.Signals(signum).name)
            server.force_exit = True
        else:
            logger.info("%s: stopping the front door", signal.Signals(signum).name)
            server.should_exit = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), then restore."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _serve_async(
    deployment: Deployment,
    config: ServeConfig,
    endpoints: list[Endpoint],
    pool: ReplicaPool | None,
    signals: _ShutdownSignals,
    listener: socket.socket,
    on_started: Callable[[], None],
    step_models: StepModelLookup | None,
) -> None:
    sla_s = config.sla_e2e_s or deployment.provisioner.sla_p99_s
    if step_models is None:
        logger.info("router predictions: speeds learned online (no stored profile looked up)")
    router = Router(
        endpoints,
        deployment.router,
        default_deadline_s=sla_s,
        profiles=step_models(deployment, len(endpoints)) if step_models is not None else None,
    )
    replacer = None
    if pool is not None:
        replacer = ReplicaReplacer(
            router, deployment, pool, asyncio.get_running_loop(), config.replace_dead
        )
    autoscalers = autoscalers_for(deployment, router, pool)
    async with router:
        app = create_app(
            router, deployment, config, on_replica_dead=replacer, autoscalers=autoscalers
        )
        for scaler in autoscalers.values():
            scaler.start()
        server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_config=None,
                timeout_graceful_shutdown=config.shutdown_grace_s,
                timeout_keep_alive=config.timeout_keep_alive_s,
            )
        )
        server.on_started = on_started
        signals.server = server
        try:
            await server.serve(sockets=[listener])
        except SystemExit:
            raise ServeError(
                f"could not listen on {config.host}:{config.port} (see the log above)"
            ) from None
        finally:
            signals.server = None
            for scaler in autoscalers.values():
                await scaler.aclose()


def serve(
    deployment: Deployment | str | Path,
    config: ServeConfig,
    *,
    pool: ReplicaPool | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
    step_models: StepModelLookup | None = None,
) -> None:
    """Serve a deployment (or a DEPLOY.yaml, checked by `load_for_serving`) until Ctrl-C or
    SIGTERM (blocking; the CLI's `fmtune serve`).

    The port is bound before anything starts. With cluster 'local' its replicas start in
    `pool` (a new pool with default limits if None), models with replicas 'auto' sized first
    (runtime.scaling.autoscaler.size_deployment, with a calibration on the deployment's apps)
    and then scaled by an Autoscaler each; with cluster 'endpoints' nothing is started.
    `on_phase(text)` hears what is being started; `on_ready(url)` is called once the front
    door accepts connections. `step_models(deployment, replicas)` gives the router's
    step-time model per model key (the CLI passes `runtime.profiler.router_step_models`: the
    stored profiles; the serving layer stands beside the simulator and cannot read them
    itself); keys it leaves out, or all of them without it, predict with speeds learned
    online. Whatever stops the server (a signal, an error, a failed start),
    the pool is closed on the way out, so no replica outlives it.
    """
    checked = (
        deployment if isinstance(deployment, Deployment) else load_for_serving(Path(deployment))
    )
    url = f"http://{config.host}:{config.port}"
    listener = bind_listener(config)
    signals = _ShutdownSignals()
    endpoints: list[Endpoint] = []

    def starting(key: str, count: int) -> None:
        engine = checked.models[key].engine
        if on_phase is not None:
            on_phase(f"starting {count} replica(s) of {engine.model} for model key '{key}'")

    def started() -> None:
        logger.info("serving on %s with %d endpoints", url, len(endpoints))
        if on_ready is not None:
            on_ready(url)

    with listener, signals.installed():
        if pool is None and checked.cluster == "local":
            pool = ReplicaPool()
        try:
            sized, _ = size_deployment(checked, pool)
            endpoints.extend(start_endpoints(sized, pool, on_model=starting))
            asyncio.run(
                _serve_async(
                    checked, config, endpoints, pool, signals, listener, started, step_models
                )
            )
        except KeyboardInterrupt:
            logger.info("interrupted; stopping")
        finally:
            if pool is not None:
                pool.close()
