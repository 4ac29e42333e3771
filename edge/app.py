"""The edge node's local OpenAI-compatible API (FastAPI), assembled from the shared HTTP layer.

Every answer says where it was served and why: `served_by` (edge|cloud), `route_reason` and
`request_id` in the JSON body, in the response headers (`X-Hybridgen-Served-By`,
`X-Hybridgen-Route-Reason`, `X-Request-Id`) and in every SSE chunk (the first included).

The model loads in the lifespan, never at import; the bus link starts after it (and never
blocks start-up: without a bus the node serves locally).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Gauge

from broker import wire
from broker.errors import BadRequest, HybridgenError, NotFound, Unavailable
from broker.service import SOFTWARE_VERSION
from broker.telemetry import default_node_id
from cloud import protocol
from cloud.http import (
    error_response,
    install_common,
    json_body,
    require_api_key,
    sse_response,
)
from edge.link import BusLink
from edge.node import EdgeNode, EdgeRequest, Item, Outcome, Piece, RouteInfo
from edge.routing import merge_policy
from edge.runtime import EdgeRuntime, SamplingOptions
from edge.settings import EdgeSettings

logger = logging.getLogger(__name__)

HEADER_SERVED_BY = "X-Hybridgen-Served-By"
HEADER_ROUTE_REASON = "X-Hybridgen-Route-Reason"
HEADER_REQUEST_ID = "X-Request-Id"


def resolve_model_dir(settings: EdgeSettings) -> tuple[Path, str | None]:
    """The model folder to serve and its model-set version (None for a bare folder)."""
    if settings.model_dir is not None:
        path = Path(settings.model_dir)
        if not (path / "genai_config.json").is_file():
            raise NotFound(f"{path} is not an onnxruntime-genai model folder (no genai_config)")
        return path, None
    from models.registry import resolve

    model_set = resolve(settings.model_version)
    return model_set.edge_dir(settings.precision), model_set.version


def load_runtime(settings: EdgeSettings, model_dir: Path, version: str | None) -> EdgeRuntime:
    return EdgeRuntime(
        model_dir,
        threads=settings.threads,
        max_active=settings.max_active,
        max_queue=settings.max_queue,
        version=version,
    )


class EdgeService:
    """Everything the routes need: the node, its bus link, and model reloading."""

    def __init__(self, settings: EdgeSettings, node: EdgeNode) -> None:
        self.settings = settings
        self.node = node
        self.link = BusLink(node, reload_model=self.reload_model, software_version=SOFTWARE_VERSION)
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload_model(self, args: dict[str, Any]) -> dict[str, Any]:
        """Load a model next to the current one, then swap; the old one finishes its requests.

        Args:
            args: `{"model_dir": PATH}`, or `{"version": V, "precision": "int4"}` (pulled from
                the object store when not installed here).
        """
        async with self._reload_lock:
            model_dir, version = await self._locate(args)
            started = time.perf_counter()
            runtime = await asyncio.to_thread(load_runtime, self.settings, model_dir, version)
            old = self.node.swap_runtime(runtime)
            task = asyncio.create_task(old.close(drain_timeout=300.0))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            info = {
                "model_dir": str(model_dir),
                "model_version": runtime.version,
                "previous_version": old.version,
                "load_s": round(time.perf_counter() - started, 3),
            }
            logger.info("model swapped: %s", info)
            return info

    async def _locate(self, args: dict[str, Any]) -> tuple[Path, str | None]:
        if args.get("model_dir"):
            path = Path(str(args["model_dir"]))
            if not (path / "genai_config.json").is_file():
                raise NotFound(f"{path} is not an onnxruntime-genai model folder")
            return path, args.get("version")
        version = args.get("version")
        if not isinstance(version, str) or not version:
            raise BadRequest("reload-model needs `version` or `model_dir`", param="version")
        precision = str(args.get("precision", self.settings.precision))
        from models import registry

        try:
            model_set = registry.resolve(version)
        except NotFound:
            model_set = await self._pull(version)
        return model_set.edge_dir(precision), model_set.version

    async def _pull(self, version: str) -> Any:
        """Pull a model set from the object store with the models part's (torch-free) code."""
        if self.link.nc is None:
            raise NotFound(f"model set {version!r} is not installed and the bus is unavailable")
        from models import distribution

        logger.info("pulling model set %s from the object store", version)
        return await distribution.pull(self.link.nc, version)

    async def close(self) -> None:
        await self.link.close()
        for task in list(self._retiring):
            await task
        await self.node.runtime.close()


