"""The OpenTelemetry spans of one request on a cloud worker (`serving.tracing`).

The worker's GenAI span (`chat <model>` or `text_completion <model>`, kind SERVER) continues
the caller's trace from the request's NATS headers, and its own context goes back on every
reply. Its children are the three phases of the generation: `hybridgen.queue_wait` (handed
to the engine until the scheduler admitted it), `hybridgen.prefill` (admitted until its
first token) and `hybridgen.decode` (first token until the end). The generation thread only
writes two timestamps (`Timeline`); the spans are made here, with those times, when the
first token arrives: nothing of OTel runs per token.

The cloud API's span of a bus request is `request_span`. Opted in to content, it carries the
prompt and, at its end, the answer: the API keeps the pieces in a list (`answer_text`) and
sets them once (`output_of`), no OTel work per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker import wire
from broker.service import Responder
from serving import tracing


@dataclass
class Timeline:
    """When the scheduler admitted a request and when its prefill ended (`time.time_ns()`,
    0: not yet), written by the generation thread, read after the first token."""

    admitted_ns: int = 0
    prefilled_ns: int = 0


class WorkerSpans:
    """The spans of one request on a worker (see the module docstring).

    Args:
        request: the request.
        responder: its responder: the caller's trace context comes from its request
            headers, the worker's goes on its replies.
        node_id: the worker's node id (`hybridgen.served_by`).
    """

    def __init__(self, request: wire.GenerateRequest, responder: Responder, node_id: str) -> None:
        received_ns = time.time_ns() - int((time.monotonic() - responder.received_at) * 1e9)
        self.span = tracing.genai_span(
            tracing.WORKER,
            "text_completion" if request.messages is None else "chat",
            request.model,
            tracing.extract(responder.request_headers),
            request_id=request.request_id,
            kind=tracing.SpanKind.SERVER,
            start_time=received_ns,
            attributes={
                tracing.SERVED_BY: node_id,
                "hybridgen.origin": request.origin,
                "gen_ai.request.max_tokens": request.max_tokens,
                "gen_ai.request.temperature": request.temperature,
                "gen_ai.request.top_p": request.top_p,
            },
        )
        if self.span.is_recording() and tracing.capture_content():
            self.span.set_attribute("gen_ai.input.messages", _input_of(request))
        responder.reply_headers = tracing.headers_of(self.span)
        self.timeline = Timeline()
        self.submitted_ns = 0
        self.decode: tracing.Span | None = None
        self.ended = False

    @property
    def trace_id(self) -> str | None:
        """The request's trace id (hex), None when it has none."""
        return tracing.trace_id_of(self.span)

    def submitted(self) -> Timeline:
        """The request goes to the engine now: its timeline, for the scheduler to fill."""
        self.submitted_ns = time.time_ns()
        return self.timeline

    def first_token(self) -> None:
        """The first token is out: the queue wait and the prefill as spans, from the
        scheduler's timestamps; the decode span starts."""
        if not self.span.is_recording():
            return
        now = time.time_ns()
        admitted = self.timeline.admitted_ns or now
        prefilled = self.timeline.prefilled_ns or now
        self._phase("hybridgen.queue_wait", self.submitted_ns, admitted)
        self._phase("hybridgen.prefill", admitted, prefilled)
        self.decode = tracing.child_span(
            tracing.WORKER, "hybridgen.decode", self.span, start_time=prefilled
        )

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The answer's end on the worker's span; the decode span ends."""
        tracing.record_outcome(self.span, finish_reason, prompt_tokens, completion_tokens)
        self.close()

    def close(self) -> None:
        """End the phase in progress (the request ended, or failed, or was cancelled)."""
        if self.ended or not self.span.is_recording() or not self.submitted_ns:
            return
        self.ended = True
        if self.decode is not None:
            self.decode.end()
        elif self.timeline.admitted_ns:  # ended during its prefill
            self._phase("hybridgen.queue_wait", self.submitted_ns, self.timeline.admitted_ns)
            self._phase("hybridgen.prefill", self.timeline.admitted_ns, time.time_ns())
        else:  # ended while waiting for admission
            self._phase("hybridgen.queue_wait", self.submitted_ns, time.time_ns())

    def _phase(self, name: str, start_ns: int, end_ns: int) -> None:
        span = tracing.child_span(tracing.WORKER, name, self.span, start_time=start_ns)
        span.end(end_time=max(start_ns, end_ns))


def request_span(request: wire.GenerateRequest) -> tracing.Span:
    """The cloud API's span of one bus request (kind CLIENT), under the HTTP server span; its
    context goes to the worker in the request's NATS headers (`tracing.headers_of`)."""
    span = tracing.genai_span(
        tracing.CLOUD_API,
        "text_completion" if request.messages is None else "chat",
        request.model,
        tracing.current(),
        request_id=request.request_id,
        kind=tracing.SpanKind.CLIENT,
        attributes={
            tracing.SERVED_BY: "cloud",
            "gen_ai.request.max_tokens": request.max_tokens,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p,
        },
    )
    if span.is_recording() and tracing.capture_content():
        span.set_attribute("gen_ai.input.messages", _input_of(request))
    return span


def answer_text(span: tracing.Span) -> list[str] | None:
    """Where the answer's text is kept for `span` (its pieces, joined once at the end), or
    None when spans carry no content: then nothing is kept."""
    return [] if span.is_recording() and tracing.capture_content() else None


def output_of(text: list[str] | None, finish_reason: str) -> dict[str, str]:
    """`gen_ai.output.messages` of the answer kept by `answer_text` (none when not kept)."""
    if text is None:
        return {}
    return {"gen_ai.output.messages": tracing.output_messages("".join(text), finish_reason)}


def _input_of(request: wire.GenerateRequest) -> str:
    """`gen_ai.input.messages` of a bus request (opted in only)."""
    messages = None if request.messages is None else [m.model_dump() for m in request.messages]
    return tracing.input_messages(messages, request.prompt)
