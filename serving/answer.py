"""One OpenAI answer path for both APIs: an answer's items become one JSON body or a stream
of SSE chunks, every body and chunk tagged with hybridgen's fields, and its tokens counted.

An answer is a sequence of `Piece`s (text, with its tokens' scores when asked for) ended by
an `Outcome`. The edge's router yields them; the cloud API turns the worker's replies into
them. `Answer` writes them the same way whoever served them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from broker.wire import FinishReason
from serving import protocol
from serving.deadlines import until_disconnect
from serving.metrics import HttpMetrics
from serving.sse import sse_response
from serving.tools import CallStream


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text; with `logprobs` asked for, its tokens' scores (a piece
    may then carry tokens and no text, while a stop string is held back)."""

    text: str
    logprobs: tuple[protocol.TokenLogprob, ...] = ()


@dataclass
class Outcome:
    """How an answer ended: the last item of every answer."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: The cloud failed mid-stream and the edge wrote the rest.
    completed_locally: bool = False
    #: Version of the model that served it (the `system_fingerprint`); None: unknown.
    model_version: str | None = None
    #: The cloud worker that served it (its node id), when known.
    worker: str | None = None


@dataclass
class Answer:
    """How one request's answer is written.

    Args:
        chat: a chat completion (else a text completion).
        request_id: the request's id (the response id derives from it).
        model: the model name the answer reports.
        tags: hybridgen's fields on every body and chunk (`served_by`, `request_id`, ...).
        metrics: the API's metrics, where the answer's tokens are counted.
        echo: text the answer starts with (a completion's `echo`).
        tools: the model may call tools (calls in its text become `tool_calls`).
        logprobs: the client asked for log-probabilities.
        include_usage: a stream ends with a usage-only chunk.
        model_version: the serving model's version when known before the end.
    """

    chat: bool
    request_id: str
    model: str
    tags: dict[str, Any]
    metrics: HttpMetrics
    echo: str = ""
    tools: bool = False
    logprobs: bool = False
    include_usage: bool = False
    model_version: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    async def respond(
        self,
        items: AsyncIterable[Piece | Outcome],
        *,
        stream: bool,
        headers: dict[str, str],
        http: Request | None = None,
    ) -> Response:
        """The answer as SSE chunks or one JSON body. A client that hangs up on a JSON answer
        closes `items` (`http`: the request whose disconnect is watched)."""
        try:
            if stream:
                return await sse_response(self.chunks(items), headers=headers)
            collected = self.collect(items)
            text, scores, outcome = await (
                collected if http is None else until_disconnect(http, collected)
            )
        except BaseException:
            await _close(items)  # however the answer ends, even with its items unread
            raise
        return JSONResponse(self.body(text, scores, outcome), headers=headers)

    async def collect(
        self, items: AsyncIterable[Piece | Outcome]
    ) -> tuple[str, list[protocol.TokenLogprob], Outcome]:
        """The whole answer: its text (after the echo), its tokens' scores, its outcome."""
        parts = [self.echo]
        scores: list[protocol.TokenLogprob] = []
        outcome: Outcome | None = None
        try:
            async for item in items:
                if isinstance(item, Piece):
                    parts.append(item.text)
                    scores.extend(item.logprobs)
                else:
                    outcome = item
        finally:
            await _close(items)
        assert outcome is not None, "an answer ends with its Outcome"
        return "".join(parts), scores, outcome

    def body(self, text: str, scores: list[protocol.TokenLogprob], outcome: Outcome) -> Any:
        """The JSON body of a whole answer, tagged; its tokens are counted."""
        self.count(outcome)
        common: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "text": text,
            "finish_reason": outcome.finish_reason,
            "usage": (outcome.prompt_tokens, outcome.completion_tokens),
            "created": self.created,
            "logprobs": scores if self.logprobs else None,
            "model_version": outcome.model_version or self.model_version,
        }
        if self.chat:
            built: Any = protocol.chat_response(**common, tools=self.tools)
        else:
            built = protocol.completion_response(**common, logprob_offset=len(self.echo))
        return tagged(built, self.final_tags(outcome))

    async def chunks(self, items: AsyncIterable[Piece | Outcome]) -> AsyncIterator[Any]:
        """The SSE chunks of one answer, each tagged: the first (role, echo), the text (with
        its tokens' log-probabilities when asked for), the finish, the usage."""
        chunks_of = protocol.StreamChunks(
            chat=self.chat,
            request_id=self.request_id,
            model=self.model,
            created=self.created,
            model_version=self.model_version,
            calls=CallStream() if self.tools else None,
        )
        try:
            yield tagged(chunks_of.first(self.echo), self.tags)
            async for item in items:
                if isinstance(item, Piece):
                    for chunk in chunks_of.deltas(item.text, item.logprobs or None):
                        yield tagged(chunk, self.tags)
                    continue
                self.count(item)
                if item.model_version:
                    chunks_of.model_version = item.model_version
                final = self.final_tags(item)
                for chunk in chunks_of.ends(item.finish_reason):
                    yield tagged(chunk, final)
                if self.include_usage:
                    usage = chunks_of.usage(item.prompt_tokens, item.completion_tokens)
                    yield tagged(usage, final)
        finally:
            await _close(items)

    def final_tags(self, outcome: Outcome) -> dict[str, Any]:
        """The tags of the last body or chunks: who finished it is known at the end."""
        tags = dict(self.tags)
        if outcome.completed_locally:
            tags["completed_by"] = "edge"
        if outcome.worker:
            tags["worker"] = outcome.worker
        return tags

    def count(self, outcome: Outcome) -> None:
        """Count the answer's prompt and completion tokens in the API's metrics."""
        self.metrics.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(outcome.completion_tokens)


def tagged(model: Any, tags: dict[str, Any]) -> dict[str, Any]:
    """A protocol model's JSON body with hybridgen's fields added. Added here, not through
    the builders' `**extra`, because the builders take `request_id` as the source of the
    response id."""
    body: dict[str, Any] = model.body()
    body.update(tags)
    return body


async def _close(items: AsyncIterable[Any]) -> None:
    """Close an answer's items: an unfinished generation is cancelled, and items that own
    a resource give it back, read or not."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
