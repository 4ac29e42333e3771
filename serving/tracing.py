"""OpenTelemetry traces of every hop: export set up per service, W3C context in and out, and
spans that follow the GenAI semantic conventions.

Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`, or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true` turns it off again). Then each
service (`start`) gets a `TracerProvider` of its own: `service.name` is `hybridgen-edge`,
`hybridgen-cloud-worker` or `hybridgen-cloud-api`, `service.instance.id` its node id. Ended
spans go to the SDK's `BatchSpanProcessor`, whose thread sends them with the standard
OTLP/HTTP exporter: the request path only records them (the `OTEL_BSP_*` and
`OTEL_EXPORTER_OTLP_*` variables apply). Without an endpoint `tracer()` is OTel's no-op
tracer: a span costs a call, and a caller's `traceparent` still travels on, since a no-op
span carries its parent's context.

The context travels as W3C trace context (`traceparent`, `tracestate`; the propagators of
`OTEL_PROPAGATORS`) in HTTP headers (`install_tracing`) and in NATS message headers
(`extract`, `headers_of`: a dict carrier). Spans are started with an explicit parent and
never made current inside a generator that yields (its next step may run in another task).

Spans carry no prompt and no generated text unless the operator opts in with
`HG_TRACE_CONTENT=1` (or OTel's `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`):
then `gen_ai.input.messages` and `gen_ai.output.messages` (`capture_content`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import ErrorCode, HybridgenError
from broker.service import SOFTWARE_VERSION
from serving.headers import HEADER_REQUEST_ID, HEADER_TRACE_ID

__all__ = [
    "CLOUD_API",
    "EDGE",
    "WORKER",
    "Context",
    "Span",
    "SpanKind",
    "capture_content",
    "child_span",
    "current",
    "ending",
    "extract",
    "genai_span",
    "headers_of",
    "input_messages",
    "install_tracing",
    "output_messages",
    "record_error",
    "record_outcome",
    "start",
    "stop",
    "trace_id_of",
    "tracer",
]

log = logging.getLogger(__name__)

EDGE = "hybridgen-edge"
WORKER = "hybridgen-cloud-worker"
CLOUD_API = "hybridgen-cloud-api"

#: The project's own span attributes.
REQUEST_ID = "hybridgen.request_id"
ROUTE_REASON = "hybridgen.route_reason"
SERVED_BY = "hybridgen.served_by"
VARIANT = "hybridgen.variant"
CANCELLED = "hybridgen.cancelled"
#: Seconds a service waits, on its way out, for its last spans to be sent.
FLUSH_BOUND_S = 1.0

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_CONTENT = ("HG_TRACE_CONTENT", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
_NOOP = trace.NoOpTracer()


@dataclass
class _Export:
    """One service's provider, its tracer and how many running parts of it use them."""

    provider: Any
    tracer: Tracer
    users: int = 1


_EXPORTS: dict[str, _Export] = {}


