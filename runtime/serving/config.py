"""How the front door listens, authenticates, bounds its load and judges its SLA."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

#: Default largest request body: room for about a million characters of prompt, far above what
#: a model's context holds, yet a bound on what one request can make the front door buffer.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class ServeConfig(BaseModel):
    """How the front door listens, authenticates, bounds its load and judges its SLA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to listen on.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="Bearer key clients must send (`Authorization: Bearer KEY`) on every "
        "route but the health checks (/health, /healthz) and /version, as vLLM leaves them "
        "open; None leaves the front door open.",
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        le=1024**3,
        description="Largest request body accepted, in bytes; a larger one is answered 413 "
        "before it is read whole (from its Content-Length, or as soon as a body sent without "
        "one grows past it) and is never forwarded. Raise it for large base64 images.",
    )
    max_queue: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Most LLM and app requests in flight or waiting at the front door at once; "
        "further ones are answered 429 with Retry-After (back-pressure).",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="Retry-After seconds sent with every 429."
    )
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Longest a request may wait for the router plus the engine's answer (a "
        "stream: the longest gap between chunks) before it fails with 504.",
    )
    sla_e2e_s: float | None = Field(
        default=None,
        gt=0,
        description="End-to-end deadline of every request, in seconds: the router's deadline "
        "for its calls (queue order, shedding; split along the critical path for apps) and "
        "the bound of the SLA-attainment metric. None takes the deployment's "
        "provisioner.sla_p99_s.",
    )
    replace_dead: bool = Field(
        default=True,
        description="Start a replacement when a local replica dies (always done for models "
        "with replicas 'auto').",
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="On Ctrl-C/SIGTERM, how long open requests may finish before the "
        "connections are closed and the replicas stopped.",
    )
    timeout_keep_alive_s: int = Field(
        default=75,
        gt=0,
        le=3600,
        description="Seconds an idle client connection stays open for the next request. "
        "Longer than the idle timeouts of common load balancers and client pools (60 s and "
        "less), so the front door never closes a connection a client is about to reuse "
        "(uvicorn's default of 5 s races clients that keep connections for 5 s too).",
    )
