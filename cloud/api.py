"""The cloud API: OpenAI-compatible HTTP in front of the cloud workers (no model in-process).

`POST /v1/completions` and `POST /v1/chat/completions` validate the request and forward a
`GenerateRequest` to `hg.gen.<model>` with `broker.streaming.request_stream`; whichever worker of
the queue group admits it answers. A chat travels as its messages: the worker applies its own
model's chat template and is the one judge of the context window (it answers
`context_length_exceeded`, which becomes a 400 here), so the API needs no model files.

A client that goes away cancels the generation on the worker (leaving the stream's context
publishes `hg.cancel.<request_id>`). `/readyz` is ready only while some worker answers
nats.micro discovery for a served model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import nats.errors
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client

from broker import subjects, wire
from broker.errors import (
    BadRequest,
    HybridgenError,
    Unavailable,
)
from broker.permissions import WORKER_SERVICE  # the `$SRV.INFO.<name>` of the workers
from broker.streaming import ReplyStream, request_stream
from broker.telemetry import RequestStats, Telemetry, default_node_id
from cloud.settings import ApiSettings
from cloud.spans import answer_text, output_of, request_span
from serving import tracing
from serving.admission import admit, install_limits
from serving.answer import Answer, Outcome, Piece
from serving.auth import authenticate
from serving.bodies import json_body
from serving.browsers import install_browser_guard
from serving.choices import choice_id, choice_sampling
from serving.deadlines import budget_s, client_timeout_s
from serving.headers import HEADER_REQUEST_ID
from serving.limits import Limits
from serving.metrics import HttpMetrics, install_common, protect_metrics
from serving.model_names import require_served
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    chunk_logprobs,
    model_list,
)

logger = logging.getLogger(__name__)


@dataclass
class ApiState:
    """What the routes need, built in the lifespan."""

    settings: ApiSettings
    nc: Client
    metrics: HttpMetrics
    limits: Limits
    node_id: str = ""
    stats: RequestStats = field(default_factory=RequestStats)
    in_flight: int = 0
    _ready_cache: tuple[float, bool, dict[str, Any]] = field(default=(0.0, False, {}))


def check_settings(settings: ApiSettings) -> None:
    """Refuse an open API (no keys) beyond loopback unless explicitly allowed, a
    key-protected /metrics without keys, and an allowed origin that is not one
    (`HttpSettings.check_exposure`)."""
    settings.check_exposure()


async def _probe_workers(nc: Client, wanted: set[str], wait_s: float) -> dict[str, Any] | None:
    """Ask every worker for `$SRV.INFO`; the first that serves a wanted subject, or None."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subjects.discovery_info(WORKER_SERVICE), b"", reply=inbox)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except (nats.errors.TimeoutError, TimeoutError):
                return None
            if msg.headers and msg.headers.get("Status") == "503":
                return None  # no responders at all
            info = _worker_info(msg.data, wanted)
            if info is not None:
                return info
        return None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _worker_info(data: bytes, wanted: set[str]) -> dict[str, Any] | None:
    """A `$SRV.INFO` reply if it is a cloud worker's serving a wanted subject, else None:
    the service is `WORKER_SERVICE` and names its node and model (as `GenerationService`
    does); anything else (not JSON, another service) is not a worker."""
    try:
        info = json.loads(data)
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("name") != WORKER_SERVICE:
        return None
    metadata, endpoints = info.get("metadata"), info.get("endpoints")
    if not isinstance(metadata, dict) or not metadata.get("node_id") or not metadata.get("model"):
        return None
    if not isinstance(endpoints, list):
        return None
    served = {e.get("subject") for e in endpoints if isinstance(e, dict)}
    return info if served & wanted else None


