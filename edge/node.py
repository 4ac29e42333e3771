"""An edge node's request path: route each request, serve it locally or through the cloud.

`EdgeNode.generate` is the one place a request is routed. It yields a `RouteInfo` first
(where the answer comes from and why, known before any text), then `Piece`s of text, then
an `Outcome`. The HTTP layer turns that into OpenAI responses; the benchmark times it.

Cloud failures never hang a request and never truncate it silently: a cloud that does not
accept (no responders, accept timeout, overloaded, bus down) feeds the breaker and the
request is served locally (`cloud_unavailable`); a cloud that fails after streaming part of
the answer feeds the breaker and the edge finishes the answer locally from the text already
streamed (prompt + partial answer as its context); when that does not fit the edge context,
the stream ends with an error event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker import wire
from broker.bus import request_stream
from broker.errors import (
    ErrorCode,
    HybridgenError,
    NoResponders,
    NotFound,
    Overloaded,
    Timeout,
    Unavailable,
)
from broker.telemetry import RequestStats
from edge.routing import (
    CircuitBreaker,
    Decision,
    EdgeState,
    PolicySettings,
    Reason,
    RequestFacts,
    Target,
    ThresholdSource,
    decide,
    decide_after_draft,
    effective_threshold,
    length_threshold,
    with_threshold,
)
from edge.runtime import (
    EdgeRuntime,
    Finished,
    Generation,
    Prefill,
    SamplingOptions,
    Token,
    encode_with_span,
    scored_positions,
)
from edge.settings import EdgeSettings
from models.manifest import routing_calibration

if TYPE_CHECKING:
    from nats.aio.client import Client

logger = logging.getLogger(__name__)

#: Cloud errors that say "the cloud cannot take it now" (they feed the breaker).
CLOUD_DOWN = (NoResponders, Timeout, Overloaded, Unavailable)
#: Cloud errors mid-stream that the edge must not paper over (they end the stream).
_NOT_RECOVERABLE = (ErrorCode.BAD_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED, ErrorCode.CANCELLED)


@dataclass(frozen=True)
class EdgeRequest:
    """One generation request as the router sees it."""

    request_id: str
    #: What the edge model reads: the completion prompt, or the chat rendered with the edge
    #: model's own template.
    prompt: str
    model: str
    options: SamplingOptions
    #: A chat request's messages: the cloud gets these (and applies its own template), not
    #: the edge's rendering of them.
    messages: list[dict[str, Any]] | None = None
    route: str = "auto"
    local_only: bool = False
    user: str | None = None
    #: max_tokens was given by the client (else options.max_tokens is the default).
    max_tokens_given: bool = True
    #: [start, end) characters of `prompt` whose tokens the prompt perplexity scores (a chat
    #: request's last user message content); None: the whole prompt.
    score_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class RouteInfo:
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


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: The cloud failed mid-stream and the edge wrote the rest.
    completed_locally: bool = False


Item = RouteInfo | Piece | Outcome


@dataclass
class NodeCounters:
    """Figures for telemetry and /metrics."""

    stats: RequestStats = field(default_factory=RequestStats)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    cloud_failures: int = 0
    mid_stream_recoveries: int = 0
    errors: int = 0


class EdgeNode:
    """The serving core of an edge node: runtime, policy, breaker and the cloud link.

    The bus link (`edge.link.BusLink`) sets `nc` when connected and updates `policy`; a
    `local_only` request never touches `nc`.

    `policy` is the merged policy as configured (local, fleet, node); `routing_policy` is
    what requests are routed with: the same, with the model set's calibrated perplexity
    threshold (`manifest.json` -> `routing`) filled in when the policy leaves it unset. It is
    recomputed when the policy changes and when the model is swapped.
    """

    def __init__(self, settings: EdgeSettings, runtime: EdgeRuntime, policy: PolicySettings):
        self.settings = settings
        self.runtime = runtime
        self.policy = policy
        self.calibration: dict[str, Any] | None = routing_calibration(runtime.model_dir)
        self.routing_policy = policy
        self.perplexity_threshold = float("inf")
        self.threshold_source: ThresholdSource = "off"
        self._resolve_threshold()
        self.breaker = CircuitBreaker(policy.breaker)
        self.nc: Client | None = None
        self.node_id = settings.node_id or "edge"
        self.counters = NodeCounters()
        self.draining = False
        self._event_sink: Any = None

    # ----------------------------------------------------------------------- state

    @property
    def calibrated_threshold(self) -> float | None:
        """The served model set's calibrated perplexity threshold, if it has one."""
        value = (self.calibration or {}).get("perplexity_threshold")
        return float(value) if value is not None else None

    def threshold_for(self, scored_tokens: int) -> tuple[float, ThresholdSource]:
        """Threshold in force for a prompt of `scored_tokens` scored tokens, and its source.

        The policy's value when set (all lengths); else the model set's length bucket.
        """
        return effective_threshold(self.policy, length_threshold(self.calibration, scored_tokens))

    def _resolve_threshold(self) -> None:
        calibrated = self.calibrated_threshold
        self.perplexity_threshold, self.threshold_source = effective_threshold(
            self.policy, calibrated
        )
        self.routing_policy = with_threshold(self.policy, calibrated)

    def set_policy(self, policy: PolicySettings) -> None:
        """Apply a new policy now (the breaker keeps its state, takes the new thresholds)."""
        self.policy = policy
        self.breaker.settings = policy.breaker
        self._resolve_threshold()
        logger.info(
            "routing policy now %s; perplexity threshold %s (%s)",
            policy.model_dump(),
            self.perplexity_threshold,
            self.threshold_source,
        )

    def swap_runtime(self, runtime: EdgeRuntime) -> EdgeRuntime:
        """Serve new requests from `runtime`; returns the old one (still finishing its own).

        The new model's calibrated threshold applies from now on where the policy sets none.
        """
        calibration = routing_calibration(runtime.model_dir)
        old, self.runtime = self.runtime, runtime
        self.calibration = calibration
        self._resolve_threshold()
        logger.info(
            "model %s: perplexity threshold %s (%s)",
            runtime.version,
            self.perplexity_threshold,
            self.threshold_source,
        )
        return old

    @property
    def bus_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def cloud_available(self) -> bool:
        return not self.settings.no_cloud and self.bus_connected and self.breaker.available()

    def set_event_sink(self, sink: Any) -> None:
        """`sink(kind, message, request_id, **data)` publishes an event (set by the link)."""
        self._event_sink = sink

    def _event(self, kind: str, message: str, request_id: str | None, **data: Any) -> None:
        if self._event_sink is not None:
            self._event_sink(kind, message, request_id, **data)

    # ---------------------------------------------------------------------- serving

    def check_model(self, model: str) -> bool:
        """Whether `model` is served only by the cloud (NotFound for unknown names)."""
        if model == self.settings.edge_model_name:
            return False
        if model == self.settings.cloud_model:
            return True
        raise NotFound(
            f"model {model!r} does not exist here; use {self.settings.edge_model_name!r} "
            f"or {self.settings.cloud_model!r}",
            param="model",
        )

    async def generate(self, request: EdgeRequest) -> AsyncGenerator[Item, None]:
        """Route and serve one request: `RouteInfo`, then `Piece`s, then an `Outcome`.

        Raises (before the RouteInfo): BadRequest, NotFound, ContextLengthExceeded,
        Overloaded (edge queue full and no cloud). Raises after it only when the answer can
        be neither finished by the cloud nor locally.
        """
        started = time.perf_counter()
        if self.draining:
            raise Overloaded("this edge node is draining", retry_after=5.0)
        cloud_only = self.check_model(request.model)
        runtime = self.runtime
        prompt_ids, span = encode_with_span(runtime.encode, request.prompt, request.score_span)
        scored_tokens = len(scored_positions(len(prompt_ids), span))
        facts = RequestFacts(
            prompt_tokens=len(prompt_ids),
            max_tokens=request.options.max_tokens,
            route=request.route,  # type: ignore[arg-type]
            local_only=request.local_only,
            cloud_only_model=cloud_only,
        )
        policy = self.routing_policy
        # (threshold, its source, scored tokens): reported with the route.
        threshold = (*self.threshold_for(scored_tokens), scored_tokens)
        if threshold[0] != policy.perplexity_threshold:
            policy = policy.model_copy(update={"perplexity_threshold": threshold[0]})
        # Judged once, on arrival: after the prefill the request's own job would count.
        wait_s = runtime.estimate_wait_s()

        def route(perplexity: float | None = None, *, cloud: bool | None = None) -> Decision:
            available = (not request.local_only) and (
                self.cloud_available() if cloud is None else cloud
            )
            state = EdgeState(runtime.context_length, wait_s)
            return decide(facts, state, policy, cloud_available=available, perplexity=perplexity)

        decision = route()
        perplexity: float | None = None
        generation = None
        drafted: list[Token] = []
        finished: Finished | None = None
        if decision.target is Target.PREFILL:
            try:
                generation = runtime.submit(
                    prompt_ids, request.options, hold_after_prefill=True, score_span=span
                )
            except Overloaded:
                decision = self._when_queue_full(request)
        if generation is not None:
            try:
                prefill = await generation.next_event()
                assert isinstance(prefill, Prefill)
                perplexity = prefill.perplexity
                decision = route(perplexity)
                if decision.target is Target.EDGE and policy.second_stage_k > 0:
                    generation.resume()
                    drafted, finished, decision = await self._draft(generation, policy)
            except BaseException:
                generation.cancel()
                raise
            if decision.target is Target.CLOUD:
                generation.cancel()
                generation = None

        if decision.target is Target.CLOUD:
            async for item in self._serve_cloud(
                request, prompt_ids, decision, started, perplexity, threshold
            ):
                yield item
            return

        if generation is None:
            options = request.options
            if decision.max_tokens is not None and decision.max_tokens != options.max_tokens:
                options = _with_max_tokens(options, decision.max_tokens)
            try:
                generation = runtime.submit(prompt_ids, options)
            except Overloaded:
                decision = self._when_queue_full(request)
                async for item in self._serve_cloud(
                    request, prompt_ids, decision, started, perplexity, threshold
                ):
                    yield item
                return
            # Decided: answer at once; the Prefill event is skipped in the loop below.
        else:
            generation.resume()
        self._count(decision)
        yield RouteInfo(
            "edge",
            decision.reason.value,
            request.request_id,
            self.settings.edge_model_name,
            (time.perf_counter() - started) * 1e3,
            perplexity,
            *threshold,
        )
        # aclosing: a client that hangs up cancels the generation now, not at GC.
        async with contextlib.aclosing(
            self._drain_generation(generation, started, drafted, finished)
        ) as items:
            async for item in items:
                yield item

    def _when_queue_full(self, request: EdgeRequest) -> Decision:
        """The edge queue is full: the cloud takes it when it may, else the 503 stands."""
        if request.local_only or request.route == "edge" or not self.cloud_available():
            raise Overloaded(
                f"edge queue full ({self.runtime.max_queue} waiting) and the request cannot "
                "go to the cloud",
                retry_after=max(1.0, self.runtime.estimate_wait_s()),
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
            [t.logprob for t in drafted], policy, cloud_available=self.cloud_available()
        )
        return drafted, finished, decision

    async def _serve_cloud(
        self,
        request: EdgeRequest,
        prompt_ids: list[int],
        decision: Decision,
        started: float,
        perplexity: float | None,
        threshold: tuple[float | None, str, int],
    ) -> AsyncIterator[Item]:
        policy = self.routing_policy
        nc = self.nc
        wanted = decision.reason.value
        if nc is None or not self.breaker.allow():
            async for item in self._serve_local_after_cloud(request, started, wanted, "no bus"):
                yield item
            return
        inputs: dict[str, Any] = (
            {"messages": request.messages}
            if request.messages is not None
            else {"prompt": request.prompt}
        )
        bus_request = wire.GenerateRequest(
            request_id=request.request_id,
            model=self.settings.cloud_model,
            # An unset max_tokens lets the cloud use its own default within its own context.
            max_tokens=request.options.max_tokens if request.max_tokens_given else None,
            temperature=request.options.temperature,
            top_p=request.options.top_p,
            top_k=request.options.top_k,
            stop=list(request.options.stop),
            seed=request.options.seed,
            origin=self.node_id,
            **inputs,
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                stream = await stack.enter_async_context(
                    request_stream(
                        nc,
                        bus_request,
                        accept_timeout=policy.cloud_timeout_ms / 1e3,
                        idle_timeout=policy.cloud_idle_timeout_ms / 1e3,
                    )
                )
            except CLOUD_DOWN as exc:
                self.breaker.record_failure()
                self.counters.cloud_failures += 1
                self._event("cloud_error", f"{exc.code.value}: {exc.message}", request.request_id)
                async for item in self._serve_local_after_cloud(
                    request, started, wanted, exc.code.value
                ):
                    yield item
                return
            except BaseException:
                self.breaker.release()
                raise
            self.breaker.record_success()
            self._count(decision)
            details: dict[str, Any] = {"reason": wanted}
            if decision.reason is Reason.LOW_CONFIDENCE:
                details.update(
                    prompt_perplexity=perplexity,
                    perplexity_threshold=threshold[0],
                    threshold_source=threshold[1],
                    scored_tokens=threshold[2],
                )
            self._event("fallback", f"served by the cloud: {wanted}", request.request_id, **details)
            yield RouteInfo(
                "cloud",
                wanted,
                request.request_id,
                self.settings.cloud_model,
                (time.perf_counter() - started) * 1e3,
                perplexity,
                *threshold,
            )
            streamed: list[str] = []
            completion_tokens = 0
            try:
                async for chunk in stream:
                    completion_tokens += len(chunk.token_ids)
                    if chunk.text:
                        streamed.append(chunk.text)
                        yield Piece(chunk.text)
            except HybridgenError as exc:
                if exc.code in _NOT_RECOVERABLE:
                    raise
                self.breaker.record_failure()
                self.counters.cloud_failures += 1
                self._event(
                    "cloud_error",
                    f"cloud failed mid-stream: {exc.code.value}: {exc.message}",
                    request.request_id,
                )
                async for item in self._finish_locally(
                    request, prompt_ids, "".join(streamed), completion_tokens, exc, started
                ):
                    yield item
                return
            done = stream.done
            assert done is not None
            outcome = Outcome(
                done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens
            )
            self.counters.stats.record(time.perf_counter() - started, outcome.completion_tokens)
            yield outcome

    async def _serve_local_after_cloud(
        self, request: EdgeRequest, started: float, wanted: str, why: str
    ) -> AsyncIterator[Item]:
        """The cloud was wanted but cannot take it: serve locally, `cloud_unavailable`."""
        logger.info("request %s: cloud unavailable (%s), serving locally", request.request_id, why)
        runtime = self.runtime
        prompt_ids = runtime.encode(request.prompt)
        facts = RequestFacts(len(prompt_ids), request.options.max_tokens, route="cloud")
        decision = decide(
            facts,
            EdgeState(runtime.context_length),
            self.routing_policy,
            cloud_available=False,
        )
        options = _with_max_tokens(request.options, decision.max_tokens or 1)
        generation = runtime.submit(prompt_ids, options)
        self._count(decision)
        # Decided: answer at once, the prefill runs meanwhile (its event is skipped below).
        yield RouteInfo(
            "edge",
            Reason.CLOUD_UNAVAILABLE.value,
            request.request_id,
            self.settings.edge_model_name,
            (time.perf_counter() - started) * 1e3,
            None,
        )
        async with contextlib.aclosing(self._drain_generation(generation, started)) as items:
            async for item in items:
                yield item

    async def _finish_locally(
        self,
        request: EdgeRequest,
        prompt_ids: list[int],
        streamed: str,
        cloud_tokens: int,
        cause: HybridgenError,
        started: float,
    ) -> AsyncIterator[Item]:
        """The cloud failed after streaming `streamed`: continue it on the edge, or fail."""
        runtime = self.runtime
        context_ids = runtime.encode(request.prompt + streamed)
        left = request.options.max_tokens - max(cloud_tokens, 0)
        room = runtime.context_length - len(context_ids)
        budget = min(left, room)
        if budget < 1 or left < 1:
            if left < 1:
                yield Outcome("length", len(prompt_ids), cloud_tokens)
                return
            raise Unavailable(
                f"the cloud failed mid-stream ({cause.code.value}: {cause.message}) and the "
                "answer so far does not fit the edge context to finish it locally"
            )
        logger.warning(
            "request %s: cloud failed mid-stream (%s); finishing locally",
            request.request_id,
            cause.code.value,
        )
        self.counters.mid_stream_recoveries += 1
        generation = runtime.submit(context_ids, _with_max_tokens(request.options, budget))
        await generation.next_event()  # Prefill
        async with contextlib.aclosing(self._drain_generation(generation, started)) as items:
            async for item in items:
                if isinstance(item, Outcome):
                    item = Outcome(
                        item.finish_reason,
                        len(prompt_ids),
                        cloud_tokens + item.completion_tokens,
                        completed_locally=True,
                    )
                yield item

    async def _drain_generation(
        self,
        generation: Generation,
        started: float,
        drafted: Sequence[Token] = (),
        finished: Finished | None = None,
    ) -> AsyncGenerator[Item, None]:
        """Stream a local generation: tokens already drafted first, then the rest (or the
        `Finished` the draft already reached); the outcome last. Cancels it if abandoned."""
        outcome = None
        try:
            for token in drafted:
                if token.text:
                    yield Piece(token.text)
            while outcome is None:
                event = finished or await generation.next_event()
                if isinstance(event, Token) and event.text:
                    yield Piece(event.text)
                elif isinstance(event, Finished):
                    if event.text:
                        yield Piece(event.text)
                    outcome = Outcome(
                        event.finish_reason, event.prompt_tokens, event.completion_tokens
                    )
        finally:
            if outcome is None:
                generation.cancel()
        self.counters.stats.record(time.perf_counter() - started, outcome.completion_tokens)
        yield outcome

    def _count(self, decision: Decision) -> None:
        self.counters.by_reason[decision.reason.value] += 1
        self.counters.by_target[decision.served_by] += 1


def _with_max_tokens(options: SamplingOptions, max_tokens: int) -> SamplingOptions:
    return dataclasses.replace(options, max_tokens=max_tokens)
