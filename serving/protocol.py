"""OpenAI-compatible HTTP schemas shared by the cloud API and the edge API.

Torch-free: the edge imports this module (never copy it). Requests are validated strictly
(`"max_tokens": "5"` is a type error, not 5) so a client learns about a wrong type instead
of getting a silently coerced answer; unknown fields are ignored like OpenAI does.

How the edge reuses it:

* parse bodies with `serving.bodies.json_body(CompletionRequest)` /
  `json_body(ChatCompletionRequest)` (400 envelope naming the field on bad input);
* read the common sampling knobs with `request.sampling(default)` (a
  `serving.sampling.SamplingParams`), and the
  extensions `user`, `route` (`"auto" | "edge" | "cloud"`) and `local_only` from the request
  (the cloud accepts and ignores them);
* answer with `completion_response` / `chat_response` (non-stream) and
  `completion_chunk` / `chat_chunk` (stream) — every builder takes extra keyword fields such
  as `served_by="edge"`, `route_reason="local"`, which land in the JSON body next to
  OpenAI's fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.sampling import SamplingParams

Route = Literal["auto", "edge", "cloud"]

#: How many stop sequences a request may carry (OpenAI allows 4; the bus allows 16).
MAX_STOP_SEQUENCES = 4


class _Request(BaseModel):
    """Base of the request bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: Not in OpenAI's API (vLLM has it): 0 disables top-k.
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: Accepted for compatibility; not acted on.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    #: Extension shared with the edge: opaque user id (personalization on the edge).
    user: str | None = Field(default=None, max_length=256)
    #: Extension (edge): where to serve the request; the cloud ignores it.
    route: Route = "auto"
    #: Extension (edge): never leave the node; the cloud ignores it.
    local_only: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        """`stop` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """This request's sampling parameters; `default_max_tokens` where it sets none
        (`requested_max_tokens()` tells whether it did)."""
        return SamplingParams(
            max_tokens=self.requested_max_tokens() or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(self.stop_list()),
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (`stream_options`)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`. `prompt` is a string (or a list holding one string)."""

    prompt: str | list[str]
    echo: bool = False
    #: Accepted for compatibility; log-probabilities are not returned.
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported (a string or [string])")
        return value

    def prompt_text(self) -> str:
        """The prompt as one string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    #: Newer name of `max_tokens` in OpenAI's chat API; wins when both are set.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    #: Accepted for compatibility; log-probabilities are not returned.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        """Messages as `{"role", "content"}` dicts, the input of `models.chat.render_chat`."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ----------------------------------------------------------------------------- responses


class _Response(BaseModel):
    """Base of the response bodies: extra fields (served_by, route_reason, ...) allowed."""

    model_config = ConfigDict(extra="allow")

    def body(self) -> dict[str, Any]:
        """JSON-ready dict (None fields dropped, extras kept)."""
        return self.model_dump(exclude_none=True)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
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


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def chat_completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def _usage(usage: Usage | tuple[int, int] | None) -> Usage | None:
    if usage is None or isinstance(usage, Usage):
        return usage
    return Usage.of(*usage)


def completion_response(
    *,
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage | tuple[int, int],
    created: int | None = None,
    **extra: Any,
) -> Completion:
    """A non-streamed `/v1/completions` answer.

    Args:
        request_id: the hybridgen request id (the response id is `cmpl-<request_id>`).
        usage: a `Usage` or `(prompt_tokens, completion_tokens)`.
        extra: extra top-level fields, e.g. `served_by`, `route_reason`, `request_id`.
    """
    return Completion(
        id=completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
        usage=_usage(usage),
        **extra,
    )


def completion_chunk(
    *,
    request_id: str,
    model: str,
    text: str = "",
    finish_reason: str | None = None,
    usage: Usage | tuple[int, int] | None = None,
    created: int | None = None,
    with_choice: bool = True,
    **extra: Any,
) -> Completion:
    """One SSE chunk of a streamed `/v1/completions` answer.

    `with_choice=False` makes the trailing usage-only chunk (`stream_options.include_usage`).
    """
    choices = [CompletionChoice(text=text, finish_reason=finish_reason)] if with_choice else []
    return Completion(
        id=completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        choices=choices,
        usage=_usage(usage),
        **extra,
    )


def chat_response(
    *,
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage | tuple[int, int],
    created: int | None = None,
    **extra: Any,
) -> ChatCompletion:
    """A non-streamed `/v1/chat/completions` answer (`chatcmpl-<request_id>`)."""
    return ChatCompletion(
        id=chat_completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish_reason)],
        usage=_usage(usage),
        **extra,
    )


def chat_chunk(
    *,
    request_id: str,
    model: str,
    content: str | None = None,
    role: Literal["assistant"] | None = None,
    finish_reason: str | None = None,
    usage: Usage | tuple[int, int] | None = None,
    created: int | None = None,
    with_choice: bool = True,
    **extra: Any,
) -> ChatCompletionChunk:
    """One SSE chunk of a streamed chat answer.

    The first chunk carries `role="assistant"`, the last one `finish_reason`;
    `with_choice=False` makes the trailing usage-only chunk.
    """
    choices = (
        [ChatChunkChoice(delta=ChatDelta(role=role, content=content), finish_reason=finish_reason)]
        if with_choice
        else []
    )
    return ChatCompletionChunk(
        id=chat_completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        choices=choices,
        usage=_usage(usage),
        **extra,
    )


@dataclass(frozen=True)
class StreamChunks:
    """Every chunk of one streamed answer, chat or completion, built the same way on the edge
    and the cloud: the first (the assistant role), text deltas, the last (`finish_reason`),
    and the usage-only chunk of `stream_options.include_usage`. `extra` fields (hybridgen's
    `served_by`, `route_reason`, ...) land next to OpenAI's."""

    chat: bool
    request_id: str
    model: str
    created: int

    def _chunk(
        self,
        text: str | None,
        *,
        first: bool = False,
        finish_reason: str | None = None,
        usage: tuple[int, int] | None = None,
        **extra: Any,
    ) -> ChatCompletionChunk | Completion:
        common: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "finish_reason": finish_reason,
            "usage": usage,
            "with_choice": usage is None,
        }
        if self.chat:
            role: Literal["assistant"] | None = "assistant" if first else None
            return chat_chunk(content=text, role=role, **common, **extra)
        return completion_chunk(text=text or "", **common, **extra)

    def first(self, text: str = "", **extra: Any) -> ChatCompletionChunk | Completion:
        """The opening chunk (the role; a completion's echoed prompt, if any)."""
        return self._chunk(text, first=True, **extra)

    def delta(self, text: str, **extra: Any) -> ChatCompletionChunk | Completion:
        """A piece of the answer's text."""
        return self._chunk(text, **extra)

    def finish(self, finish_reason: str, **extra: Any) -> ChatCompletionChunk | Completion:
        """The closing chunk, with the finish reason."""
        return self._chunk("", finish_reason=finish_reason, **extra)

    def usage(self, prompt: int, completion: int, **extra: Any) -> ChatCompletionChunk | Completion:
        """The usage-only chunk after the last one (no choices)."""
        return self._chunk(None, usage=(prompt, completion), **extra)


def model_list(names: list[str], *, owned_by: str = "hybridgen", **extra: Any) -> ModelList:
    """`GET /v1/models` body for the given model names."""
    return ModelList(data=[ModelCard(id=name, owned_by=owned_by, **extra) for name in names])