async def _ready(state: ApiState) -> tuple[bool, dict[str, Any]]:
    """Ready when some worker's `$SRV.INFO` lists a served model's subject (cached 1 s)."""
    checked_at, ready, detail = state._ready_cache
    if time.monotonic() - checked_at < 1.0:
        return ready, detail
    wanted = {subjects.gen(m) for m in state.settings.models}
    try:
        info = await _probe_workers(state.nc, wanted, wait_s=0.5)
        if info is not None:
            ready, detail = True, {"worker": info.get("metadata", {}).get("node_id")}
        else:
            ready, detail = False, {"reason": "no worker serves " + ", ".join(sorted(wanted))}
    except Exception as exc:
        ready, detail = False, {"reason": f"bus error: {type(exc).__name__}: {exc}"}
    state._ready_cache = (time.monotonic(), ready, detail)
    return ready, detail


def _heartbeat(state: ApiState) -> wire.Heartbeat:
    """The API's heartbeat on `hg.telemetry.api.<node_id>` (readiness as of the last probe)."""
    from broker.service import SOFTWARE_VERSION

    snapshot = state.stats.snapshot()
    ready = state._ready_cache[1]
    return wire.Heartbeat(
        role="api",
        node_id=state.node_id,
        version=SOFTWARE_VERSION,
        status="ready" if ready else "degraded",
        model=",".join(state.settings.models),
        in_flight=state.in_flight,
        rps=snapshot["rps"],
        latency_p50_ms=snapshot["latency_p50_ms"],
        latency_p95_ms=snapshot["latency_p95_ms"],
        tokens_per_s=snapshot["tokens_per_s"],
        errors=snapshot["errors"],
        # Usage by key name and model since start: the console sums the instances.
        extra={"port": state.settings.port, "usage": state.limits.usage.snapshot()},
    )


def get_state(request: Request) -> ApiState:
    """FastAPI dependency: the API's state (503 while starting)."""
    state: ApiState | None = getattr(request.app.state, "api", None)
    if state is None:
        raise Unavailable("the API is starting", retry_after=1)
    return state


StateDep = Annotated[ApiState, Depends(get_state)]