def exporting_configured() -> bool:
    """Whether the environment names an OTLP endpoint (and does not disable the SDK)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in _ENDPOINTS)


def start(service: str, node_id: str | None = None) -> bool:
    """Start exporting `service`'s spans when an endpoint is configured; whether it exports.

    Each `start` that returned True is paired with one `stop`; a second part of the same
    service in one process shares the first one's exporter.
    """
    held = _EXPORTS.get(service)
    if held is not None:
        held.users += 1
        return True
    if not exporting_configured():
        return False
    # Imported only when exporting: the SDK and the exporter cost nothing when tracing is off.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.name": service, "service.version": SOFTWARE_VERSION}
    if node_id:
        attributes["service.instance.id"] = node_id
    # No atexit flush: `stop` flushes within the service's bound, a collector gone or not.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _EXPORTS[service] = _Export(provider, provider.get_tracer("hybridgen", SOFTWARE_VERSION))
    log.info("%s: exporting traces to %s", service, getattr(exporter, "_endpoint", "?"))
    return True


async def stop(service: str, timeout_s: float = FLUSH_BOUND_S) -> None:
    """Send `service`'s spans still waiting and stop its exporter, within `timeout_s`.

    The SDK's shutdown can wait on a collector that does not answer: it runs on a daemon
    thread, waited for `timeout_s` at most; past that, the spans left are dropped.
    """
    held = _EXPORTS.get(service)
    if held is None:
        return
    held.users -= 1
    if held.users > 0:
        return
    del _EXPORTS[service]
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def shut_down() -> None:
        try:
            held.provider.shutdown()
        except Exception:
            log.exception("%s: the trace exporter failed to stop", service)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, finished)

    threading.Thread(target=shut_down, name=f"otel-stop-{service}", daemon=True).start()
    try:
        await asyncio.wait_for(finished, timeout_s)
    except TimeoutError:
        log.warning("%s: traces not all sent within %g s; going on without them",
                    service, timeout_s)  # fmt: skip


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def tracer(service: str) -> Tracer:
    """`service`'s tracer: its exporter's while it exports, else the no-op tracer."""
    held = _EXPORTS.get(service)
    return _NOOP if held is None else held.tracer


# -- context ----------------------------------------------------------------------------------


def current() -> Context:
    """The context in force (at an HTTP API: the request's server span, `install_tracing`)."""
    return otel_context.get_current()


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by `headers` (an HTTP request's or a NATS message's)."""
    return propagate.extract(dict(headers or {}))


def headers_of(span: Span) -> dict[str, str] | None:
    """`span`'s context as headers (`traceparent`, `tracestate`); None when there is none
    (tracing off and no caller's context to pass on)."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier or None


def trace_id_of(span: Span) -> str | None:
    """`span`'s trace id in hex (32 digits), None when it has none."""
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


# -- spans --------------------------------------------------------------------------------------


def genai_span(
    service: str,
    operation: str,
    model: str,
    parent: Context | Span,
    *,
    request_id: str,
    kind: SpanKind = SpanKind.INTERNAL,
    start_time: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A GenAI span (`{operation} {model}`, `gen_ai.operation.name` "chat" or
    "text_completion", `gen_ai.request.model`) with the request id, under `parent`."""
    if isinstance(parent, Span):
        parent = trace.set_span_in_context(parent)
    span = tracer(service).start_span(
        f"{operation} {model}", context=parent, kind=kind, start_time=start_time
    )
    if span.is_recording():
        span.set_attributes(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": "hybridgen",
                "gen_ai.request.model": model,
                REQUEST_ID: request_id,
                **{k: v for k, v in (attributes or {}).items() if v is not None},
            }
        )
    return span


def child_span(
    service: str, name: str, parent: Span, *, start_time: int | None = None, **attributes: Any
) -> Span:
    """A span under `parent` (a step of it: the route decision, the queue wait, ...)."""
    span = tracer(service).start_span(
        name, context=trace.set_span_in_context(parent), start_time=start_time
    )
    if span.is_recording() and attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    return span


def record_outcome(
    span: Span, finish_reason: str, input_tokens: int, output_tokens: int, **attributes: Any
) -> None:
    """An answer's end on its GenAI span: finish reason and token usage."""
    if span.is_recording():
        span.set_attributes(
            {
                "gen_ai.response.finish_reasons": (finish_reason,),
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                **{k: v for k, v in attributes.items() if v is not None},
            }
        )


def record_error(span: Span, exc: BaseException) -> None:
    """`exc` on `span`: a cancel (the caller left) is marked `hybridgen.cancelled`, not an
    error; a coded error (or one raised from it) sets `error.type` to its code."""
    if not span.is_recording():
        return
    if not isinstance(exc, HybridgenError) and isinstance(exc.__cause__, HybridgenError):
        exc = exc.__cause__  # what a fallback was raised from says why
    if isinstance(exc, GeneratorExit | asyncio.CancelledError) or (
        isinstance(exc, HybridgenError) and exc.code is ErrorCode.CANCELLED
    ):
        span.set_attribute(CANCELLED, True)
        return
    if isinstance(exc, HybridgenError):
        span.set_attribute("error.type", exc.code.value)
        span.set_status(Status(StatusCode.ERROR, exc.message))
        return
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


@contextlib.contextmanager
def ending(span: Span) -> Iterator[Span]:
    """End `span` when the block ends, with the exception that ended it (`record_error`).

    Unlike `use_span` it never makes the span current, so it may enclose a `yield`."""
    try:
        yield span
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        span.end()


# -- content (opt-in) ---------------------------------------------------------------------------


def capture_content() -> bool:
    """Whether spans may carry prompts and answers (`HG_TRACE_CONTENT=1`; off by default)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in _CONTENT
    )


def input_messages(
    messages: Sequence[Mapping[str, Any]] | None = None, prompt: str | None = None
) -> str:
    """`gen_ai.input.messages`: a chat's messages, or a completion's prompt as one user
    message (JSON, the semantic conventions' parts)."""
    if messages is None:
        messages = [{"role": "user", "content": prompt or ""}]
    shown = [
        {"role": str(m.get("role", "user")), "parts": [_text_part(m.get("content"))]}
        for m in messages
    ]
    return json.dumps(shown, ensure_ascii=False)


def output_messages(text: str, finish_reason: str) -> str:
    """`gen_ai.output.messages`: the answer as one assistant message (JSON)."""
    answer = {"role": "assistant", "parts": [_text_part(text)], "finish_reason": finish_reason}
    return json.dumps([answer], ensure_ascii=False)


def _text_part(content: Any) -> dict[str, Any]:
    if not isinstance(content, str):  # OpenAI's content parts: their texts joined
        parts = content if isinstance(content, list) else []
        content = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    return {"type": "text", "content": content}


# -- HTTP ---------------------------------------------------------------------------------------


def install_tracing(app: FastAPI, service: str, node_id: str | None = None) -> None:
    """Trace an API: export from its start to its stop, and one server span per `/v1/`
    request that continues the caller's `traceparent` (or starts a trace).

    The span is current while the request is served (the routes' spans are its children);
    it carries the request id (`X-Request-Id` of the answer), and the answer carries its
    trace id (`X-Trace-Id`). Install it last: it is then the outermost layer.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        exporting = start(service, node_id)
        try:
            async with inner(app) as state:
                yield state
        finally:
            if exporting:
                await stop(service)

    app.router.lifespan_context = lifespan
    app.add_middleware(_ServerSpans, service=service)


class _ServerSpans:
    """ASGI middleware: the server span of each `/v1/` request (`install_tracing`)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in (b"traceparent", b"tracestate")
        }
        method = scope["method"]
        span = tracer(self.service).start_span(
            f"{method} {scope['path']}", context=extract(carrier), kind=SpanKind.SERVER
        )
        trace_id = trace_id_of(span)

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                _on_response(span, message)
                if trace_id is not None:
                    headers = message.setdefault("headers", [])
                    headers.append((HEADER_TRACE_ID.lower().encode(), trace_id.encode()))
            await send(message)

        if span.is_recording():
            span.set_attributes({"http.request.method": method, "url.path": scope["path"]})
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            with ending(span):
                await self.app(scope, receive, send_traced)
                route = getattr(scope.get("route"), "path", None)
                if route and span.is_recording():
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
        finally:
            otel_context.detach(token)


def _on_response(span: Span, message: Message) -> None:
    """The answer's status and request id on the server span."""
    if not span.is_recording():
        return
    status = int(message["status"])
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    wanted = HEADER_REQUEST_ID.lower().encode()
    for name, value in message.get("headers", ()):
        if name.lower() == wanted:
            span.set_attribute(REQUEST_ID, value.decode("latin-1"))
