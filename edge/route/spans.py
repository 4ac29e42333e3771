"""The OpenTelemetry spans of one routed request at the edge (`serving.tracing`).

Under the HTTP server span, `Router.generate` opens one GenAI span for the answer
(`chat <model>` or `text_completion <model>`: where it was served, why, the A/B variant,
usage and finish reason). Its children:

* `hybridgen.route`: the routing decision, from arrival until decided (the prefill that
  measures the prompt perplexity included);
* the local generation (`... <edge model>`, `hybridgen.served_by` edge), or the bus request
  (`... <cloud model>`, kind CLIENT), whose context travels to the worker in the NATS
  headers; after a fallback both, the failed bus request first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving import tracing
from serving.answer import Outcome

if TYPE_CHECKING:
    from edge.route.request import EdgeRequest, RouteInfo
    from edge.route.rules import Decision


class RequestSpans:
    """The spans of one routed request (see the module docstring).

    Args:
        request: the request; its span is a child of the context in force (the server span).
    """

    def __init__(self, request: EdgeRequest) -> None:
        self.request = request
        self.operation = "text_completion" if request.messages is None else "chat"
        options = request.options
        self.root = tracing.genai_span(
            tracing.EDGE,
            self.operation,
            request.model,
            tracing.current(),
            request_id=request.request_id,
            attributes={
                "gen_ai.request.max_tokens": options.max_tokens,
                "gen_ai.request.temperature": options.temperature,
                "gen_ai.request.top_p": options.top_p,
                tracing.VARIANT: request.variant,
            },
        )
        self.route = tracing.child_span(tracing.EDGE, "hybridgen.route", self.root)
        #: The answer's text, kept only when spans may carry it (`tracing.capture_content`).
        self.text: list[str] | None = None
        if self.root.is_recording() and tracing.capture_content():
            self.text = []
            prompt = request.cloud_prompt or request.prompt
            self.root.set_attribute(
                "gen_ai.input.messages", tracing.input_messages(request.messages, prompt)
            )

    @property
    def trace_id(self) -> str | None:
        """The request's trace id (hex), None when it has none (tracing off, no caller's)."""
        return tracing.trace_id_of(self.root)

    def decided(self, decision: Decision, perplexity: float | None) -> None:
        """The routing decision: it ends the `hybridgen.route` span."""
        if self.route.is_recording():
            self.route.set_attributes(
                {
                    tracing.ROUTE_REASON: decision.reason.value,
                    "hybridgen.route_target": decision.target.value,
                    **({} if perplexity is None else {"hybridgen.prompt_perplexity": perplexity}),
                }
            )
        self.route.end()

    def generation(self, model: str, *, cloud: bool) -> tracing.Span:
        """The span of the local generation, or of the bus request (`cloud`), by `model`."""
        return tracing.genai_span(
            tracing.EDGE,
            self.operation,
            model,
            self.root,
            request_id=self.request.request_id,
            kind=tracing.SpanKind.CLIENT if cloud else tracing.SpanKind.INTERNAL,
            attributes={tracing.SERVED_BY: "cloud" if cloud else "edge"},
        )

    def routed(self, info: RouteInfo) -> None:
        """Where the answer is served and why (its first item)."""
        if self.root.is_recording():
            self.root.set_attributes(
                {
                    tracing.SERVED_BY: info.served_by,
                    tracing.ROUTE_REASON: info.route_reason,
                    **({} if info.variant is None else {tracing.VARIANT: info.variant}),
                }
            )

    def piece(self, text: str) -> None:
        """A piece of the answer (kept only when spans carry content)."""
        if self.text is not None:
            self.text.append(text)

    def finished(self, outcome: Outcome) -> None:
        """The answer's end: finish reason, usage, and (opted in) the answer's text."""
        extra: dict[str, Any] = {}
        if outcome.completed_locally:
            extra["hybridgen.completed_locally"] = True
        if self.text is not None:
            extra["gen_ai.output.messages"] = tracing.output_messages(
                "".join(self.text), outcome.finish_reason
            )
        tracing.record_outcome(
            self.root,
            outcome.finish_reason,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            **extra,
        )

    def close(self) -> None:
        """End the route span if the request failed before it was decided."""
        if self.route.is_recording():
            self.route.end()
