"""The edge node's local OpenAI-compatible API (FastAPI), assembled from the shared HTTP layer.

Every answer says where it was served and why: `served_by` (edge|cloud), `route_reason` and
`request_id` in the JSON body, in the response headers (`X-Hybridgen-Served-By`,
`X-Hybridgen-Route-Reason`, `X-Request-Id`) and in every SSE chunk (the first included).
While an A/B experiment is in force, `variant` (a variant's name, or `control`) comes with
them, and in the header `X-Hybridgen-Variant`.

The model loads in the lifespan, never at import; the bus link starts after it (and never
blocks start-up: without a bus the node serves locally). The routes are module-level
functions; what they use (the `EdgeService`, the metrics, the parsed body) comes from
`app.state` through the dependencies below, so `create_app` only wires them together.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import Counter, Gauge

from broker import wire
from broker.errors import BadRequest, HybridgenError
from broker.service import SOFTWARE_VERSION
from broker.telemetry import default_node_id
from edge.api.personal import (
    last_user_text,
    personalization,
    prefix_fields,
    samples_alternative,
    user_span,
)
from edge.api.users import users_routes
from edge.node import EdgeNode
from edge.personal.personalizer import Personalization
from edge.route.request import EdgeRequest, Item, Outcome, Piece, RouteInfo
from edge.route.rules import merge_policy
from edge.service import EdgeService, Service, load_runtime, resolve_model_dir
from edge.settings import EdgeSettings
from serving import protocol, tracing
from serving.admission import admit, install_limits
from serving.answer import Answer, tagged
from serving.auth import authenticate
from serving.bodies import json_body
from serving.browsers import install_browser_guard
from serving.choices import choice_id, choice_sampling
from serving.deadlines import client_timeout_s
from serving.errors import error_response
from serving.headers import (
    HEADER_REQUEST_ID,
    HEADER_ROUTE_REASON,
    HEADER_SERVED_BY,
    HEADER_VARIANT,
)
from serving.metrics import HttpMetrics, install_common, protect_metrics
from serving.model_names import require_served


class EdgeMetrics:
    """The edge API's Prometheus metrics: the shared HTTP ones and the edge's own.

    Args:
        http: the shared HTTP metrics (`install_common`); the edge's join their registry.
        queue_depth: reads the number of requests waiting for a slot, at scrape time.
        drafts: reads the tokens drafted and accepted (speculative decoding), at scrape time.
    """

    def __init__(
        self,
        http: HttpMetrics,
        queue_depth: Callable[[], float],
        drafts: Callable[[], tuple[int, int]],
    ) -> None:
        self.http = http
        self.routes = Counter(
            "hybridgen_edge_routes",
            "Requests by where they were served and why.",
            ["served_by", "route_reason"],
            registry=http.registry,
        )
        self.queue_depth = Gauge(
            "hybridgen_edge_queue_depth", "Requests waiting for a slot.", registry=http.registry
        )
        self.queue_depth.set_function(queue_depth)
        self.draft_tokens = Gauge(
            "hybridgen_edge_draft_tokens",
            "Tokens drafted for speculative decoding since the model loaded.",
            registry=http.registry,
        )
        self.draft_tokens.set_function(lambda: float(drafts()[0]))
        self.accepted_tokens = Gauge(
            "hybridgen_edge_accepted_draft_tokens",
            "Drafted tokens the model accepted since the model loaded.",
            registry=http.registry,
        )
        self.accepted_tokens.set_function(lambda: float(drafts()[1]))


def get_metrics(request: Request) -> EdgeMetrics:
    """The app's `EdgeMetrics` (made with the app, so there from the first request)."""
    metrics: EdgeMetrics = request.app.state.edge_metrics
    return metrics


Metrics = Annotated[EdgeMetrics, Depends(get_metrics)]
CompletionBody = Annotated[
    protocol.CompletionRequest, Depends(json_body(protocol.CompletionRequest))
]
ChatBody = Annotated[
    protocol.ChatCompletionRequest, Depends(json_body(protocol.ChatCompletionRequest))
]

#: The OpenAI-compatible routes; `create_app` adds them behind the API-key check.
openai_routes = APIRouter()


