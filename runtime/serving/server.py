"""`fmtune serve`: runs the front door of a deployment until Ctrl-C or SIGTERM.

`serve` is the blocking CLI entry point: it loads a DEPLOY.yaml, sizes and starts its replicas
(cluster 'local') or takes its endpoints (cluster 'endpoints'), builds the front door over a
Router (runtime.serving.app.create_app), runs it under uvicorn with replacement of dead
replicas and the models' autoscalers, and on Ctrl-C or SIGTERM lets open requests finish for
`shutdown_grace_s` before stopping everything. `ServeConfig` (runtime.serving.config) is how
the front door listens, authenticates, bounds its load and judges its SLA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from runtime.cluster import start_endpoints
from runtime.deployment import Deployment, load_deployment
from runtime.engine.pool import ReplicaPool
from runtime.errors import FmtuneError
from runtime.routing.router import Endpoint, Router
from runtime.scaling.autoscaler import autoscalers_for, size_deployment
from runtime.scaling.replacer import ReplicaReplacer
from runtime.serving.app import create_app
from runtime.serving.config import ServeConfig

logger = logging.getLogger(__name__)


class ServeError(FmtuneError):
    """The front door could not start (e.g. its port is taken)."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: serve() owns SIGINT/SIGTERM so that stopping
    always runs the cleanup (uvicorn re-raises a captured SIGTERM, which would kill the
    process before the replicas are stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handlers alone."""
        yield


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
) -> None:
    sla_s = config.sla_e2e_s or deployment.provisioner.sla_p99_s
    router = Router(endpoints, deployment.router, default_deadline_s=sla_s)
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
            )
        )
        signals.server = server
        try:
            await server.serve()
        except SystemExit:
            raise ServeError(
                f"could not listen on {config.host}:{config.port} (see the log above)"
            ) from None
        finally:
            signals.server = None
            for scaler in autoscalers.values():
                await scaler.aclose()


def serve(
    deployment_path: str | Path, config: ServeConfig, *, pool: ReplicaPool | None = None
) -> None:
    """Serve a DEPLOY.yaml until Ctrl-C or SIGTERM (blocking; the CLI's `fmtune serve`).

    With cluster 'local' its replicas start in `pool` (a new pool with default limits if
    None), models with replicas 'auto' sized first (runtime.scaling.autoscaler.size_deployment, with
    a calibration on the deployment's apps) and then scaled by an Autoscaler each; with
    cluster 'endpoints' nothing is started. Whatever stops the server (a signal,
    an error, a failed start), the pool is closed on the way out, so no replica outlives it.
    """
    deployment = load_deployment(Path(deployment_path))
    signals = _ShutdownSignals()
    with signals.installed():
        if pool is None and deployment.cluster == "local":
            pool = ReplicaPool()
        try:
            sized, _ = size_deployment(deployment, pool)
            endpoints = start_endpoints(sized, pool)
            logger.info(
                "serving %s on http://%s:%d with %d endpoints",
                deployment_path,
                config.host,
                config.port,
                len(endpoints),
            )
            asyncio.run(_serve_async(deployment, config, endpoints, pool, signals))
        except KeyboardInterrupt:
            logger.info("interrupted; stopping")
        finally:
            if pool is not None:
                pool.close()
