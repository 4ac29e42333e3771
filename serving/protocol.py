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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from broker import wire
from broker.errors import BadRequest
from serving.grammar import Grammar, from_response_format
from serving.sampling import SamplingParams
from serving.tools import (
    CallStream,
    ToolRequest,
    check_tool_choice,
    check_tools,
    split_calls,
)
from serving.tools import finish_reason as tools_finish_reason

Route = Literal["auto", "edge", "cloud"]

#: No token of a real vocabulary is longer than this many characters: an input with more
#: characters than this times a context window cannot fit it, and is refused before the
#: tokenizer spends time on it (`too_long_for`).
MAX_CHARS_PER_TOKEN = 64

#: How many stop sequences a request may carry (OpenAI allows 4; the bus allows 16).
MAX_STOP_SEQUENCES = 4

#: The largest count or seed a request may give: the engines take 32-bit integers
#: (onnxruntime-genai's `random_seed`, `max_length`, `top_k`), and a bigger value must be a
#: 400 naming the field, not an `OverflowError` when the request is encoded for the bus.
MAX_INT32 = 2**31 - 1
#: Integers msgpack carries (signed or unsigned 64-bit), for the free-form `tools`.
_WIRE_INTS = (-(2**63), 2**64 - 1)


def _wire_ints_only(value: Any) -> bool:
    """Whether every integer inside `value` (nested dicts and lists) fits msgpack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not _WIRE_INTS[0] <= item <= _WIRE_INTS[1]:
            return False
    return True


def too_long_for(chars: int, context_length: int) -> bool:
    """Whether an input of `chars` characters certainly exceeds a `context_length` window
    (see `MAX_CHARS_PER_TOKEN`), so it can be refused without tokenizing it."""
    return chars > MAX_CHARS_PER_TOKEN * context_length


class _Request(BaseModel):
    """Base of the request bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: Not in OpenAI's API (vLLM has it): 0 disables top-k.
    top_k: int = Field(default=0, ge=0, le=MAX_INT32)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_INT32)
    #: One answer per request: `n` > 1 is refused (400 naming `n`).
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: OpenAI's additive penalties: 0 (or unset) only; a non-zero value is refused.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    #: Extension shared with the edge: opaque user id (personalization on the edge).
    user: str | None = Field(default=None, max_length=256)
    #: Extension (edge): where to serve the request; the cloud ignores it.
    route: Route = "auto"
    #: Extension (edge): never leave the node; the cloud ignores it.
    local_only: bool = False
    #: OpenAI options neither API supports: refused (400 naming them) rather than ignored,
    #: since ignoring them would answer something the client did not ask for.
    logit_bias: Any = None
    best_of: Any = None
    #: OpenAI's legacy names of tools: refused (use `tools` and `tool_choice`).
    functions: Any = None
    function_call: Any = None
    #: Tool calling (`serving.tools`), chat only: refused on completions.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: Structured outputs: `text`, `json_object` or `json_schema` (`serving.grammar`);
    #: the answer is decoded under the grammar at whichever end serves it.
    response_format: Any = None

    #: Whether the request takes `tools` (chat) or refuses them (completions).
    _takes_tools: ClassVar[bool] = False

    @field_validator("logit_bias", "best_of", "functions", "function_call")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: Any) -> Any:
        harmless = (
            value is None
            or value in ({}, [], "none")
            or (info.field_name == "best_of" and value == 1)
        )
        if not harmless:
            hint = "; use tools and tool_choice" if info.field_name.startswith("function") else ""
            raise PydanticCustomError(
                "unsupported",
                f"{info.field_name!r} is not supported by this API{hint}; remove it",
            )
        return value

    @field_validator("tools", "tool_choice", "parallel_tool_calls")
    @classmethod
    def _check_tools(cls, value: Any, info: Any) -> Any:
        if value is None or (not cls._takes_tools and value in ([], "none")):
            return value
        if not _wire_ints_only(value):
            raise PydanticCustomError(
                "out_of_range", f"an integer in {info.field_name!r} does not fit 64 bits"
            )
        if not cls._takes_tools:
            raise PydanticCustomError(
                "unsupported",
                f"{info.field_name!r} is only supported by /v1/chat/completions; remove it",
            )
        try:
            if info.field_name == "tools":
                check_tools(value)
            elif info.field_name == "tool_choice":
                check_tool_choice(value, check_tools(info.data.get("tools")))
        except BadRequest as exc:
            raise PydanticCustomError("tools", exc.message) from None
        return value

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: Any) -> Any:
        try:
            from_response_format(value)
        except BadRequest as exc:
            raise PydanticCustomError("response_format", exc.message) from None
        return value

    def grammar(self) -> Grammar | None:
        """The grammar `response_format` asks for (None: unconstrained); checked when the
        body was validated."""
        return from_response_format(self.response_format)

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value: int) -> int:
        if value != 1:
            raise PydanticCustomError(
                "unsupported",
                "n > 1 is not supported: one answer per request; send n requests (with "
                "different seeds) instead",
            )
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: Any) -> float | None:
        if value:
            raise PydanticCustomError(
                "unsupported",
                f"{info.field_name!r} is not supported by this API (only 0 is); remove it",
            )
        return value

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

    def logprob_request(self) -> tuple[bool, int]:
        """(whether log-probabilities are asked for, how many top tokens per step)."""
        return False, 0

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """This request's sampling parameters; `default_max_tokens` where it sets none
        (`requested_max_tokens()` tells whether it did)."""
        logprobs, top = self.logprob_request()
        return SamplingParams(
            max_tokens=self.requested_max_tokens() or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(self.stop_list()),
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (`stream_options`)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`. `prompt` is a string (or a list holding one string)."""

    prompt: str | list[str]
    echo: bool = False
    #: Log-probabilities of the generated tokens and of this many most likely tokens per step
    #: (0-5, as OpenAI's completions); None: none.
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

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
    """One part of a message's content. Only `text` parts are read: the models are text-only,
    so other parts (`image_url`, `input_audio`, `file`) are refused with a 400
    (`ChatMessage._text_parts_only`)."""

    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    """A tool call of an assistant message in the history (as the API answered it)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    #: `developer` is OpenAI's newer name of `system` (rendered as a system message); `tool`
    #: is a tool's result (`tool_call_id` names the call it answers).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: None only for an assistant message that holds `tool_calls`.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        kinds = (
            [p.get("type") for p in value if isinstance(p, dict)] if isinstance(value, list) else []
        )
        other = next((k for k in kinds if k != "text"), None)
        if other is not None:
            raise PydanticCustomError(
                "unsupported",
                f"content parts of type {other!r} are not supported: the models read text "
                "only; send text parts",
            )
        return value

    def text(self) -> str:
        """The message's content as one string (text parts joined; "" for none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        """`{"role", "content"}` (`developer` becomes `system`), with `tool_calls`,
        `tool_call_id` and a tool's `name` when the message has them."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)

    _takes_tools: ClassVar[bool] = True

    @field_validator("messages")
    @classmethod
    def _check_content(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.text() or message.tool_calls for message in value):
            raise ValueError("every message is empty; give some content")
        for index, message in enumerate(value):
            if message.content is None and not message.tool_calls:
                raise ValueError(f"messages[{index}] has no content")
            if message.role == "tool" and not message.tool_call_id:
                raise ValueError(f"messages[{index}]: a tool message needs tool_call_id")
        return value

    def tool_request(self) -> ToolRequest:
        """The request's tools, `tool_choice` and `parallel_tool_calls` (checked when the
        body was validated)."""
        tools = check_tools(self.tools) or []
        return ToolRequest(
            tools=tools,
            choice=check_tool_choice(self.tool_choice, tools),
            parallel=self.parallel_tool_calls is not False,
        )

    def grammar(self) -> Grammar | None:
        """The grammar of the answer: a tool call's when tools are in play (`auto` keeps
        `response_format`'s for the plain answer), else `response_format`'s."""
        return self.tool_request().grammar(super().grammar())

    #: Newer name of `max_tokens` in OpenAI's chat API; wins when both are set.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    #: Log-probabilities of the generated tokens; `top_logprobs` (0-20, needs `logprobs`)
    #: adds the most likely tokens of each step.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), (self.top_logprobs or 0) if self.logprobs else 0

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as `{"role", "content"}` dicts (`developer` becomes `system`; tool
        turns keep `tool_calls`, `tool_call_id` and `name`: `ChatMessage.as_dict`)."""
        return [m.as_dict() for m in self.messages]


# ----------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its step.

    `token` is the token's text decoded alone (a token that holds part of a UTF-8 character
    decodes to U+FFFD); `top` lists (text, log-probability), most likely first.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def chunk_logprobs(chunk: wire.Chunk) -> tuple[TokenLogprob, ...]:
    """The token scores a worker's bus chunk carries (empty unless they were asked for)."""
    if chunk.logprobs is None or chunk.tokens is None:
        return ()
    tops = chunk.top_logprobs or [[] for _ in chunk.tokens]
    return tuple(
        TokenLogprob(token, logprob, tuple((t.token, t.logprob) for t in top))
        for token, logprob, top in zip(chunk.tokens, chunk.logprobs, tops, strict=False)
    )


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs` in OpenAI's shape (`content`, `refusal`)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
            for i in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's `logprobs` in OpenAI's legacy shape (`tokens`,
    `token_logprobs`, `top_logprobs`, `text_offset`); `offset`: characters of the answer
    before the first of `items` (the echoed prompt, earlier chunks)."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [dict(i.top) for i in items],
        "text_offset": offsets,
    }


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

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
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


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def chat_completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def fingerprint(model_version: str | None) -> str | None:
    """`system_fingerprint` of an answer: the serving model's version (`fp_<version>`)."""
    return f"fp_{model_version}" if model_version else None


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
    logprobs: Sequence[TokenLogprob] | None = None,
    logprob_offset: int = 0,
    model_version: str | None = None,
    **extra: Any,
) -> Completion:
    """A non-streamed `/v1/completions` answer.

    Args:
        request_id: the hybridgen request id (the response id is `cmpl-<request_id>`).
        usage: a `Usage` or `(prompt_tokens, completion_tokens)`.
        logprobs: the generated tokens' log-probabilities (None: not asked for);
            `logprob_offset` the characters before the first (an echoed prompt).
        model_version: the serving model's version (`system_fingerprint`).
        extra: extra top-level fields, e.g. `served_by`, `route_reason`, `request_id`.
    """
    scores = None if logprobs is None else completion_logprobs(logprobs, logprob_offset)
    return Completion(
        id=completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        system_fingerprint=fingerprint(model_version),
        choices=[CompletionChoice(text=text, finish_reason=finish_reason, logprobs=scores)],
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
    logprobs: dict[str, Any] | None = None,
    model_version: str | None = None,
    **extra: Any,
) -> Completion:
    """One SSE chunk of a streamed `/v1/completions` answer.

    `with_choice=False` makes the trailing usage-only chunk (`stream_options.include_usage`).
    """
    choices = (
        [CompletionChoice(text=text, finish_reason=finish_reason, logprobs=logprobs)]
        if with_choice
        else []
    )
    return Completion(
        id=completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        system_fingerprint=fingerprint(model_version),
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
    logprobs: Sequence[TokenLogprob] | None = None,
    model_version: str | None = None,
    tools: bool = False,
    **extra: Any,
) -> ChatCompletion:
    """A non-streamed `/v1/chat/completions` answer (`chatcmpl-<request_id>`).

    `logprobs`: the generated tokens' log-probabilities (None: not asked for);
    `model_version`: the serving model's version (`system_fingerprint`); `tools`: the request
    let the model call tools, so calls in `text` become `message.tool_calls`
    (`serving.tools.split_calls`) and `finish_reason` `tool_calls`.
    """
    scores = None if logprobs is None else chat_logprobs(logprobs)
    content: str | None = text
    calls: list[dict[str, Any]] = []
    if tools:
        content, calls = split_calls(text)
        finish_reason = tools_finish_reason(finish_reason, calls)
    message = ChatMessageOut(content=content, tool_calls=calls or None)
    return ChatCompletion(
        id=chat_completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        system_fingerprint=fingerprint(model_version),
        choices=[ChatChoice(message=message, finish_reason=finish_reason, logprobs=scores)],
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
    logprobs: dict[str, Any] | None = None,
    model_version: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> ChatCompletionChunk:
    """One SSE chunk of a streamed chat answer.

    The first chunk carries `role="assistant"`, the last one `finish_reason` (null in the
    others); `with_choice=False` makes the trailing usage-only chunk.
    """
    choices = (
        [
            ChatChunkChoice(
                delta=ChatDelta(role=role, content=content, tool_calls=tool_calls),
                finish_reason=finish_reason,
                logprobs=logprobs,
            )
        ]
        if with_choice
        else []
    )
    return ChatCompletionChunk(
        id=chat_completion_id(request_id),
        created=created or int(time.time()),
        model=model,
        system_fingerprint=fingerprint(model_version),
        choices=choices,
        usage=_usage(usage),
        **extra,
    )


@dataclass
class StreamChunks:
    """Every chunk of one streamed answer, chat or completion, built the same way on the edge
    and the cloud: the first (the assistant role), text deltas, the last (`finish_reason`),
    and the usage-only chunk of `stream_options.include_usage`. `extra` fields (hybridgen's
    `served_by`, `route_reason`, ...) land next to OpenAI's.

    `model_version` (the `system_fingerprint`) may be set once known (the cloud tells it at
    the end); `offset` counts the characters streamed so far (completions' `text_offset`).
    `calls` (a chat that lets the model call tools): `deltas` and `ends` turn the calls in the
    text into tool-call deltas and the finish reason into `tool_calls`.
    """

    chat: bool
    request_id: str
    model: str
    created: int
    model_version: str | None = None
    offset: int = 0
    calls: CallStream | None = None

    def _chunk(
        self,
        text: str | None,
        *,
        first: bool = False,
        finish_reason: str | None = None,
        usage: tuple[int, int] | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> ChatCompletionChunk | Completion:
        common: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "finish_reason": finish_reason,
            "usage": usage,
            "with_choice": usage is None,
            "model_version": self.model_version,
        }
        if self.chat:
            role: Literal["assistant"] | None = "assistant" if first else None
            scores = chat_logprobs(logprobs) if logprobs else None
            return chat_chunk(
                content=text, role=role, logprobs=scores, tool_calls=tool_calls, **common, **extra
            )
        scores = completion_logprobs(logprobs, self.offset) if logprobs else None
        self.offset += len(text or "")
        return completion_chunk(text=text or "", logprobs=scores, **common, **extra)

    def first(self, text: str = "", **extra: Any) -> ChatCompletionChunk | Completion:
        """The opening chunk (the role; a completion's echoed prompt, if any)."""
        return self._chunk(text, first=True, **extra)

    def delta(
        self, text: str, logprobs: Sequence[TokenLogprob] | None = None, **extra: Any
    ) -> ChatCompletionChunk | Completion:
        """A piece of the answer's text, with its tokens' log-probabilities when asked for."""
        return self._chunk(text, logprobs=logprobs, **extra)

    def tool_calls(
        self, deltas: list[dict[str, Any]], **extra: Any
    ) -> ChatCompletionChunk | Completion:
        """A chat chunk of tool-call deltas (`serving.tools.CallStream`), no content."""
        return self._chunk(None, tool_calls=deltas, **extra)

    def finish(self, finish_reason: str, **extra: Any) -> ChatCompletionChunk | Completion:
        """The closing chunk, with the finish reason."""
        return self._chunk("", finish_reason=finish_reason, **extra)

    def deltas(
        self, text: str, logprobs: Sequence[TokenLogprob] | None = None, **extra: Any
    ) -> list[ChatCompletionChunk | Completion]:
        """The chunks a piece of the answer makes: one `delta`, or with `calls` its content
        and tool-call deltas (none while a call is still being written)."""
        if self.calls is None:
            return [self.delta(text, logprobs, **extra)]
        out = [
            self.delta(part, **extra) if isinstance(part, str) else self.tool_calls(part, **extra)
            for part in self.calls.feed(text)
        ]
        if logprobs:
            out.append(self.delta("", logprobs, **extra))
        return out

    def ends(self, finish_reason: str, **extra: Any) -> list[ChatCompletionChunk | Completion]:
        """The closing chunks: text still held back (a call cut short), then `finish`
        (`tool_calls` when the answer made calls and ended by itself)."""
        if self.calls is None:
            return [self.finish(finish_reason, **extra)]
        held = self.calls.close()
        out = [self.delta(held, **extra)] if held else []
        reason = tools_finish_reason(finish_reason, self.calls.calls)
        return [*out, self.finish(reason, **extra)]

    def usage(self, prompt: int, completion: int, **extra: Any) -> ChatCompletionChunk | Completion:
        """The usage-only chunk after the last one (no choices)."""
        return self._chunk(None, usage=(prompt, completion), **extra)


def model_list(names: list[str], *, owned_by: str = "hybridgen", **extra: Any) -> ModelList:
    """`GET /v1/models` body for the given model names."""
    return ModelList(data=[ModelCard(id=name, owned_by=owned_by, **extra) for name in names])