def create_app(settings: EdgeSettings | None = None) -> FastAPI:
    """The edge API. The model loads when the app starts (lifespan).

    Args:
        settings: the node's settings (from the environment by default); a node id is made
            up when it has none.

    Raises:
        ValueError: the settings break the exposure rule (`EdgeSettings.check_exposure`).
    """
    settings = settings or EdgeSettings()
    settings.check_exposure()
    keys = settings.key_ring()
    if settings.node_id is None:
        settings = settings.model_copy(update={"node_id": default_node_id("edge")})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_dir, version = resolve_model_dir(settings)
        runtime = await asyncio.to_thread(load_runtime, settings, model_dir, version)
        node = EdgeNode(settings, runtime, merge_policy(settings.policy))
        node.node_id = settings.node_id or node.node_id
        service = EdgeService(settings, node)
        app.state.service = service
        service.link.key_limits = limits  # watched live and reported in heartbeats
        await service.link.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="hybridgen edge", version=SOFTWARE_VERSION, lifespan=lifespan)

    async def ready() -> tuple[bool, dict[str, Any]]:
        service: EdgeService | None = getattr(app.state, "service", None)
        if service is None:
            return False, {"reason": "model loading"}
        node = service.node
        detail = {
            "model_version": node.runtime.version,
            "bus": node.bus_connected,
            "breaker": node.breaker.state,
        }
        if node.draining:
            return False, {"reason": "draining", **detail}
        return True, detail

    guarded = (settings.host, settings.advertise_url, settings.allowed_hosts)
    origins = settings.allowed_origins  # the guard sits inside the body limit and the metrics
    install_browser_guard(app, *guarded, origins, setting="HG_EDGE_ALLOWED_ORIGINS")
    http_metrics = install_common(
        app, service="edge", max_body_bytes=settings.max_body_bytes, ready_check=ready
    )
    if settings.metrics_require_key:
        protect_metrics(app, keys.api_keys)
    app.state.edge_metrics = EdgeMetrics(
        http_metrics, lambda: _queue_depth(app), lambda: _drafts(app)
    )
    # Who the caller is, before anything else; the users a key covers are checked per use.
    auth = [Depends(authenticate(keys))]
    app.include_router(openai_routes, dependencies=auth)
    app.include_router(users_routes, dependencies=auth)
    # Key names, limits and usage (`serving.limits`); completions are admitted under them.
    limits = install_limits(app, settings.key_rules(), service="edge", dependencies=auth)
    app.state.node_id = settings.node_id
    # Outermost: each request's server span, continuing the caller's `traceparent`.
    tracing.install_tracing(app, tracing.EDGE, settings.node_id)
    return app


def _queue_depth(app: FastAPI) -> float:
    # Scraped before the lifespan has loaded the model too: nothing waits then.
    if not hasattr(app.state, "service"):
        return 0.0
    return float(app.state.service.node.runtime.queue_depth)


def _drafts(app: FastAPI) -> tuple[int, int]:
    if not hasattr(app.state, "service"):
        return 0, 0
    runtime = app.state.service.node.runtime
    return runtime.draft_tokens, runtime.accepted_tokens


# ---------------------------------------------------------------------------------- routes


@openai_routes.post("/v1/completions", dependencies=[Depends(admit)])
async def completions(
    request: Request, service: Service, req: CompletionBody, metrics: Metrics
) -> Response:
    """OpenAI text completion, routed between the edge and the cloud."""
    prompt = req.prompt_text()
    if not prompt:
        raise BadRequest("prompt must not be empty", param="prompt")
    personal = await personalization(request, service, req.user, prompt)
    edge_prompt, cloud_prompt = personal.prompt(prompt) if personal else (prompt, None)
    samples_prompt = personal.samples_prompt(prompt) if personal else None
    return await serve(
        service,
        metrics,
        req,
        edge_prompt,
        echo=prompt if req.echo else "",
        # Behind a persona prefix, only the caller's own prompt is scored.
        score_span=(len(edge_prompt) - len(prompt), len(edge_prompt)) if personal else None,
        http=request,
        personal=personal,
        cloud_prompt=cloud_prompt,
        samples=None
        if samples_prompt is None
        else (samples_prompt, (len(samples_prompt) - len(prompt), len(samples_prompt))),
    )


