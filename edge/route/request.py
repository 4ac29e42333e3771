"""One routed request: what the router is given and the items its answer streams as.

`Router.generate` takes an `EdgeRequest` and yields a `RouteInfo` first (where the answer
comes from and why, known before any text), then `Piece`s of text, then an `Outcome`. The
HTTP layer turns those items into OpenAI responses; the benchmark times them.

`stream_local` turns a local generation into items; the router and the cloud bridge both
stream local answers through it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from broker.telemetry import RequestStats
from edge.personal.adapt import NgramCache
from edge.runtime import Finished, Generation, SamplingParams, Token
from serving.answer import Outcome, Piece
from serving.grammar import Grammar
from serving.protocol import TokenLogprob


@dataclass(frozen=True)
class WithSamples:
    """A personalized request's alternative for the edge: the same request with the user's
    own samples in context (`edge.personal.personalizer`); the router keeps it only when the samples
    make the request's own tokens more likely (`edge.personal.personalizer.samples_help`)."""

    #: What the edge model reads with the samples (persona, samples, then the request).
    prompt: str
    #: [start, end) characters of `prompt` whose tokens are the request's own (scored).
    score_span: tuple[int, int] | None
    #: How many samples `prompt` holds.
    count: int
    #: Prefix reuse of the persona-and-samples text, as `EdgeRequest.prefix_key/chars`.
    prefix_key: str | None = None
    prefix_chars: int = 0


@dataclass(frozen=True)
class EdgeRequest:
    """One generation request as the router sees it."""

    request_id: str
    #: What the edge model reads: the completion prompt, or the chat rendered with the edge
    #: model's own template.
    prompt: str
    model: str
    options: SamplingParams
    #: A chat request's messages: the cloud gets these (and applies its own template), not
    #: the edge's rendering of them.
    messages: list[dict[str, Any]] | None = None
    route: str = "auto"
    local_only: bool = False
    user: str | None = None
    #: [start, end) characters of `prompt` whose tokens the prompt perplexity scores (a chat
    #: request's last user message content); None: the whole prompt.
    score_span: tuple[int, int] | None = None
    #: A personalized completion: the prompt the cloud gets (the caller's own prompt, with
    #: the persona only when the user shares it); None: `prompt`. A personalized chat keeps
    #: the cloud's version in `messages` and the edge's in `prompt`.
    cloud_prompt: str | None = None
    #: The user's n-gram cache (a snapshot) mixed into the edge model's logits; None: none.
    adapter: NgramCache | None = None
    #: A personalized request's stable prefix (persona and samples): its key for the
    #: runtime's prefix reuse (None: none) and its length in characters of `prompt`.
    prefix_key: str | None = None
    prefix_chars: int = 0
    #: The client's own deadline in seconds (`X-Request-Timeout`), None: the policy's budget.
    timeout_s: float | None = None
    #: Constrained decoding (`response_format`), at the edge and, on the bus, in the cloud.
    grammar: Grammar | None = None
    #: Tools shown to the model (OpenAI's list, `serving.tools`): the edge rendered them
    #: into `prompt`; the cloud gets them with `messages` and renders them itself.
    tools: list[dict[str, Any]] | None = None
    #: The A/B variant the router assigned (`edge.route.experiments`); None: no experiment.
    variant: str | None = None
    #: A cloud-model variant's model (the bus subject); None: the node's cloud model.
    cloud_model: str | None = None
    #: The same request with the user's own samples in context, for the router's gate
    #: (never sent to the cloud); None: no samples picked.
    with_samples: WithSamples | None = None
    #: One of a request's `n` choices (`serving.choices`): the id of the whole answer
    #: (`request_id` is the choice's own); None: the request is its one choice.
    answer_id: str | None = None


@dataclass(frozen=True)
class RouteInfo:
    """Where a request is served and why: the first item of every answer."""

    served_by: str  # "edge" | "cloud"
    route_reason: str
    request_id: str
    model: str
    decision_ms: float
    prompt_perplexity: float | None = None
    #: The perplexity threshold in force for this request and where it came from.
    perplexity_threshold: float | None = None
    threshold_source: str | None = None
    #: Prompt tokens the perplexity was averaged over (it picks the calibrated length bucket).
    scored_tokens: int | None = None
    #: The A/B variant that serves it (`fleet.experiment`); None: no experiment in force.
    variant: str | None = None
    #: How many of the user's own samples the edge kept in context (0: the gate left them
    #: out); None: none were offered.
    samples_in_context: int | None = None


Item = RouteInfo | Piece | Outcome


async def stream_local(
    generation: Generation,
    started: float,
    stats: RequestStats,
    drafted: Sequence[Token] = (),
    finished: Finished | None = None,
    model_version: str | None = None,
) -> AsyncGenerator[Item, None]:
    """Stream a local generation as `Piece`s, then its `Outcome`; cancel it if abandoned.

    Args:
        generation: the local generation (its `Prefill` event, if still to come, is skipped).
        started: `time.perf_counter()` when the request arrived (its latency is recorded).
        stats: where the request's latency and completion tokens are recorded.
        drafted: tokens already read by the second stage, streamed first.
        finished: the `Finished` event the draft already reached, if the answer ended there.
        model_version: the version of the model set that generates it (the `Outcome` names it:
            an A/B variant's runtime is not the node's).
    """
    outcome = None
    pending = 0  # tokens held back (no text yet): the next piece carries them
    try:
        for token in drafted:
            pending += 1
            if token.text or token.token is not None:
                yield _piece(token, pending)
                pending = 0
        while outcome is None:
            event = finished or await generation.next_event()
            if isinstance(event, Token):
                pending += 1
            if isinstance(event, Token) and (event.text or event.token is not None):
                yield _piece(event, pending)
                pending = 0
            elif isinstance(event, Finished):
                if event.text:
                    yield Piece(event.text)
                outcome = Outcome(
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                    model_version=model_version,
                    draft_tokens=event.draft_tokens,
                    accepted_tokens=event.accepted_tokens,
                )
    finally:
        if outcome is None:
            generation.cancel()
    stats.record(time.perf_counter() - started, outcome.completion_tokens)
    yield outcome


def _piece(token: Token, tokens: int = 1) -> Piece:
    """A generated token as a `Piece` (with its scores when they were asked for), standing for
    `tokens` tokens (those held back before it included)."""
    if token.token is None:
        return Piece(token.text, tokens=tokens)
    return Piece(token.text, (TokenLogprob(token.token, token.logprob, token.top),), tokens)
