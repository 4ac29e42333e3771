"""The HTTP plumbing shared by the cloud API and the edge API (FastAPI, torch-free).

The edge imports this module; nothing here may import torch or transformers. An API is
assembled like this::

    app = FastAPI(lifespan=lifespan)
    metrics = install_common(app, service="edge", max_body_bytes=1 << 20, ready_check=ready)
    auth = require_api_key(settings.api_keys)           # empty -> open (dev mode)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]):
        ...
        if req.stream:
            return await sse_response(chunks())   # chunks(): async iterator of protocol models
        return JSONResponse(completion_response(..., served_by="edge").body())

What `install_common` gives: error handlers (every `HybridgenError` -> OpenAI's envelope
with `broker.errors.http_status`, `Retry-After` when the error carries one; FastAPI's 422
-> 400 naming the field; unknown routes -> 404 envelope; anything else -> 500 envelope), a
body-size limit that refuses before reading the whole body (413 envelope), Prometheus
metrics in a registry of the app's own, and `/healthz`, `/readyz`, `/metrics`.

SSE: `sse_response` pulls the first item before answering, so a failure before any output
(no worker, overload, timeout) is a plain HTTP error with its status; after that every
stream ends explicitly with `data: [DONE]`, preceded by an error event
(`data: {"error": {...}}`) when it fails mid-way. When the client goes away the source
iterator is closed (`aclose()`), so its `finally`/context managers run (the cloud API
uses that to cancel the generation on the worker).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import (
    BadRequest,
    ErrorCode,
    HybridgenError,
    Internal,
    Unauthorized,
    openai_error_body,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class PayloadTooLarge(BadRequest):
    """A body over the limit: `bad_request` in the envelope, HTTP 413."""

    @property
    def http_status(self) -> int:
        return 413


# ------------------------------------------------------------------------------- errors


def error_response(exc: HybridgenError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error envelope for a hybridgen error, with its HTTP status and Retry-After."""
    all_headers = dict(headers or {})
    if exc.retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.code is ErrorCode.UNAUTHORIZED:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        openai_error_body(exc.code, exc.message, param=exc.param),
        status_code=exc.http_status,
        headers=all_headers,
    )


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic/FastAPI validation error."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # pydantic puts the union branch name in the location (`stop.str`, `stop.list[str]`).
    loc = [p for p in loc if not (p in ("str", "int", "float", "bool") or "[" in p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing":
        return f"missing required field {param!r}", param
    message = first.get("msg", "invalid value")
    if kind == "value_error" and message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return (f"invalid field {param!r}: {message}" if param else message), param


async def _hybridgen_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HybridgenError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_error(exc.errors())
    return error_response(BadRequest(message, param=param))


_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    503: ErrorCode.UNAVAILABLE,
    504: ErrorCode.TIMEOUT,
}


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
    if exc.status_code >= 500 and exc.status_code not in _STATUS_CODES:
        code = ErrorCode.INTERNAL
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    return JSONResponse(
        openai_error_body(code, message),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unhandled(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(Internal(f"internal error ({type(exc).__name__})"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error to OpenAI's envelope (see the module docstring)."""
    app.add_exception_handler(HybridgenError, _hybridgen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unhandled)


# --------------------------------------------------------------------------- body input


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object.

    Raises:
        BadRequest: empty body, invalid UTF-8, malformed JSON, NaN/Infinity, or a body
            that is not a JSON object.
    """
    body = await request.body()
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), "a scalar")
        raise BadRequest(f"request body must be a JSON object, got {kind}")
    return obj


def validate_body(cls: type[M], obj: dict[str, Any]) -> M:
    """Validate a parsed body against a protocol model; BadRequest names the field."""
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        message, param = describe_validation_error(exc.errors(include_url=False))
        raise BadRequest(message, param=param) from None


def json_body(cls: type[M]) -> Callable[[Request], Awaitable[M]]:
    """FastAPI dependency: the body parsed and validated as `cls` (400 envelope otherwise)."""

    async def dependency(request: Request) -> M:
        return validate_body(cls, await read_json_object(request))

    dependency.__name__ = f"json_body_{cls.__name__}"
    return dependency


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` without reading them whole.

    A `Content-Length` over the limit is refused before the app runs; a chunked body is
    counted as it is received and refused (413) as soon as it passes the limit, and the app
    then sees a client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        exc = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        response = error_response(exc, headers={"Connection": "close"})
        await response({"type": "http"}, _empty_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except ClientDisconnect:
            if not refused:
                raise


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------- auth


def require_api_key(keys: Sequence[str] | None) -> Callable[[Request], Awaitable[None]]:
    """FastAPI dependency checking `Authorization: Bearer <key>` in constant time.

    Args:
        keys: accepted keys; empty or None leaves the API open (dev mode).

    Raises:
        Unauthorized: (401 envelope) missing or wrong key.
    """
    accepted = [k.encode() for k in (keys or []) if k]

    async def dependency(request: Request) -> None:
        if not accepted:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        given = token.strip().encode()
        matched = False
        for key in accepted:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthorized("invalid API key")

    return dependency


# ----------------------------------------------------------------------------------- SSE


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One SSE event: `data: {json}\\n\\n` (protocol models drop their None fields)."""
    data = payload.body() if hasattr(payload, "body") else payload
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_none=True)
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_error_event(exc: HybridgenError) -> bytes:
    """The error event sent before `[DONE]` when a stream fails mid-way."""
    return sse_event(openai_error_body(exc.code, exc.message, param=exc.param))


async def sse_stream(
    first: Any, rest: AsyncIterator[Any], *, has_first: bool = True
) -> AsyncIterator[bytes]:
    """Encode `first` then `rest` as SSE; always end with `[DONE]` (error event before it).

    Closing this generator (client gone) closes `rest` so its cleanup runs.
    """
    try:
        if has_first:
            yield sse_event(first)
        async for item in rest:
            yield sse_event(item)
    except HybridgenError as exc:
        logger.info("stream failed mid-way: %r", exc)
        yield sse_error_event(exc)
    except Exception as exc:
        logger.exception("stream failed mid-way")
        yield sse_error_event(Internal(f"stream failed ({type(exc).__name__})"))
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
    yield SSE_DONE


async def sse_response(
    source: AsyncIterator[Any], *, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """Start an SSE answer from an async iterator of protocol models (or dicts).

    The first item is awaited here, so a failure before any output raises (and becomes a
    normal HTTP error response); later failures become an error event, then `[DONE]`.
    """
    try:
        first = await anext(source)
        has_first = True
    except StopAsyncIteration:
        first, has_first = None, False
    except BaseException:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    return StreamingResponse(
        sse_stream(first, source, has_first=has_first),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **(headers or {})},
    )


# ------------------------------------------------------------------ health and metrics


class HttpMetrics:
    """Prometheus metrics of one HTTP API, in a registry of its own.

    Attributes other parts may use: `registry` (add your own collectors), `requests`,
    `latency`, `in_flight`, `tokens` (label `kind`: prompt|completion), `errors` (label
    `code`).
    """

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        prefix = f"hybridgen_{service}"
        self.requests = Counter(
            f"{prefix}_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_http_request_seconds",
            "Time to the end of the response (streams included).",
            ["route"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_http_in_flight", "Requests being served.", registry=self.registry
        )
        self.tokens = Counter(
            f"{prefix}_tokens", "Tokens processed.", ["kind"], registry=self.registry
        )
        self.errors = Counter(
            f"{prefix}_errors", "Errors answered, by code.", ["code"], registry=self.registry
        )

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def install_health_routes(app: FastAPI, metrics: HttpMetrics, ready_check: ReadyCheck) -> None:
    """`GET /healthz` (process alive), `/readyz` (503 envelope unless ready), `/metrics`."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            ready, detail = await ready_check()
        except Exception as exc:  # a failing probe means not ready, never a 500
            ready, detail = False, {"reason": f"{type(exc).__name__}: {exc}"}
        if ready:
            return JSONResponse({"status": "ready", **detail})
        reason = str(detail.get("reason", "not ready"))
        body = openai_error_body(ErrorCode.UNAVAILABLE, reason)
        body["status"] = "not_ready"
        body.update({k: v for k, v in detail.items() if k != "reason"})
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return metrics.render()


def install_common(
    app: FastAPI,
    *,
    service: str,
    max_body_bytes: int,
    ready_check: ReadyCheck,
    registry: CollectorRegistry | None = None,
) -> HttpMetrics:
    """Error handlers, body-size limit, metrics and health routes on `app`.

    Args:
        service: metric name prefix (`hybridgen_<service>_...`), e.g. "cloud_api", "edge".
        max_body_bytes: largest accepted request body.
        ready_check: async callable returning `(ready, detail)`; `detail["reason"]` is shown
            when not ready.
        registry: Prometheus registry to use (a fresh one by default).

    Returns:
        The app's `HttpMetrics` (also stored as `app.state.metrics`).
    """
    metrics = HttpMetrics(service, registry)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    install_health_routes(app, metrics, ready_check)
    app.state.metrics = metrics
    return metrics
