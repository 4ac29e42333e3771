"""The cloud link: a routed request sent over the bus (`hg.gen.<model>`), its answer streamed
back as items. I/O only: what the edge does instead is the router's.

Cloud failures never hang a request and never truncate it silently:

* a cloud that does not accept (no responders, accept timeout, overloaded, bus down, or a
  first reply that is an `internal` error, malformed or out of sequence) feeds the breaker
  and raises `CloudDown`: the router serves the request locally (`cloud_unavailable`);
* a cloud that fails after streaming part of the answer feeds the breaker and raises
  `FailedMidStream`: the router finishes the answer locally from the text already streamed,
  or ends it with an error when that does not fit the edge context;
* a mid-stream error that says the request itself is wrong, or was cancelled, ends the
  stream as it is: finishing it locally would hide it; so does the request's own deadline
  running out (there is no time left to finish it locally).

Deadlines: the request's budget is the client's own (`X-Request-Timeout`), capped by the
policy's `request_timeout_ms`, which is also the budget of a client that sets none. The bus
request carries what is left of it when sent (`timeout_ms`, the time already spent on the
edge subtracted); the worker stops generating when it runs out and answers `timeout`, and
the edge's own wait for the stream ends at the same deadline. A request whose budget is
already spent is not sent: it fails with `timeout`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from broker import wire
from broker.errors import (
    ErrorCode,
    HybridgenError,
    Internal,
    NoResponders,
    Overloaded,
    Timeout,
    Unavailable,
)
from broker.streaming import ReplyStream, request_stream
from edge.node import EdgeNode
from edge.route.request import (
    EdgeRequest,
    Item,
    Outcome,
    Piece,
    RouteInfo,
)
from edge.route.rules import Decision, Reason
from edge.route.spans import RequestSpans
from serving import deadlines, tracing
from serving.protocol import chunk_logprobs

logger = logging.getLogger(__name__)

#: Cloud errors that say "the cloud cannot take it now" (they feed the breaker). `Internal`
#: before any output is a broken worker (its coded error, or a malformed or out-of-sequence
#: reply, `broker.streaming`): the edge answers instead, as for a worker that is gone.
CLOUD_DOWN = (NoResponders, Timeout, Overloaded, Unavailable, Internal)
#: Cloud errors mid-stream that the edge must not paper over (they end the stream).
_NOT_RECOVERABLE = (ErrorCode.BAD_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED, ErrorCode.CANCELLED)

#: The perplexity threshold in force for a request, its source, and the tokens scored.
ThresholdInfo = tuple[float | None, str, int]


class CloudDown(Exception):
    """The cloud did not take the request (nothing of it was streamed): the router serves
    it locally, `cloud_unavailable`. `why`: the error code, or "no bus"."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class FailedMidStream(Exception):
    """The cloud failed after streaming `streamed` (`tokens` of it): the router finishes the
    answer locally, or ends it with an error."""

    def __init__(self, streamed: str, tokens: int, cause: HybridgenError) -> None:
        super().__init__(cause.message)
        self.streamed, self.tokens, self.cause = streamed, tokens, cause