def create_app(
    settings: ApiSettings | None = None,
    *,
    nc: Client | None = None,
    nats_url: str | None = None,
) -> FastAPI:
    """Build the cloud API.

    Args:
        settings: API settings (from the environment by default).
        nc: a connected NATS client to use (not closed by the app); otherwise the lifespan
            connects to `nats_url` (or `HG_NATS_URL`).
    """
    settings = settings or ApiSettings()
    check_settings(settings)
    holder: dict[str, ApiState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from broker.bus import close_bounded, connect_settings
        from broker.settings import BusSettings

        own = nc is None
        client = nc
        if client is None:
            # Credentials and TLS from HG_NATS_* (a URL given here only replaces the URL).
            bus = BusSettings(url=nats_url) if nats_url else BusSettings()
            client = await connect_settings(bus, name="hybridgen-cloud-api")
        node_id = settings.node_id or default_node_id("api")
        state = ApiState(settings, client, app.state.metrics, limits, node_id)
        holder["state"] = app.state.api = state
        app.state.node_id = node_id
        telemetry = Telemetry(
            client, role="api", node_id=state.node_id, build_heartbeat=lambda: _heartbeat(state)
        )
        await telemetry.start()
        # Key limits change live with the fleet config's `limits` key.
        watch = asyncio.create_task(limits.watch(client), name="hg-api-limits")
        try:
            yield
        finally:
            watch.cancel()
            await asyncio.wait([watch], timeout=1.0)
            await telemetry.close()
            holder.clear()
            app.state.api = None
            if own:  # within 1 s, broker or not (a drain waits up to 40 s on a frozen one)
                await close_bounded(client, 1.0)

    app = FastAPI(title="hybridgen cloud API", version="1", lifespan=lifespan)

    async def ready_check() -> tuple[bool, dict[str, Any]]:
        state = holder.get("state")
        if state is None:
            return False, {"reason": "starting"}
        return await _ready(state)

    install_browser_guard(  # inside the body limit and the metrics: added first
        app,
        host=settings.host,
        advertise_url=None,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        setting="HG_CLOUD_ALLOWED_ORIGINS",
    )
    install_common(
        app, service="cloud_api", max_body_bytes=settings.max_body_bytes, ready_check=ready_check
    )
    keys = settings.key_ring()
    if settings.metrics_require_key:
        protect_metrics(app, keys.api_keys)

    auth = [Depends(authenticate(keys))]
    # Key names, limits and usage (`serving.limits`); completions are admitted under them.
    limits = install_limits(app, settings.key_rules(), service="cloud_api", dependencies=auth)
    limited = [*auth, Depends(admit)]

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> JSONResponse:
        return JSONResponse(model_list(settings.models).body())

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> JSONResponse:
        require_served(model_id, settings.models)
        return JSONResponse(ModelCard(id=model_id).body())

    @app.post("/v1/completions", dependencies=limited)
    async def completions(
        request: Request,
        body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
        state: StateDep,
    ) -> Any:
        return await _serve(request, state, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=limited)
    async def chat_completions(
        request: Request,
        body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
        state: StateDep,
    ) -> Any:
        return await _serve(request, state, body, chat=True)

    # Outermost: each request's server span, continuing the caller's `traceparent`.
    tracing.install_tracing(app, tracing.CLOUD_API, settings.node_id)
    return app


def _generate_request(
    state: ApiState,
    body: CompletionRequest | ChatCompletionRequest,
    *,
    timeout_s: float | None = None,
    request_id: str | None = None,
    index: int = 0,
) -> wire.GenerateRequest:
    """Check the model name and build the bus request (a chat as its messages) of choice
    `index` (`serving.choices`: its own id and seed) of the request `request_id` (default: a
    new one).

    `timeout_s` is what is left of the request's deadline (default: the whole
    `request_timeout_s`); it travels as `timeout_ms`.
    """
    require_served(body.model, state.settings.models)
    sampling = choice_sampling(body.sampling(), index)
    if isinstance(body, ChatCompletionRequest):
        inputs: dict[str, Any] = {
            "messages": body.message_dicts(),
            "tools": body.tool_request().shown(),
        }
    else:
        prompt = body.prompt_text()
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        inputs = {"prompt": prompt}
    return wire.GenerateRequest(
        request_id=choice_id(request_id or wire.new_request_id(), index),
        model=body.model,
        **sampling.to_wire(),
        timeout_ms=max(1, int(1000 * (timeout_s or state.settings.request_timeout_s))),
        origin="cloud-api",
        grammar=None if (grammar := body.grammar()) is None else grammar.to_wire(),
        **inputs,
    )


async def _serve(
    request: Request,
    state: ApiState,
    body: CompletionRequest | ChatCompletionRequest,
    *,
    chat: bool,
) -> Any:
    settings = state.settings
    arrived = time.monotonic()

    def left_s() -> float:
        return deadline_s - (time.monotonic() - arrived)

    try:
        # The client's own deadline (X-Request-Timeout), capped by ours; counted from arrival.
        deadline_s = budget_s(client_timeout_s(request), settings.request_timeout_s)
        generate = _generate_request(state, body, timeout_s=left_s())
    except HybridgenError as exc:
        state.metrics.errors.labels(exc.code.value).inc()
        raise
    request_id = generate.request_id
    # A completion's `echo`: the prompt starts the answer.
    echo = body.prompt_text() if isinstance(body, CompletionRequest) and body.echo else ""
    answer = Answer(
        chat,
        request_id,
        body.model,
        {"served_by": "cloud", "request_id": request_id},
        state.metrics,
        echo=echo,
        # The model may call tools: calls in its text become `tool_calls`.
        tools=isinstance(body, ChatCompletionRequest) and body.tool_request().active,
        logprobs=bool(generate.logprobs),
        include_usage=body.include_usage,
    )
    kind = "stream" if body.stream else "whole"
    logger.info("request %s -> %s (%s, n=%d)", request_id, body.model, kind, body.n)
    choices: list[_Replies] = []
    try:
        for index in range(body.n):  # one bus request per choice, each its own sequence
            choice = generate
            if index:
                choice = _generate_request(state, body, timeout_s=left_s(),
                                           request_id=request_id, index=index)  # fmt: skip
            choices.append(await _open(state, choice, max(0.001, left_s())))
    except BaseException:
        for replies in choices:
            await replies.aclose()
        raise
    headers = {HEADER_REQUEST_ID: request_id}
    return await answer.respond(choices, stream=body.stream, headers=headers, http=request)


async def _open(state: ApiState, generate: wire.GenerateRequest, total_s: float) -> _Replies:
    """Send one bus request; its replies once a worker accepted it (`total_s`: what is left
    of the deadline)."""
    settings = state.settings
    started = time.monotonic()
    state.in_flight += 1
    stack = contextlib.AsyncExitStack()
    span = request_span(generate)  # its context goes to the worker in the NATS headers
    stack.callback(span.end)
    try:
        replies = await stack.enter_async_context(
            request_stream(
                state.nc,
                generate,
                accept_timeout=settings.accept_timeout_s,
                idle_timeout=settings.idle_timeout_s,
                total_timeout=total_s,
                headers=tracing.headers_of(span),
            )
        )
    except BaseException as exc:
        state.in_flight -= 1
        tracing.record_error(span, exc)
        await stack.aclose()
        if isinstance(exc, HybridgenError):
            state.metrics.errors.labels(exc.code.value).inc()
            state.stats.record(time.monotonic() - started, error=True)
        raise
    return _Replies(state, replies, stack, started, span)


class _Replies:
    """A worker's replies as the answer's items. Closing them, whether they were read, read
    in part or never (a client gone before the first token), closes the reply stream (a
    request cut short is cancelled on the worker) and counts the request, once."""

    def __init__(
        self,
        state: ApiState,
        replies: ReplyStream,
        stack: contextlib.AsyncExitStack,
        started: float,
        span: tracing.Span,
    ) -> None:
        self.state, self.replies, self.stack, self.started = state, replies, stack, started
        self.span = span  # the bus request's, ended with the stack
        #: The answer's text, kept only when spans may carry it (`tracing.capture_content`).
        self.text: list[str] | None = answer_text(span)
        self.done: wire.Done | None = None
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Piece | Outcome]:
        return self._items()

    async def _items(self) -> AsyncGenerator[Piece | Outcome, None]:
        try:
            tokens = 0  # a chunk held back (no text yet) passes its tokens on
            async for chunk in self.replies:
                tokens += len(chunk.token_ids)
                scores = chunk_logprobs(chunk)
                if chunk.text or scores:
                    if self.text is not None:
                        self.text.append(chunk.text)
                    yield Piece(chunk.text, scores, tokens)
                    tokens = 0
            done = self.done = self.replies.done
            assert done is not None
            usage = done.usage
            tracing.record_outcome(
                self.span,
                done.finish_reason,
                usage.prompt_tokens,
                usage.completion_tokens,
                **{"hybridgen.worker": done.served_by},
                **output_of(self.text, done.finish_reason),  # opted in: the answer's text
            )
            yield Outcome(done.finish_reason, usage.prompt_tokens, usage.completion_tokens,
                          model_version=done.model_version, worker=done.served_by,
                          draft_tokens=usage.draft_tokens,
                          accepted_tokens=usage.accepted_tokens)  # fmt: skip
        except BaseException as exc:
            tracing.record_error(self.span, exc)
            if isinstance(exc, HybridgenError):
                self.state.metrics.errors.labels(exc.code.value).inc()
            raise
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the reply stream and count the request (idempotent)."""
        if self.closed:
            return
        self.closed = True
        state, done = self.state, self.done
        state.in_flight -= 1
        tokens = done.usage.completion_tokens if done is not None else 0
        state.stats.record(time.monotonic() - self.started, tokens, error=done is None)
        await self.stack.aclose()
