"""OpenAI-shaped errors of the front door.

Every error the front door answers has OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, so OpenAI clients turn it into their typed exceptions; the message names the field
and value at fault. `ProxyError` is what the routes and the proxy raise; the app's exception
handler turns it into such a response.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from runtime.engine.client import CallFailure


class ProxyError(Exception):
    """A call the front door answers with an error status instead of the engine's answer."""

    def __init__(self, status: int, code: str, message: str, *, kind: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind


def openai_error(
    status: int,
    message: str,
    *,
    kind: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error response in OpenAI's shape, which OpenAI clients turn into typed exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


#: The HTTP answer to a failure of unknown kind: the upstream's fault.
UPSTREAM_FAULT = (502, "upstream_error")
#: The HTTP answer (status, error code) to each way a routed call or app request fails.
STATUS_OF_FAILURE: dict[CallFailure, tuple[int, str]] = {
    CallFailure.QUEUE_FULL: (429, "queue_full"),
    # A shed call never reached an engine: the client may come back when the load eases
    # (429 with Retry-After, as for a full queue), not a fault of the deployment (5xx).
    CallFailure.SHED: (429, "shed"),
    CallFailure.NO_ENDPOINT: (503, "no_healthy_endpoint"),
    CallFailure.TIMEOUT: (504, "timeout"),
    CallFailure.CONNECTION: (502, "upstream_error"),
    CallFailure.UPSTREAM_ERROR: (502, "upstream_error"),
    CallFailure.APP_ERROR: (502, "upstream_error"),
}


def rejection_reason(code: str) -> str:
    """The `reason` label of the fmtune_rejected_429 counter for a 429 with error code
    `code`: 'shed' for a call admission control shed, 'router_queue' for a full queue."""
    return "shed" if code == "shed" else "router_queue"


def status_for_failure(failure: CallFailure | None) -> tuple[int, str]:
    """HTTP status and error code for the kind of failure of the router or the executor
    (a failure of unknown kind is the upstream's: 502)."""
    if failure is None:
        return UPSTREAM_FAULT
    return STATUS_OF_FAILURE.get(failure, UPSTREAM_FAULT)


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """One line naming each rejected field (body prefix dropped) and its value, plus the first
    field's name for OpenAI's `param`."""
    parts: list[str] = []
    first: str | None = None
    for item in errors:
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        message = str(item.get("msg", "invalid value"))
        if item.get("type") == "missing":
            parts.append(f"{where}: {message}")
        else:
            parts.append(f"{where}: {message}, got {item.get('input')!r}"[:300])
    return "; ".join(parts) or "invalid request body", first


def describe_unreadable_body(
    errors: list[Any], body: Any, content_type: str | None
) -> tuple[str, str] | None:
    """(error code, one line) when the request body is not a JSON document at all: invalid
    JSON (the parser's own message, with line and column), no body, or a body not sent as
    application/json (which the routes do not parse); None for a schema error, which names
    its field instead.

    These are malformed requests (400, as vLLM and OpenAI answer them), not values that fail
    validation (422).
    """
    if not errors:
        return None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        reason = str((first.get("ctx") or {}).get("error", "invalid JSON"))
        position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        if isinstance(body, str | bytes) and position <= len(body):
            doc = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
            reason = str(json.JSONDecodeError(reason, doc, position))
        return "invalid_json", f"request body is not valid JSON: {reason}"
    if loc != ("body",):
        return None
    if first.get("type") == "missing":
        return "missing_body", "request has no body: send a JSON object"
    if isinstance(first.get("input"), bytes):
        return (
            "unsupported_media_type",
            "request body must be JSON sent with 'Content-Type: application/json', got "
            + (f"Content-Type '{content_type}'" if content_type else "no Content-Type"),
        )
    return None