class CloudBridge:
    """Sends routed requests to the cloud through the node's bus connection and breaker.

    Args:
        node: the node whose connection, breaker, policy, counters and runtime are used.
    """

    def __init__(self, node: EdgeNode) -> None:
        self.node = node

    async def serve(
        self,
        request: EdgeRequest,
        decision: Decision,
        started: float,
        perplexity: float | None,
        threshold: ThresholdInfo,
        trace: dict[str, Any] | None = None,
        *,
        spans: RequestSpans,
    ) -> AsyncGenerator[Item, None]:
        """Serve a request routed to the cloud: `RouteInfo`, then `Piece`s, then an `Outcome`.

        Args:
            request: the request (the cloud gets its text or messages).
            decision: the routing decision that sent it to the cloud.
            started: `time.perf_counter()` when the request arrived.
            perplexity: the prompt perplexity, when the edge prefilled it.
            threshold: the threshold in force, its source and the tokens scored.
            trace: filled with the cloud hop's facts for the request's `request` event:
                `hop_ms` (sent until a worker accepted), `worker` (the worker's node id,
                from its `Done`) and `cloud_model_version`.
            spans: the request's spans: the bus request's span is a child of its answer's,
                and its context travels to the worker in the request's NATS headers.

        Raises:
            CloudDown: the cloud did not take it (before any item).
            FailedMidStream: the cloud failed after part of the answer.
            HybridgenError: a mid-stream error the edge must not hide (bad request, context
                length, cancelled), or the request's own deadline.
        """
        node = self.node
        if node.nc is None or not node.breaker.allow():
            raise CloudDown("no bus")
        trace = {} if trace is None else trace
        hop = spans.generation(request.cloud_model or node.settings.cloud_model, cloud=True)
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(tracing.ending(hop))
            sent = time.perf_counter()
            try:
                stream = await self._open(stack, request, started, tracing.headers_of(hop))
            except CLOUD_DOWN as exc:
                if self._own_deadline(exc, request, started):
                    node.breaker.release()  # the request's own deadline, not the cloud's fault
                    raise
                self._count_failure(request, exc, "")
                raise CloudDown(exc.code.value) from exc
            trace["hop_ms"] = round((time.perf_counter() - sent) * 1e3, 3)
            node.breaker.record_success()
            yield self._accepted(request, decision, started, perplexity, threshold)
            streamed: list[str] = []
            completion_tokens = 0
            try:
                pending = 0  # tokens of chunks held back (no text yet)
                async for chunk in stream:
                    completion_tokens += len(chunk.token_ids)
                    pending += len(chunk.token_ids)
                    scores = chunk_logprobs(chunk)
                    if chunk.text or scores:
                        streamed.append(chunk.text)
                        yield Piece(chunk.text, scores, pending)
                        pending = 0
            except HybridgenError as exc:
                if exc.code in _NOT_RECOVERABLE or self._own_deadline(exc, request, started):
                    # A request that is wrong, cancelled, or out of its own time (no time is
                    # left to finish it locally; its short budget says nothing of the cloud).
                    raise
                self._count_failure(request, exc, "cloud failed mid-stream: ")
                raise FailedMidStream("".join(streamed), completion_tokens, exc) from exc
            outcome = self._outcome(stream.done, started, trace)
            tracing.record_outcome(hop, outcome.finish_reason, outcome.prompt_tokens,
                                   outcome.completion_tokens, **{"hybridgen.worker":
                                   trace.get("worker")})  # fmt: skip
            yield outcome

    async def _open(
        self,
        stack: contextlib.AsyncExitStack,
        request: EdgeRequest,
        started: float,
        headers: dict[str, str] | None,
    ) -> ReplyStream:
        """Send the request on the bus (with `headers`: its trace context); its stream once
        a worker accepted it.

        Raises:
            Timeout: the request's budget was spent before it could be sent.
            NoResponders, Timeout, Overloaded, Unavailable, Internal: the cloud did not
                accept it (`CLOUD_DOWN`).
        """
        node = self.node
        policy = node.routing_policy
        assert node.nc is not None
        left_s = self.budget_left_s(request, started)
        try:
            if left_s <= 0:
                raise Timeout(
                    f"request {request.request_id} spent its {self.budget_s(request):g} s "
                    "deadline before it could be sent to the cloud"
                )
            return await stack.enter_async_context(
                request_stream(
                    node.nc,
                    self._bus_request(request, left_s),
                    accept_timeout=policy.cloud_timeout_ms / 1e3,
                    idle_timeout=policy.cloud_idle_timeout_ms / 1e3,
                    total_timeout=left_s,
                    headers=headers,
                )
            )
        except CLOUD_DOWN:
            raise  # the caller counts it, or gives the probe slot back
        except BaseException:
            # Cancelled, or an error that says nothing of the cloud's health: give back
            # the half-open probe slot `allow()` took, or the breaker would stay stuck.
            node.breaker.release()
            raise

    def _bus_request(self, request: EdgeRequest, left_s: float) -> wire.GenerateRequest:
        """The request as the cloud sees it, with what is left of its deadline."""
        # A personalized request: `messages` / `cloud_prompt` are what the user lets the
        # cloud see (never the samples or the cache; the persona only with share_profile).
        inputs: dict[str, Any] = (
            {"messages": request.messages, "tools": request.tools}
            if request.messages is not None
            else {"prompt": request.cloud_prompt or request.prompt}
        )
        return wire.GenerateRequest(
            request_id=request.request_id,
            # A cloud A/B variant's share goes to the variant's model.
            model=request.cloud_model or self.node.settings.cloud_model,
            origin=self.node.node_id,
            timeout_ms=max(1, int(left_s * 1e3)),
            **request.options.to_wire(),
            **inputs,
            grammar=None if request.grammar is None else request.grammar.to_wire(),
        )

    def _own_deadline(self, exc: HybridgenError, request: EdgeRequest, started: float) -> bool:
        """Whether `exc` is the request's own deadline running out (not the cloud's fault)."""
        return isinstance(exc, Timeout) and self.budget_left_s(request, started) <= 0

    def _count_failure(self, request: EdgeRequest, exc: HybridgenError, when: str) -> None:
        """A cloud failure: it feeds the breaker, the counters and a `cloud_error` event."""
        node = self.node
        node.breaker.record_failure()
        node.counters.cloud_failures += 1
        node.publish_event(
            "cloud_error", f"{when}{exc.code.value}: {exc.message}", request.request_id
        )

    def _accepted(
        self,
        request: EdgeRequest,
        decision: Decision,
        started: float,
        perplexity: float | None,
        threshold: ThresholdInfo,
    ) -> RouteInfo:
        """A worker took the request: its route is recorded and published (`fallback`)."""
        node = self.node
        wanted = decision.reason.value
        node.record_route(decision)
        details: dict[str, Any] = {"reason": wanted}
        if decision.reason is Reason.LOW_CONFIDENCE:
            details.update(
                prompt_perplexity=perplexity,
                perplexity_threshold=threshold[0],
                threshold_source=threshold[1],
                scored_tokens=threshold[2],
            )
        node.publish_event(
            "fallback", f"served by the cloud: {wanted}", request.request_id, **details
        )
        return RouteInfo(
            "cloud",
            wanted,
            request.request_id,
            node.settings.cloud_model,
            (time.perf_counter() - started) * 1e3,
            perplexity,
            *threshold,
        )

    def _outcome(self, done: wire.Done | None, started: float, trace: dict[str, Any]) -> Outcome:
        """The cloud's `Done` as the answer's `Outcome`; the worker and its model version go
        to the request's trace."""
        assert done is not None
        if done.served_by:
            trace["worker"] = done.served_by
        if done.model_version:
            trace["cloud_model_version"] = done.model_version
        outcome = Outcome(
            done.finish_reason,
            done.usage.prompt_tokens,
            done.usage.completion_tokens,
            model_version=done.model_version,
            draft_tokens=done.usage.draft_tokens,
            accepted_tokens=done.usage.accepted_tokens,
        )
        self.node.counters.stats.record(time.perf_counter() - started, outcome.completion_tokens)
        return outcome

    def budget_s(self, request: EdgeRequest) -> float:
        """The request's whole deadline in seconds: the client's own, capped by the policy's
        `request_timeout_ms` (that budget when the client sets none)."""
        cap_s = self.node.routing_policy.request_timeout_ms / 1e3
        return deadlines.budget_s(request.timeout_s, cap_s)

    def budget_left_s(self, request: EdgeRequest, started: float) -> float:
        """Seconds left of the request's deadline (`started`: its `perf_counter` arrival)."""
        return self.budget_s(request) - (time.perf_counter() - started)