def _options(req: protocol.CompletionRequest | protocol.ChatCompletionRequest, default: int):
    sampling = req.sampling()
    return SamplingOptions(
        max_tokens=sampling.max_tokens or default,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        stop=tuple(sampling.stop),
        seed=sampling.seed,
    ), sampling.max_tokens is not None


def get_service(request: Request) -> EdgeService:
    """The app's EdgeService (503 while the model is still loading)."""
    service: EdgeService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("the edge model is still loading", retry_after=1.0)
    return service


Service = Annotated[EdgeService, Depends(get_service)]
CompletionBody = Annotated[
    protocol.CompletionRequest, Depends(json_body(protocol.CompletionRequest))
]
ChatBody = Annotated[
    protocol.ChatCompletionRequest, Depends(json_body(protocol.ChatCompletionRequest))
]


def _tagged(model: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """A protocol model's JSON body with the hybridgen fields (served_by, route_reason,
    request_id) added. Added here, not through the builders' `**extra`, because the builders
    take `request_id` as the source of the response id."""
    body: dict[str, Any] = model.body()
    body.update(extra)
    return body


def create_app(settings: EdgeSettings | None = None) -> FastAPI:
    """The edge API. The model loads when the app starts (lifespan)."""
    settings = settings or EdgeSettings()
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

    metrics = install_common(
        app, service="edge", max_body_bytes=settings.max_body_bytes, ready_check=ready
    )
    routes = Counter(
        "hybridgen_edge_routes",
        "Requests by where they were served and why.",
        ["served_by", "route_reason"],
        registry=metrics.registry,
    )
    queue_depth = Gauge(
        "hybridgen_edge_queue_depth", "Requests waiting for a slot.", registry=metrics.registry
    )
    queue_depth.set_function(
        lambda: (
            float(app.state.service.node.runtime.queue_depth)
            if hasattr(app.state, "service")
            else 0.0
        )
    )
    auth = require_api_key(settings.api_keys)

    async def serve(
        service: EdgeService,
        req: protocol.CompletionRequest | protocol.ChatCompletionRequest,
        prompt: str,
        *,
        messages: list[dict[str, Any]] | None = None,
        echo: str = "",
        score_span: tuple[int, int] | None = None,
    ) -> Response:
        chat = messages is not None
        node = service.node
        options, given = _options(req, settings.default_max_tokens)
        request_id = wire.new_request_id()
        edge_request = EdgeRequest(
            request_id=request_id,
            prompt=prompt,
            messages=messages,
            model=req.model,
            options=options,
            route=req.route,
            local_only=req.local_only,
            user=req.user,
            max_tokens_given=given,
            score_span=score_span,
        )
        items = node.generate(edge_request)
        try:
            info = await anext(items)
        except HybridgenError as exc:
            await items.aclose()
            node.counters.errors += 1
            metrics.errors.labels(exc.code.value).inc()
            return error_response(exc, headers={HEADER_REQUEST_ID: request_id})
        except BaseException:
            await items.aclose()
            raise
        assert isinstance(info, RouteInfo)
        routes.labels(info.served_by, info.route_reason).inc()
        extra = {
            "served_by": info.served_by,
            "route_reason": info.route_reason,
            "request_id": request_id,
        }
        headers = {
            HEADER_SERVED_BY: info.served_by,
            HEADER_ROUTE_REASON: info.route_reason,
            HEADER_REQUEST_ID: request_id,
        }
        created = int(time.time())
        if req.stream:
            return await sse_response(
                _stream(items, info, extra, req.include_usage, chat, echo, created), headers=headers
            )
        parts = [echo]
        outcome = None
        try:
            async for item in items:
                if isinstance(item, Piece):
                    parts.append(item.text)
                elif isinstance(item, Outcome):
                    outcome = item
        finally:
            await items.aclose()
        assert outcome is not None
        if outcome.completed_locally:
            extra["completed_by"] = "edge"
        metrics.tokens.labels("prompt").inc(outcome.prompt_tokens)
        metrics.tokens.labels("completion").inc(outcome.completion_tokens)
        build = protocol.chat_response if chat else protocol.completion_response
        body = build(
            request_id=request_id,
            model=info.model,
            text="".join(parts),
            finish_reason=outcome.finish_reason,
            usage=(outcome.prompt_tokens, outcome.completion_tokens),
            created=created,
        )
        return JSONResponse(_tagged(body, extra), headers=headers)

    async def _stream(
        items: AsyncGenerator[Item, None],
        info: RouteInfo,
        extra: dict[str, Any],
        include_usage: bool,
        chat: bool,
        echo: str,
        created: int,
    ) -> AsyncIterator[dict[str, Any]]:
        def chunk(
            text: str | None,
            *,
            first: bool = False,
            finish: str | None = None,
            usage: tuple[int, int] | None = None,
            fields: dict[str, Any] = extra,
        ) -> dict[str, Any]:
            with_choice = usage is None
            model: Any
            if chat:
                model = protocol.chat_chunk(
                    request_id=info.request_id,
                    model=info.model,
                    created=created,
                    content=text,
                    role="assistant" if first else None,
                    finish_reason=finish,
                    usage=usage,
                    with_choice=with_choice,
                )
            else:
                model = protocol.completion_chunk(
                    request_id=info.request_id,
                    model=info.model,
                    created=created,
                    text=text or "",
                    finish_reason=finish,
                    usage=usage,
                    with_choice=with_choice,
                )
            return _tagged(model, fields)

        try:
            yield chunk(echo, first=True)
            async for item in items:
                if isinstance(item, Piece):
                    yield chunk(item.text)
                elif isinstance(item, Outcome):
                    final = dict(extra)
                    if item.completed_locally:
                        final["completed_by"] = "edge"
                    metrics.tokens.labels("prompt").inc(item.prompt_tokens)
                    metrics.tokens.labels("completion").inc(item.completion_tokens)
                    yield chunk("", finish=item.finish_reason, fields=final)
                    if include_usage:
                        usage = (item.prompt_tokens, item.completion_tokens)
                        yield chunk(None, usage=usage, fields=final)
        finally:
            await items.aclose()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(
        service: Service,
        req: CompletionBody,
    ) -> Response:
        prompt = req.prompt_text()
        if not prompt:
            raise BadRequest("prompt must not be empty", param="prompt")
        return await serve(service, req, prompt, echo=prompt if req.echo else "")

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(
        service: Service,
        req: ChatBody,
    ) -> Response:
        messages = req.message_dicts()
        prompt = service.node.runtime.render_chat(messages)
        return await serve(
            service, req, prompt, messages=messages, score_span=_user_span(messages, prompt)
        )

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models(service: Service) -> dict[str, Any]:
        node = service.node
        edge_card = _tagged(
            protocol.ModelCard(id=settings.edge_model_name, owned_by="hybridgen"),
            {
                "served_by": "edge",
                "model_version": node.runtime.version,
                "context_length": node.runtime.context_length,
            },
        )
        cloud_card = _tagged(
            protocol.ModelCard(id=settings.cloud_model, owned_by="hybridgen"),
            {"served_by": "cloud", "available": node.cloud_available()},
        )
        return {"object": "list", "data": [edge_card, cloud_card]}

    return app


def _user_span(messages: list[dict[str, Any]], prompt: str) -> tuple[int, int] | None:
    """Characters of the last user message's content in `prompt` (the rendered chat).

    The router scores only those tokens (not role tags, a default system message or the rest
    of the template); None without a non-empty user message (the whole prompt is scored).
    The template writes the content verbatim, so its last occurrence is the last message's.
    """
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and content:
            start = prompt.rfind(content)
            return (start, start + len(content)) if start >= 0 else None
    return None
