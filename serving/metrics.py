"""Prometheus metrics, health routes, and `install_common`, which assembles an API's shared
plumbing: error handlers, the body-size limit, metrics and `/healthz`, `/readyz`, `/metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import ErrorCode
from serving.auth import require_api_key
from serving.bodies import BodySizeLimit
from serving.errors import install_error_handlers, openai_error_body

logger = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


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
    async def metrics_route(request: Request) -> Response:
        guard = getattr(request.app.state, "metrics_auth", None)
        if guard is not None:
            await guard(request)  # 401 envelope without the right key
        return metrics.render()


def protect_metrics(app: FastAPI, keys: Sequence[str]) -> None:
    """Require `Authorization: Bearer <key>` (one of `keys`, constant-time) on `/metrics`.

    By default `/metrics` is open like `/healthz`: fine on loopback, but a scrape reveals
    traffic figures; call this (the APIs' `metrics_require_key` setting) beyond it.

    Raises:
        ValueError: no keys (nothing could ever scrape it).
    """
    if not [key for key in keys if key]:
        raise ValueError("protecting /metrics needs at least one API key")
    app.state.metrics_auth = require_api_key(keys)


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
