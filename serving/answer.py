"""One OpenAI answer path for both APIs: an answer's items become one JSON body or a stream
of SSE chunks, every body and chunk tagged with hybridgen's fields, and its tokens counted.

An answer is a sequence of `Piece`s (text, with its tokens' scores when asked for) ended by
an `Outcome`. The edge's router yields them; the cloud API turns the worker's replies into
them. `Answer` writes them the same way whoever served them.

A request with `n` choices has one such sequence per choice (`serving.choices`): the body
holds `n` choices with their `index`, a stream interleaves each choice's chunks (each with
its `index` and its own `finish_reason`) and ends once every choice has; `usage` counts the
prompt once and the tokens of every choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from broker.wire import FinishReason
from serving import protocol
from serving.admission import ticket_of
from serving.choices import close, merged
from serving.deadlines import until_disconnect
from serving.limits import Ticket
from serving.metrics import HttpMetrics
from serving.sse import sse_response
from serving.tools import CallStream


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text; with `logprobs` asked for, its tokens' scores (a piece
    may then carry tokens and no text, while a stop string is held back)."""

    text: str
    logprobs: tuple[protocol.TokenLogprob, ...] = ()
    #: Tokens generated for this piece, held-back ones before it included (what an answer
    #: cut short counts for its key).
    tokens: int = 0


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
    #: Speculative decoding: tokens drafted, and how many of them the model accepted.
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def usage(self) -> protocol.Usage:
        """The answer's `usage`, with the drafting's counts where it drafted."""
        details = None
        if self.draft_tokens:
            details = {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens}
        return protocol.Usage.of(self.prompt_tokens, self.completion_tokens, details)


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
    #: The request's admission under its key's limits (`serving.limits`), from `respond`'s
    #: request: the answer's usage is counted on it.
    ticket: Ticket | None = None

    async def respond(
        self,
        choices: Sequence[AsyncIterable[Piece | Outcome]],
        *,
        stream: bool,
        headers: dict[str, str],
        http: Request | None = None,
    ) -> Response:
        """The answer (the items of each choice, in choice order) as SSE chunks or one JSON
        body. A client that hangs up on a JSON answer closes the items (`http`: the request
        whose disconnect is watched; its key's ticket counts the answer's usage)."""
        self.ticket = ticket_of(http)
        if self.ticket is not None:
            self.ticket.model = self.model
        try:
            if stream:
                return await sse_response(self.chunks(choices), headers=headers)
            collected = self.collect(choices)
            answers = await (collected if http is None else until_disconnect(http, collected))
        except BaseException:
            for items in choices:  # however the answer ends, even with its items unread
                await close(items)
            raise
        return JSONResponse(self.body(answers), headers=headers)

    async def collect(self, choices: Sequence[AsyncIterable[Piece | Outcome]]) -> list[Whole]:
        """Each choice whole: its text (after the echo), its tokens' scores, its outcome."""
        parts: list[list[str]] = [[self.echo] for _ in choices]
        scores: list[list[protocol.TokenLogprob]] = [[] for _ in choices]
        outcomes: list[Outcome | None] = [None] * len(choices)
        async with contextlib.aclosing(merged(choices)) as items:
            async for index, item in items:
                if isinstance(item, Piece):
                    self.generated(item)
                    parts[index].append(item.text)
                    scores[index].extend(item.logprobs)
                else:
                    outcomes[index] = item
        wholes = []
        for text, scored, outcome in zip(parts, scores, outcomes, strict=True):
            assert outcome is not None, "an answer ends with its Outcome"
            wholes.append(Whole("".join(text), scored, outcome))
        return wholes

    def body(self, answers: Sequence[Whole]) -> Any:
        """The JSON body of a whole answer (its choices in order), tagged; its tokens are
        counted."""
        total = merge_outcomes([answer.outcome for answer in answers])
        self.count(total)
        built = [self._choice_body(index, answer) for index, answer in enumerate(answers)]
        body = built[0]
        if len(built) > 1:
            body.choices = [choice for each in built for choice in each.choices]
            body.usage = total.usage()
        return tagged(body, self.final_tags(total))

    def _choice_body(self, index: int, answer: Whole) -> Any:
        """The body of one choice alone (the protocol's builders make one choice each)."""
        outcome = answer.outcome
        common: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "text": answer.text,
            "finish_reason": outcome.finish_reason,
            "usage": outcome.usage(),
            "created": self.created,
            "logprobs": answer.scores if self.logprobs else None,
            "model_version": outcome.model_version or self.model_version,
            "index": index,
        }
        if self.chat:
            return protocol.chat_response(**common, tools=self.tools)
        return protocol.completion_response(**common, logprob_offset=len(self.echo))

    async def chunks(self, choices: Sequence[AsyncIterable[Piece | Outcome]]) -> AsyncIterator[Any]:
        """The SSE chunks of one answer, each tagged: each choice's first (role, echo), then
        the choices' text as it comes (with its tokens' log-probabilities when asked for),
        each choice's finish, and once every choice has finished, the usage."""
        streams = [
            protocol.StreamChunks(
                chat=self.chat,
                request_id=self.request_id,
                model=self.model,
                created=self.created,
                model_version=self.model_version,
                calls=CallStream() if self.tools else None,
                index=index,
            )
            for index in range(len(choices))
        ]
        outcomes: list[Outcome | None] = [None] * len(choices)
        try:
            for chunks_of in streams:
                yield tagged(chunks_of.first(self.echo), self.tags)
            async with contextlib.aclosing(merged(choices)) as items:
                async for index, item in items:
                    chunks_of = streams[index]
                    if isinstance(item, Piece):
                        self.generated(item)
                        for chunk in chunks_of.deltas(item.text, item.logprobs or None):
                            yield tagged(chunk, self.tags)
                        continue
                    outcomes[index] = item
                    if item.model_version:
                        chunks_of.model_version = item.model_version
                    final = self.final_tags(item)
                    for chunk in chunks_of.ends(item.finish_reason):
                        yield tagged(chunk, final)
            assert None not in outcomes, "an answer ends with its Outcome"
            total = merge_outcomes(cast(list[Outcome], outcomes))
            self.count(total)
            if self.include_usage:
                usage = streams[0].usage(total.usage())
                yield tagged(usage, self.final_tags(total))
        finally:
            for choice in choices:
                await close(choice)

    def final_tags(self, outcome: Outcome) -> dict[str, Any]:
        """The tags of the last body or chunks: who finished it is known at the end."""
        tags = dict(self.tags)
        if outcome.completed_locally:
            tags["completed_by"] = "edge"
        if outcome.worker:
            tags["worker"] = outcome.worker
        return tags

    def count(self, outcome: Outcome) -> None:
        """Count the answer's prompt and completion tokens in the API's metrics and on its
        key's ticket."""
        self.metrics.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(outcome.completion_tokens)
        if self.ticket is not None:
            self.ticket.finish(outcome.prompt_tokens, outcome.completion_tokens)

    def generated(self, piece: Piece) -> None:
        """Note a piece's tokens on the key's ticket (an answer cut short counts them)."""
        if self.ticket is not None:
            self.ticket.generated += piece.tokens


@dataclass(frozen=True)
class Whole:
    """One choice of an answer, whole: its text, its tokens' scores, its outcome."""

    text: str
    scores: list[protocol.TokenLogprob]
    outcome: Outcome


def merge_outcomes(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome of an answer's choices together: the first choice's (its finish reason,
    model version and worker, its prompt counted once), with every choice's completion tokens;
    completed locally when any was."""
    first = outcomes[0]
    if len(outcomes) == 1:
        return first
    return dataclasses.replace(
        first,
        completion_tokens=sum(outcome.completion_tokens for outcome in outcomes),
        draft_tokens=sum(outcome.draft_tokens for outcome in outcomes),
        accepted_tokens=sum(outcome.accepted_tokens for outcome in outcomes),
        completed_locally=any(outcome.completed_locally for outcome in outcomes),
    )


def tagged(model: Any, tags: dict[str, Any]) -> dict[str, Any]:
    """A protocol model's JSON body with hybridgen's fields added. Added here, not through
    the builders' `**extra`, because the builders take `request_id` as the source of the
    response id."""
    body: dict[str, Any] = model.body()
    body.update(tags)
    return body