@openai_routes.post("/v1/chat/completions", dependencies=[Depends(admit)])
async def chat_completions(
    request: Request, service: Service, req: ChatBody, metrics: Metrics
) -> Response:
    """OpenAI chat completion, routed between the edge and the cloud."""
    messages = req.message_dicts()
    personal = await personalization(request, service, req.user, last_user_text(messages))
    # The edge reads the persona and samples; the cloud gets what the user lets it see.
    edge_messages, cloud_messages = personal.chat(messages) if personal else (messages, messages)
    tools = req.tool_request().shown()
    runtime = service.node.runtime
    prompt = runtime.render_chat(edge_messages, tools)
    samples = None
    if personal is not None and (samples_messages := personal.samples_chat(messages)):
        samples_prompt = runtime.render_chat(samples_messages, tools)
        samples = (samples_prompt, user_span(samples_messages, samples_prompt))
    return await serve(
        service,
        metrics,
        req,
        prompt,
        messages=cloud_messages,
        score_span=user_span(edge_messages, prompt),
        http=request,
        personal=personal,
        samples=samples,
    )


@openai_routes.get("/v1/models")
async def list_models(service: Service) -> dict[str, Any]:
    """The edge model and the cloud model, with where each is served."""
    return {"object": "list", "data": _model_cards(service)}


@openai_routes.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, service: Service) -> dict[str, Any]:
    """One model's card (404 envelope naming `model` for an unknown one)."""
    cards = {card["id"]: card for card in _model_cards(service)}
    require_served(model_id, list(cards))
    return cards[model_id]


def _model_cards(service: EdgeService) -> list[dict[str, Any]]:
    """The cards of the edge model and the cloud model, with where each is served."""
    node = service.node
    settings = service.settings
    edge_card = tagged(
        protocol.ModelCard(id=settings.edge_model_name, owned_by="hybridgen"),
        {
            "served_by": "edge",
            "model_version": node.runtime.version,
            "context_length": node.runtime.context_length,
        },
    )
    cloud_card = tagged(
        protocol.ModelCard(id=settings.cloud_model, owned_by="hybridgen"),
        {"served_by": "cloud", "available": node.cloud_available()},
    )
    return [edge_card, cloud_card]


# --------------------------------------------------------------------------------- serving


async def serve(
    service: EdgeService,
    metrics: EdgeMetrics,
    req: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    prompt: str,
    *,
    messages: list[dict[str, Any]] | None = None,
    echo: str = "",
    score_span: tuple[int, int] | None = None,
    http: Request | None = None,
    personal: Personalization | None = None,
    cloud_prompt: str | None = None,
    samples: tuple[str, tuple[int, int] | None] | None = None,
) -> Response:
    """Route one request through the node and answer it as JSON or as an SSE stream.

    A client that hangs up cancels the generation, streamed or not: on the edge (the
    runtime's job) and, for a request routed to the cloud, on the worker (`hg.cancel.<id>`).

    Args:
        service: the running edge service.
        metrics: where routes, tokens and errors are counted.
        req: the parsed request body.
        prompt: what the edge model reads (a chat rendered with its template).
        messages: a chat request's messages (None for a text completion).
        echo: text the answer starts with (the prompt, for `echo: true`).
        score_span: the characters of `prompt` whose tokens the perplexity scores.
        http: the HTTP request: its `X-Request-Timeout` sets the deadline, and a non-streamed
            answer is cancelled when its client disconnects.
        personal: the user's personalization (`prompt` and `messages` already carry it): its
            sampling defaults, its consent (`local_only`) and its adapter apply.
        cloud_prompt: a personalized completion's prompt for the cloud (None: `prompt`).
        samples: a personalized request's edge prompt with the user's own samples in
            context too, and its `score_span`: the router keeps it when the samples help
            (None: no samples picked).

    Returns:
        The answer, or the error envelope when the request fails before it is routed.
    """
    chat = messages is not None
    # The model may call tools: calls in its text become `tool_calls`.
    shown = req.tool_request().shown() if isinstance(req, protocol.ChatCompletionRequest) else None
    node = service.node
    edge_request = _edge_request(
        service, req, prompt, messages, score_span, http, personal, cloud_prompt, samples, shown
    )
    request_id = edge_request.request_id
    try:
        info, choices = await _route_choices(service, edge_request, req.n)
    except HybridgenError as exc:
        node.counters.errors += 1
        metrics.http.errors.labels(exc.code.value).inc()
        return error_response(exc, headers={HEADER_REQUEST_ID: request_id})
    metrics.routes.labels(info.served_by, info.route_reason).inc()
    answer = Answer(
        chat,
        request_id,
        info.model,
        _tags(info),
        metrics.http,
        echo=echo,
        tools=shown is not None,
        logprobs=edge_request.options.logprobs,
        include_usage=req.include_usage,
        # The edge's model version; a cloud answer's comes with its Outcome.
        model_version=node.runtime.version if info.served_by == "edge" else None,
    )
    headers = {
        HEADER_SERVED_BY: info.served_by,
        HEADER_ROUTE_REASON: info.route_reason,
        HEADER_REQUEST_ID: request_id,
        **({HEADER_VARIANT: info.variant} if info.variant is not None else {}),
    }
    # Closing the items on a hang-up cancels the local jobs or publishes the cloud cancels.
    return await answer.respond(choices, stream=req.stream, headers=headers, http=http)


