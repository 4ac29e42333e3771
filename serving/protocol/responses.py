"""Response bodies of the OpenAI-compatible APIs: answers, stream chunks and model lists.

Extra fields (hybridgen's `served_by`, `route_reason`, ...) are allowed and land next to
OpenAI's; `body()` gives the JSON-ready dict. The builders (`serving.protocol.builders`)
fill them in.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    """Base of the response bodies: extra fields (served_by, route_reason, ...) allowed.

    `body()` drops fields left at None, but those in `_nullable`: the ones the OpenAI
    reference marks required but nullable (`logprobs`, `finish_reason`, `refusal`), which a
    strict client expects as `null`.
    """

    model_config = ConfigDict(extra="allow")

    _nullable: ClassVar[frozenset[str]] = frozenset()

    def body(self) -> dict[str, Any]:
        """JSON-ready dict (None fields dropped but the required nullable ones, extras kept)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None or name in self._nullable:
                out[name] = _plain(value)
        for name, value in (self.model_extra or {}).items():
            if value is not None:
                out[name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, _Response):
        return value.body()
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: hybridgen's speculative decoding, where the answer drafted tokens: `draft_tokens`
    #: (proposed without the model) and `accepted_tokens` (kept; counted in
    #: `completion_tokens`).
    completion_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(
        cls, prompt_tokens: int, completion_tokens: int, details: dict[str, int] | None = None
    ) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=details,
        )


class CompletionChoice(_Response):
    _nullable = frozenset({"finish_reason", "logprobs"})

    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Response):
    _nullable = frozenset({"content", "refusal"})

    role: Literal["assistant"] = "assistant"
    #: None: an answer that is only tool calls.
    content: str | None
    refusal: str | None = None
    annotations: list[Any] = Field(default_factory=list)
    #: OpenAI's `tool_calls` (`id`, `type`, `function.name`, `function.arguments`).
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Response):
    _nullable = frozenset({"finish_reason", "logprobs"})

    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    #: Tool-call deltas: the first of a call has `index`, `id`, `type`, `function.name`;
    #: the next ones `index` and pieces of `function.arguments`.
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Response):
    _nullable = frozenset({"finish_reason"})

    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hybridgen"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
