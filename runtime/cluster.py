"""Cluster backends: where a deployment's model keys are served.

- `local`: replicas are vLLM processes started (or reused hot) through the replica pool;
  replica counts marked 'auto' are sized by the provisioner first.
- `endpoints`: each model key is served by existing OpenAI-compatible URLs (a user's own vLLM
  fleet); nothing is started or stopped.
Either way the result is a list of router endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from runtime.deployment import Deployment
from runtime.engine.pool import ReplicaPool
from runtime.routing.router import Endpoint, endpoints_for_replicas

logger = logging.getLogger(__name__)

#: Outstanding calls the router allows per endpoint when it cannot know the engine's batch.
EXTERNAL_MAX_NUM_SEQS = 256
#: Replicas an 'auto' model starts with before the provisioner has measurements.
AUTO_INITIAL_REPLICAS = 1


def initial_replicas(deployment: Deployment, key: str) -> int:
    """The replica count a model key starts with."""
    replicas = deployment.models[key].replicas
    return AUTO_INITIAL_REPLICAS if replicas == "auto" else int(replicas)


def start_endpoints(
    deployment: Deployment,
    pool: ReplicaPool | None,
    on_model: Callable[[str, int], None] | None = None,
) -> list[Endpoint]:
    """Endpoints serving every model key of the deployment (starting replicas if local)."""
    endpoints: list[Endpoint] = []
    for key, model in deployment.models.items():
        if deployment.cluster == "endpoints":
            for index, url in enumerate(model.endpoints):
                endpoints.append(
                    Endpoint(
                        endpoint_id=f"{key}/{index}",
                        model_key=key,
                        served_model=model.engine.model,
                        base_url=url.rstrip("/"),
                        max_num_seqs=model.engine.max_num_seqs or EXTERNAL_MAX_NUM_SEQS,
                    )
                )
            continue
        if pool is None:
            raise ValueError("cluster 'local' needs a replica pool")
        count = initial_replicas(deployment, key)
        if on_model is not None:
            on_model(key, count)
        replicas = pool.acquire(model.engine, count=count)
        endpoints.extend(endpoints_for_replicas(key, replicas))
    return endpoints


def reset_prefix_caches(endpoints: list[Endpoint]) -> int:
    """Empty the prefix cache of every replica fmtune started among these endpoints, so a run
    measures its prompts' prefills, not cache hits left by earlier runs on a hot replica.
    A user's own endpoints are not touched. Returns how many resets failed (each logged)."""
    seen: set[str] = set()
    failed = 0
    for endpoint in endpoints:
        replica = endpoint.replica
        if replica is None or replica.replica_id in seen:
            continue
        seen.add(replica.replica_id)
        if not replica.reset_prefix_cache():
            failed += 1
    return failed