async def _route_choices(
    service: EdgeService, request: EdgeRequest, n: int
) -> tuple[RouteInfo, list[AsyncGenerator[Piece | Outcome, None]]]:
    """Route the request's first choice, then its `n` - 1 others where the first went (one
    answer is served in one place, unless a choice falls back on its own): each choice's
    items with its `RouteInfo` read, and the first's. Whatever was opened is closed when a
    choice fails before its `RouteInfo`."""
    opened: list[AsyncGenerator[Item, None]] = []
    first: RouteInfo | None = None
    try:
        for index in range(n):
            choice = request
            if first is not None:
                choice = dataclasses.replace(
                    request,
                    request_id=choice_id(request.request_id, index),
                    answer_id=request.request_id,
                    options=choice_sampling(request.options, index),
                    route=first.served_by,
                )
            items = service.router.generate(choice)
            opened.append(items)
            info = await anext(items)
            assert isinstance(info, RouteInfo)
            first = first or info
    except BaseException:
        for items in opened:
            await items.aclose()
        raise
    assert first is not None
    return first, [cast(AsyncGenerator[Piece | Outcome, None], items) for items in opened]


def _edge_request(
    service: EdgeService,
    req: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    prompt: str,
    messages: list[dict[str, Any]] | None,
    score_span: tuple[int, int] | None,
    http: Request | None,
    personal: Personalization | None,
    cloud_prompt: str | None,
    samples: tuple[str, tuple[int, int] | None] | None,
    shown: list[dict[str, Any]] | None,
) -> EdgeRequest:
    """The request as the router takes it (`serve`'s arguments say what each part is)."""
    options = req.sampling()
    if personal is not None:
        options = personal.sampling(options, req.model_fields_set)
    client_s = client_timeout_s(http) if http is not None else None
    return EdgeRequest(
        request_id=wire.new_request_id(),
        prompt=prompt,
        messages=messages,
        model=req.model,
        options=options,
        route=req.route,
        local_only=req.local_only or (personal is not None and personal.local_only),
        user=req.user,
        score_span=score_span,
        timeout_s=client_s,
        cloud_prompt=cloud_prompt,
        adapter=None if personal is None else personal.adapter,
        grammar=req.grammar(),
        tools=shown,
        with_samples=samples_alternative(personal, samples),
        **(prefix_fields(prompt, personal.system_text, personal.prefix_key) if personal else {}),
    )


def _tags(info: RouteInfo) -> dict[str, Any]:
    """A routed answer's tags: where it comes from and why (the user's samples kept and the
    A/B variant too, when there are any)."""
    tags: dict[str, Any] = {
        "served_by": info.served_by,
        "route_reason": info.route_reason,
        "request_id": info.request_id,
    }
    if info.samples_in_context is not None:  # a personalized request with samples offered
        tags["samples_in_context"] = info.samples_in_context
    if info.variant is not None:  # an A/B experiment is in force
        tags["variant"] = info.variant
    return tags
