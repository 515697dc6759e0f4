"""OpenAI-shaped errors of the front door.

Every error the front door answers has OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, so OpenAI clients turn it into their typed exceptions; the message names the field
and value at fault. `ProxyError` is what the routes and the proxy raise; the app's exception
handler turns it into such a response.
"""

from __future__ import annotations

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
    CallFailure.SHED: (503, "shed"),
    CallFailure.NO_ENDPOINT: (503, "no_healthy_endpoint"),
    CallFailure.TIMEOUT: (504, "timeout"),
    CallFailure.CONNECTION: (502, "upstream_error"),
    CallFailure.UPSTREAM_ERROR: (502, "upstream_error"),
    CallFailure.APP_ERROR: (502, "upstream_error"),
}


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
