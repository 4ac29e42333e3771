"""Builders of the response bodies: ids, `system_fingerprint`, answers and stream chunks.

Every builder takes extra keyword fields such as `served_by="edge"`, which land in the JSON
body next to OpenAI's fields. `StreamChunks` (`serving.protocol.stream`) drives the chunk
builders through one streamed answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from serving.protocol.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from serving.protocol.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    ModelCard,
    ModelList,
    Usage,
)
from serving.tools import finish_reason as tools_finish_reason
from serving.tools import split_calls


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
    index: int = 0,
    **extra: Any,
) -> Completion:
    """A non-streamed `/v1/completions` answer (one choice, the `index`th).

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
        choices=[
            CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=scores)
        ],
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
    index: int = 0,
    **extra: Any,
) -> Completion:
    """One SSE chunk of a streamed `/v1/completions` answer (of its `index`th choice).

    `with_choice=False` makes the trailing usage-only chunk (`stream_options.include_usage`).
    """
    choices = (
        [CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)]
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
    index: int = 0,
    **extra: Any,
) -> ChatCompletion:
    """A non-streamed `/v1/chat/completions` answer (`chatcmpl-<request_id>`; one choice,
    the `index`th).

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
        choices=[
            ChatChoice(index=index, message=message, finish_reason=finish_reason, logprobs=scores)
        ],
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
    index: int = 0,
    **extra: Any,
) -> ChatCompletionChunk:
    """One SSE chunk of a streamed chat answer (of its `index`th choice).

    The first chunk carries `role="assistant"`, the last one `finish_reason` (null in the
    others); `with_choice=False` makes the trailing usage-only chunk.
    """
    choices = (
        [
            ChatChunkChoice(
                index=index,
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


def model_list(names: list[str], *, owned_by: str = "hybridgen", **extra: Any) -> ModelList:
    """`GET /v1/models` body for the given model names."""
    return ModelList(data=[ModelCard(id=name, owned_by=owned_by, **extra) for name in names])
