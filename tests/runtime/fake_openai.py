"""Test doubles: a tiny OpenAI-compatible engine, a loopback uvicorn runner, a fake replica.

`FakeEngine` answers /v1/chat/completions and /v1/completions like vLLM (JSON or SSE chunks,
usage when asked), with a fixed reply, an optional delay before answering and between chunks,
and counts its calls.
`LoopbackServer` serves any ASGI app with uvicorn on 127.0.0.1 in a background thread with its
own event loop (optionally entering an async context, such as a Router, on that loop).
`FakeReplica` is a pool replica whose "server" is a FakeEngine, so serve()'s local path runs
without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from runtime.engine.config import EngineConfig
from runtime.engine.replica import Replica, free_port

MAX_TOKENS_LIMIT = 1000


class FakeEngine:
    """An OpenAI-compatible engine answering `reply` word by word after `delay_s`."""

    def __init__(
        self,
        reply: str = "Hello from the fake engine",
        served_model: str = "fake-model",
        delay_s: float = 0.0,
        chunk_delay_s: float = 0.001,
    ) -> None:
        self.reply = reply
        self.served_model = served_model
        self.delay_s = delay_s
        self.chunk_delay_s = chunk_delay_s
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.resets: list[int] = []
        """The number of calls answered before each POST /reset_prefix_cache."""
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.served_model, "object": "model"}]}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> dict[str, bool]:
            self.resets.append(self.calls)
            return {"success": True}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._answer(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._answer(await request.json(), chat=False)

        return app

    async def _answer(self, body: dict[str, Any], chat: bool) -> Response:
        self.calls += 1
        self.bodies.append(body)
        if body.get("model") != self.served_model:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "model")
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > MAX_TOKENS_LIMIT:
            message = f"max_tokens must be at most {MAX_TOKENS_LIMIT}, got {max_tokens}"
            return _error(400, message, "max_tokens")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        words = self.reply.split(" ")
        pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": len(pieces),
            "total_tokens": 11 + len(pieces),
        }
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": self.reply}
            else:
                choice["text"] = self.reply
            return JSONResponse(
                {
                    "id": f"fake-{self.calls}",
                    "object": kind,
                    "created": int(time.time()),
                    "model": self.served_model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            self._chunks(pieces, chat, usage if include_usage else None),
            media_type="text/event-stream",
        )

    async def _chunks(
        self, pieces: list[str], chat: bool, usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": f"fake-{self.calls}", "object": kind, "created": int(time.time())}
        base["model"] = self.served_model
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if last else None}
            if chat:
                choice["delta"] = {"content": piece} | ({"role": "assistant"} if not index else {})
            else:
                choice["text"] = piece
            yield _sse({**base, "choices": [choice]})
            await asyncio.sleep(self.chunk_delay_s)
        if usage is not None:
            yield _sse({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error(status: int, message: str, param: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param}}
    return JSONResponse(body, status_code=status)


class LoopbackServer:
    """Serves an ASGI app with uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(
        self,
        app: Any,
        *,
        port: int | None = None,
        context: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.context = context
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        config.timeout_graceful_shutdown = 1
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"uvicorn-{self.port}")
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """Whether the server thread still runs."""
        return self.thread.is_alive() and not self.server.should_exit

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by start()
            self.error = error

    async def _main(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.context is not None:
                await stack.enter_async_context(self.context())
            await self.server.serve()

    def start(self, timeout_s: float = 10.0) -> LoopbackServer:
        """Start serving and wait until the socket listens."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (connections are refused afterwards) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeReplica(Replica):
    """A pool replica served by a FakeEngine in-process instead of a vLLM process."""

    def __init__(self, config: EngineConfig, replica_id: str) -> None:
        super().__init__(config, replica_id=replica_id)
        self.engine = FakeEngine(served_model=config.model)
        self.loopback: LoopbackServer | None = None

    def start(self) -> FakeReplica:
        """Serve the fake engine on a free port."""
        self.loopback = LoopbackServer(self.engine.app).start()
        self.port = self.loopback.port
        return self

    def running(self) -> bool:
        """Whether the fake server still serves."""
        return self.loopback is not None and self.loopback.alive

    def die(self) -> None:
        """Stop serving without telling the pool (a crash)."""
        if self.loopback is not None:
            self.loopback.stop()

    def stop(self) -> None:
        """Stop serving (the pool's stop)."""
        self.die()
        self.loopback = None

    def rss_bytes(self) -> int:
        """No process, no memory."""
        return 0
