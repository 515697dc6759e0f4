"""Replacement of a dead local replica while a deployment is served.

When the router takes a local replica's endpoint out of rotation, `ReplicaReplacer` releases
it, starts a replacement in the pool (a cold start, in a thread, so serving goes on) and swaps
the new endpoint into the router. `fmtune serve` (runtime.serving.server) installs one.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from runtime.deployment import Deployment
from runtime.engine.pool import ReplicaPool
from runtime.routing.router import Endpoint, Router, endpoints_for_replicas

logger = logging.getLogger(__name__)


class ReplicaReplacer:
    """Starts a replacement for a dead local replica and swaps it into the router.

    Called on the event loop when the router takes an endpoint out of rotation; the slow part
    (a cold start) runs in a thread, one replacement at a time, so serving goes on meanwhile.
    """

    def __init__(
        self,
        router: Router,
        deployment: Deployment,
        pool: ReplicaPool,
        loop: asyncio.AbstractEventLoop,
        replace_dead: bool,
    ) -> None:
        self.router = router
        self.deployment = deployment
        self.pool = pool
        self.loop = loop
        self.replace_dead = replace_dead
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def __call__(self, endpoint: Endpoint) -> None:
        """Schedule a replacement if the endpoint is a local replica that should be replaced."""
        if endpoint.replica is None:
            return
        model = self.deployment.models.get(endpoint.model_key)
        if model is None or not (model.replicas == "auto" or self.replace_dead):
            return
        wanted = sum(1 for e in self.router.endpoints if e.model_key == endpoint.model_key)
        thread = threading.Thread(
            target=self._replace,
            args=(endpoint, wanted),
            name=f"replace-{endpoint.endpoint_id}",
            daemon=True,
        )
        self.threads.append(thread)
        thread.start()

    def _replace(self, dead: Endpoint, wanted: int) -> None:
        key = dead.model_key
        engine = self.deployment.models[key].engine
        with self._lock:
            try:
                assert dead.replica is not None
                self.pool.release(dead.replica)
                replicas = self.pool.acquire(engine, count=wanted)
            except Exception:
                logger.exception("could not replace dead endpoint %s", dead.endpoint_id)
                return
            known = {id(e.replica) for e in list(self.router.endpoints) if e.replica}
            fresh = endpoints_for_replicas(key, [r for r in replicas if id(r) not in known])
            try:
                swap = asyncio.run_coroutine_threadsafe(self._swap(dead, fresh), self.loop)
                swap.result(timeout=30)
            except (RuntimeError, TimeoutError) as error:
                logger.warning("replacement of %s not swapped in: %r", dead.endpoint_id, error)
                return
            logger.info("replaced %s with %s", dead.endpoint_id, [e.endpoint_id for e in fresh])

    async def _swap(self, dead: Endpoint, fresh: list[Endpoint]) -> None:
        await self.router.remove_endpoint(dead)
        for endpoint in fresh:
            self.router.add_endpoint(endpoint)
