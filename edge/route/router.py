"""Where each request is served: the `generate` flow that applies the routing policy.

`Router.generate` is the one place a request is routed. The rules themselves are pure
(`edge.route.rules.decide`); this module feeds them a request's facts and the node's state, in
up to three steps:

1. On arrival: hard limits (context, model, `route`), the predicted edge wait and the
   cloud's health can settle it at once.
2. Otherwise (`Target.PREFILL`) the edge prefills the prompt and holds the generation; the
   prompt perplexity decides again, against the threshold in force for the prompt's scored
   length (the policy's, else the model set's calibrated one: `EdgeNode.threshold_for`).
3. When the edge keeps it and a second stage is set, the edge drafts `second_stage_k`
   tokens unseen and decides once more on their confidence (`decide_after_draft`).

A personalized request that comes with the user's own samples is first put through the
samples gate (`edge.route.gate`); the routing perplexity stays that of the request without
the samples (the thresholds are calibrated on plain prompts).

A request routed to the cloud goes through the cloud link (`edge.route.cloud`, I/O only);
when the cloud does not take it, or fails mid-stream, the router serves or finishes it
locally, by the runtime that serves the request (the node's, or an A/B variant's). A local
one streams from the generation already prefilled (and drafted), so nothing is computed
twice. A full edge queue sends the request to the cloud when it may go there, else it is
refused (503).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from broker.errors import Overloaded, Unavailable
from edge.node import EdgeNode
from edge.route.cloud import CloudBridge, CloudDown, FailedMidStream, ThresholdInfo
from edge.route.gate import gate_samples, prefix_of
from edge.route.request import EdgeRequest, Item, Outcome, Piece, RouteInfo, stream_local
from edge.route.rules import (
    Decision,
    EdgeState,
    PolicySettings,
    Reason,
    RequestFacts,
    Target,
    decide,
    decide_after_draft,
)
from edge.route.spans import RequestSpans
from edge.runtime import EdgeRuntime, Finished, Generation, Prefill, Token
from models.scoring import encode_with_span, scored_positions
from serving import tracing
from serving.context import token_limit
from serving.model_names import require_served

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Plan:
    """A request made ready to route: its tokens, the facts the rules read, the policy and
    the perplexity threshold in force for it, and the edge wait judged on arrival."""

    request: EdgeRequest
    runtime: EdgeRuntime
    prompt_ids: list[int]
    span: tuple[int, int]
    prefix: dict[str, Any]
    facts: RequestFacts
    policy: PolicySettings
    threshold: ThresholdInfo
    wait_s: float
    #: The prompt perplexity without the user's samples, when the samples gate measured it.
    plain_perplexity: float | None


@dataclasses.dataclass
class _Judged:
    """What the prefill and the draft left: the held generation the edge keeps (None when
    it goes to the cloud or was decided on arrival), the prompt perplexity, the draft."""

    generation: Generation | None = None
    perplexity: float | None = None
    drafted: list[Token] = dataclasses.field(default_factory=list)
    finished: Finished | None = None


class Router:
    """Routes each request of a node and serves it locally or through the cloud bridge.

    Args:
        node: the node whose runtime, policy and thresholds requests are routed with.
        cloud: the bridge that serves requests routed to the cloud.
    """

    def __init__(self, node: EdgeNode, cloud: CloudBridge) -> None:
        self.node = node
        self.cloud = cloud

    def check_model(self, model: str) -> bool:
        """Whether `model` is served only by the cloud.

        Raises:
            NotFound: neither the edge nor the cloud model has that name.
        """
        settings = self.node.settings
        require_served(model, [settings.edge_model_name, settings.cloud_model])
        return model != settings.edge_model_name

    async def generate(self, request: EdgeRequest) -> AsyncGenerator[Item, None]:
        """Route and serve one request: `RouteInfo`, then `Piece`s, then an `Outcome`.

        A finished request is published as one `request` event (`publish_request_event`),
        unless it is `local_only`.

        Raises (before the RouteInfo): BadRequest, NotFound, ContextLengthExceeded,
        Overloaded (edge queue full and no cloud). Raises after it only when the answer can
        be neither finished by the cloud nor locally.
        """
        started = time.perf_counter()
        trace: dict[str, Any] = {}
        route: RouteInfo | None = None
        ttft_ms: float | None = None
        # An A/B experiment in force picks the request's variant (and its runtime).
        experiments = self.node.experiments
        request, runtime = experiments.assign(request)
        spans = RequestSpans(request)  # the answer's spans; its trace id goes to the event
        if spans.trace_id is not None:
            trace["trace_id"] = spans.trace_id
        items = self._generate(request, started, trace, runtime, spans)
        try:
            with tracing.ending(spans.root):
                async with contextlib.aclosing(items) as answer:
                    async for item in answer:
                        if isinstance(item, RouteInfo):
                            if request.variant is not None:
                                item = dataclasses.replace(item, variant=request.variant)
                            route = item
                            spans.routed(item)
                        elif isinstance(item, Piece):
                            spans.piece(item.text)
                            if ttft_ms is None:
                                ttft_ms = (time.perf_counter() - started) * 1e3
                        elif isinstance(item, Outcome):
                            spans.finished(item)
                            total_ms = (time.perf_counter() - started) * 1e3
                            experiments.record(
                                request,
                                latency_s=total_ms / 1e3,
                                tokens=item.completion_tokens,
                                served_by=None if route is None else route.served_by,
                            )
                            if route is not None and not request.local_only:
                                self.publish_request_event(route, item, ttft_ms, total_ms, trace)
                        yield item
        except Exception:
            experiments.record(request, latency_s=time.perf_counter() - started, error=True)
            raise
        finally:
            spans.close()

    def publish_request_event(
        self,
        route: RouteInfo,
        outcome: Outcome,
        ttft_ms: float | None,
        total_ms: float,
        trace: dict[str, Any],
    ) -> None:
        """Publish a finished request's path and timings as a `request` event (no text).

        Data: served_by, route_reason, model, prompt_tokens, completion_tokens,
        finish_reason, route_ms (arrival until decided), ttft_ms (first text), total_ms, the
        A/B `variant` while an experiment is in force, the OpenTelemetry `trace_id` when the
        request has one; for
        a request routed to the cloud, `hop_ms` (sent on the bus until a worker accepted it),
        the worker's node id (`worker`, from its `Done`) and `completed_locally` when the edge
        finished it after a cloud failure; `samples_in_context` when the user's samples were
        offered (how many the gate kept).
        """
        data: dict[str, Any] = {
            "served_by": route.served_by,
            "route_reason": route.route_reason,
            "model": route.model,
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "finish_reason": outcome.finish_reason,
            "route_ms": round(route.decision_ms, 3),
            "ttft_ms": None if ttft_ms is None else round(ttft_ms, 3),
            "total_ms": round(total_ms, 3),
            **trace,
        }
        if outcome.completed_locally:
            data["completed_locally"] = True
        if route.variant is not None:
            data["variant"] = route.variant
        where = route.served_by
        if trace.get("worker"):
            where = f"{where} ({trace['worker']})"
        message = f"served by {where}: {route.route_reason}, {total_ms:.0f} ms"
        self.node.publish_event("request", message, route.request_id, **data)

    async def _generate(
        self,
        request: EdgeRequest,
        started: float,
        trace: dict[str, Any],
        variant_runtime: EdgeRuntime | None,
        spans: RequestSpans,
    ) -> AsyncGenerator[Item, None]:
        """`generate` itself; `trace` collects the cloud hop's facts for the request event;
        `variant_runtime` serves it locally instead of the node's (an edge A/B variant)."""
        plan = await self._plan(request, trace, variant_runtime or self.node.runtime)
        decision, judged = await self._judge(plan)
        generation = judged.generation
        if generation is not None:
            generation.resume()
        elif decision.target is not Target.CLOUD:
            try:
                generation = self._submit(plan, decision)
            except Overloaded:
                decision = self._when_queue_full(plan.request)
        spans.decided(decision, judged.perplexity)
        if decision.target is Target.CLOUD:
            trace["route_ms"] = round((time.perf_counter() - started) * 1e3, 3)
            answer = self._via_cloud(plan, decision, judged.perplexity, started, trace, spans)
        else:
            assert generation is not None
            answer = self._serve_local(plan, decision, judged, generation, started, trace,
                                       spans)  # fmt: skip
        async with contextlib.aclosing(answer) as items:
            async for item in items:
                yield item

    async def _via_cloud(
        self,
        plan: _Plan,
        decision: Decision,
        perplexity: float | None,
        started: float,
        trace: dict[str, Any],
        spans: RequestSpans,
    ) -> AsyncGenerator[Item, None]:
        """The cloud's answer through the cloud link; the edge's own, by the runtime that
        serves the request, when the cloud does not take it or fails mid-stream."""
        request = plan.request
        cloud = self.cloud.serve(request, decision, started, perplexity, plan.threshold, trace,
                                 spans=spans)  # fmt: skip
        try:
            async with contextlib.aclosing(cloud) as items:
                async for item in items:
                    yield item
            return
        except CloudDown as down:
            logger.info("request %s: cloud unavailable (%s), serving locally",
                        request.request_id, down.why)  # fmt: skip
            decision = self._decide_unavailable(plan)
            generation = self._submit(plan, decision)
            answer = self._serve_local(plan, decision, _Judged(), generation, started, trace,
                                       spans)  # fmt: skip
        except FailedMidStream as failed:
            answer = self._finish_locally(plan, failed, started, spans)
        async with contextlib.aclosing(answer) as items:
            async for item in items:
                yield item

    def _decide_unavailable(self, plan: _Plan) -> Decision:
        """The edge answers a request the cloud did not take: as much as fits its context."""
        facts = dataclasses.replace(plan.facts, route="cloud")
        state = EdgeState(plan.runtime.context_length)
        return decide(facts, state, self.node.routing_policy, cloud_available=False)

    async def _finish_locally(
        self, plan: _Plan, failed: FailedMidStream, started: float, spans: RequestSpans
    ) -> AsyncGenerator[Item, None]:
        """The cloud failed after streaming part of the answer: the edge continues it from
        the prompt and that part, or ends it with an error when it cannot."""
        request, runtime, cause = plan.request, plan.runtime, failed.cause
        context_ids = runtime.encode(request.prompt + failed.streamed)
        left = token_limit(request.options.max_tokens, runtime.max_tokens_cap) - max(
            failed.tokens, 0
        )
        budget = min(left, runtime.context_length - len(context_ids))
        if left < 1:
            yield Outcome("length", len(plan.prompt_ids), failed.tokens)
            return
        why = f"the cloud failed mid-stream ({cause.code.value}: {cause.message}) and"
        if request.grammar is not None:  # the edge's grammar would start over
            raise Unavailable(f"{why} a constrained answer cannot be finished on the edge; "
                              "retry the request")  # fmt: skip
        if budget < 1:
            raise Unavailable(f"{why} the answer so far does not fit the edge context to "
                              "finish it locally")  # fmt: skip
        logger.warning("request %s: cloud failed mid-stream (%s); finishing locally",
                       request.request_id, cause.code.value)  # fmt: skip
        self.node.counters.mid_stream_recoveries += 1
        options = request.options.with_max_tokens(budget)
        # The cloud's part counts as the answer's own for the penalties.
        streamed_ids = max(0, len(context_ids) - len(plan.prompt_ids))
        generation = runtime.submit(context_ids, options, adapter=request.adapter,
                                    answer_tokens=streamed_ids)  # fmt: skip
        await generation.next_event()  # Prefill
        local = stream_local(generation, started, self.node.counters.stats)
        span = spans.generation(self.node.settings.edge_model_name, cloud=False)
        with tracing.ending(span):
            async with contextlib.aclosing(local) as items:
                async for item in items:
                    if isinstance(item, Outcome):
                        tracing.record_outcome(span, item.finish_reason, len(context_ids),
                                               item.completion_tokens)  # fmt: skip
                        item = dataclasses.replace(
                            item,
                            prompt_tokens=len(plan.prompt_ids),
                            completion_tokens=failed.tokens + item.completion_tokens,
                            completed_locally=True,
                            model_version=runtime.version,
                        )
                    yield item

    async def _plan(
        self, request: EdgeRequest, trace: dict[str, Any], runtime: EdgeRuntime
    ) -> _Plan:
        """A request made ready to route: refused when draining or for an unknown model, its
        samples gated, its prompt encoded, the threshold in force for its scored length."""
        node = self.node
        if node.draining:
            # The same answer a draining cloud worker gives: go elsewhere, not "busy, retry".
            raise Unavailable("this edge node is draining", retry_after=5.0)
        cloud_only = self.check_model(request.model)
        # The request's perplexity without the user's samples, when the gate measured it.
        plain_perplexity: float | None = None
        if request.with_samples is not None:
            if request.route != "cloud" and not cloud_only:
                request, plain_perplexity = await gate_samples(
                    runtime, request, trace, node.settings.personalize_sample_gain
                )
            else:
                request = dataclasses.replace(request, with_samples=None)
        prompt_ids, span = encode_with_span(runtime.encode, request.prompt, request.score_span)
        scored_tokens = len(scored_positions(len(prompt_ids), span))
        facts = RequestFacts(
            prompt_tokens=len(prompt_ids),
            max_tokens=request.options.max_tokens,
            route=request.route,  # type: ignore[arg-type]
            local_only=request.local_only,
            cloud_only_model=cloud_only,
            input_field="messages" if request.messages is not None else "prompt",
        )
        policy = node.routing_policy
        chat = request.messages is not None
        threshold = (*node.threshold_for(scored_tokens, chat=chat), scored_tokens)
        if threshold[0] != policy.perplexity_threshold:
            policy = policy.model_copy(update={"perplexity_threshold": threshold[0]})
        # A personalized request's persona/samples prefix, reused by the runtime when kept.
        prefix = prefix_of(runtime, request.prompt, prompt_ids, request.prefix_key,
                         request.prefix_chars)  # fmt: skip
        # The wait is judged once, on arrival: after the prefill the request's own job counts.
        return _Plan(request, runtime, prompt_ids, span, prefix, facts, policy, threshold,
                     runtime.estimate_wait_s(), plain_perplexity)  # fmt: skip

    def _decide(
        self, plan: _Plan, perplexity: float | None = None, *, prefilled: bool = False
    ) -> Decision:
        """The routing rules applied to the plan and the node's state now."""
        available = not plan.request.local_only and self.node.cloud_available()
        state = EdgeState(plan.runtime.context_length, plan.wait_s)
        return decide(plan.facts, state, plan.policy, cloud_available=available,
                      perplexity=perplexity, prefilled=prefilled)  # fmt: skip

    async def _judge(self, plan: _Plan) -> tuple[Decision, _Judged]:
        """Decide on arrival; when that says prefill, decide again on the prompt perplexity,
        then once more on a second-stage draft. A generation kept for the edge is held."""
        decision = self._decide(plan)
        judged = _Judged()
        if decision.target is not Target.PREFILL:
            return decision, judged
        request = plan.request
        try:
            generation = plan.runtime.submit(
                plan.prompt_ids, request.options, hold_after_prefill=True,
                score_span=plan.span, adapter=request.adapter, grammar=request.grammar,
                **plan.prefix,
            )  # fmt: skip
        except Overloaded:
            return self._when_queue_full(request), judged
        try:
            prefill = await generation.next_event()
            assert isinstance(prefill, Prefill)
            judged.perplexity = plan.plain_perplexity or prefill.perplexity
            decision = self._decide(plan, judged.perplexity, prefilled=True)
            if decision.target is Target.EDGE and plan.policy.second_stage_k > 0:
                generation.resume()
                judged.drafted, judged.finished, decision = await self._draft(
                    generation, plan.policy
                )
        except BaseException:
            generation.cancel()
            raise
        if decision.target is Target.CLOUD:
            generation.cancel()
        else:
            judged.generation = generation
        return decision, judged

    def _submit(self, plan: _Plan, decision: Decision) -> Generation:
        """Start the local answer of a request decided for the edge on arrival."""
        request, options = plan.request, plan.request.options
        if decision.max_tokens is not None and decision.max_tokens != options.max_tokens:
            options = options.with_max_tokens(decision.max_tokens)
        return plan.runtime.submit(plan.prompt_ids, options, adapter=request.adapter,
                                   grammar=request.grammar, **plan.prefix)  # fmt: skip

    async def _serve_local(
        self,
        plan: _Plan,
        decision: Decision,
        judged: _Judged,
        generation: Generation,
        started: float,
        trace: dict[str, Any],
        spans: RequestSpans,
    ) -> AsyncGenerator[Item, None]:
        """The edge's answer: its `RouteInfo`, then the generation streamed (the drafted
        tokens first) by the runtime that serves it, the node's or a variant's."""
        node = self.node
        node.record_route(decision)
        yield RouteInfo(
            "edge",
            decision.reason.value,
            plan.request.request_id,
            node.settings.edge_model_name,
            (time.perf_counter() - started) * 1e3,
            judged.perplexity,
            *plan.threshold,
            samples_in_context=trace.get("samples_in_context"),
        )
        # aclosing: a client that hangs up cancels the generation now, not at GC.
        local = stream_local(generation, started, node.counters.stats, judged.drafted,
                             judged.finished, plan.runtime.version)  # fmt: skip
        span = spans.generation(node.settings.edge_model_name, cloud=False)
        with tracing.ending(span):
            async with contextlib.aclosing(local) as items:
                async for item in items:
                    if isinstance(item, Outcome):
                        tracing.record_outcome(span, item.finish_reason, item.prompt_tokens,
                                               item.completion_tokens)  # fmt: skip
                    yield item

    def _when_queue_full(self, request: EdgeRequest) -> Decision:
        """The edge queue is full: the cloud takes it when it may, else the 503 stands."""
        node = self.node
        if request.local_only or request.route == "edge" or not node.cloud_available():
            raise Overloaded(
                f"edge queue full ({node.runtime.max_queue} waiting) and the request cannot "
                "go to the cloud",
                retry_after=max(1.0, node.runtime.estimate_wait_s()),
            )
        return Decision(Target.CLOUD, Reason.EDGE_OVERLOADED, request.options.max_tokens)

    async def _draft(
        self, generation: Generation, policy: PolicySettings
    ) -> tuple[list[Token], Finished | None, Decision]:
        """Second stage: read k tokens (not shown yet) and decide whether to stay."""
        drafted: list[Token] = []
        finished: Finished | None = None
        while len(drafted) < policy.second_stage_k:
            event = await generation.next_event()
            if isinstance(event, Finished):
                finished = event  # a short answer ended inside the draft
                break
            if isinstance(event, Token):
                drafted.append(event)
        decision = decide_after_draft(
            [t.logprob for t in drafted], policy, cloud_available=self.node.cloud_available()
        )
        return drafted, finished, decision
