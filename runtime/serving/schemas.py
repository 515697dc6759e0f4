"""Request and response bodies of the front door (`fmtune serve`).

The OpenAI bodies declare only the fields the front door itself reads (the model to route to,
streaming, the token budget used for the router's predictions); every other OpenAI or vLLM
parameter is kept (extra="allow") and forwarded unchanged to the engine, which validates it.
The app bodies are fmtune's own: the inputs of one deployment-app request and what it produced.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Output tokens a chat call is expected to produce when it sets no max_tokens (for routing
#: predictions only; the engine decides the real length).
DEFAULT_CHAT_TOKENS = 256
#: vLLM's (and OpenAI's) default max_tokens of a legacy completion.
DEFAULT_COMPLETION_TOKENS = 16


class StreamOptions(BaseModel):
    """OpenAI's stream_options; unknown keys are forwarded to the engine."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(
        default=False, description="Send a last chunk carrying the token usage."
    )


class ChatMessage(BaseModel):
    """One chat message; tool calls and other OpenAI keys are forwarded unchanged."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, description="system, user, assistant, tool or developer.")
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of content parts, or None (tool calls)."
    )


class OpenAIRequest(BaseModel):
    """Fields the front door itself reads; every other OpenAI or vLLM sampling parameter is
    forwarded unchanged to the engine, which validates it and answers 400 naming it."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="A deployment model key or its served name.")
    stream: bool = Field(default=False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Stream options.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")


class ChatCompletionRequest(OpenAIRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (newer name of max_tokens)."
    )


class CompletionRequest(OpenAIRequest):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, several prompts, or token ids."
    )


class AppRequest(BaseModel):
    """Body of POST /v1/apps/{name}."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(
        description='The app\'s request inputs by name, e.g. {"article": "..."}.'
    )


class AppResponse(BaseModel):
    """What one app request produced."""

    outputs: dict[str, Any] = Field(description="The app's answer fields (empty on failure).")
    ok: bool = Field(description="Whether every node succeeded.")
    error: str | None = Field(description="The first failing node's reason, if any.")
    e2e_s: float = Field(description="End-to-end latency, seconds.")
    llm_calls: int = Field(description="LLM calls the request made.")
    prompt_tokens: int = Field(description="Prompt tokens over all LLM calls.")
    completion_tokens: int = Field(description="Generated tokens over all LLM calls.")
