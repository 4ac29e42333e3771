"""Per-key limits on an HTTP API (`serving.limits` holds the rule): admission of the
completion routes, the `x-ratelimit-*` headers on every answer of a limited key, the ticket
closed once the response is over, and `GET /v1/usage`.

`install_limits` puts them on an app; the completion routes take `admit` as a dependency,
after the API's authentication (`serving.auth.authenticate`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import Forbidden, Unauthorized
from serving.context import MAX_TOKENS_CAP
from serving.limits import CHARS_PER_TOKEN, TICKET, KeyRule, Limits, Ticket
from serving.usage import UsageBook, key_totals


def ticket_of(request: Request | None) -> Ticket | None:
    """The request's ticket, if it was admitted through `admit`."""
    return None if request is None else getattr(request.state, TICKET, None)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A request's prompt tokens as OpenAI estimates them: characters / 4 (a chat's message
    contents, a completion's prompt or prompts)."""
    chars = 0
    prompt = body.get("prompt")
    for text in prompt if isinstance(prompt, list) else [prompt]:
        if isinstance(text, str):
            chars += len(text)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, Mapping):
            content = message.get("content")
            chars += len(content) if isinstance(content, str) else len(json.dumps(content))
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_max_tokens(body: Mapping[str, Any]) -> int:
    """The most tokens a request may generate: `max_completion_tokens` or `max_tokens`
    (else the servers' cap), times `n`."""
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    n = body.get("n")
    limit = asked if isinstance(asked, int) and asked > 0 else MAX_TOKENS_CAP
    return limit * (n if isinstance(n, int) and n > 0 else 1)


async def admit(request: Request) -> None:
    """Route dependency of the completion routes: admit the request under its key's limits
    (after `serving.auth.authenticate`), its ticket into `request.state` (429 past a limit)."""
    limits: Limits | None = getattr(request.app.state, "limits", None)
    if limits is None:
        return
    credential = getattr(request.state, "credential", None)
    entry = getattr(credential, "entry", None)
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = {}  # the route answers the malformed body; it counts as one request
    body = body if isinstance(body, dict) else {}
    ticket = limits.admit(
        None if entry is None else entry.key,
        prompt_tokens=estimate_prompt_tokens(body),
        max_tokens=estimate_max_tokens(body),
    )
    setattr(request.state, TICKET, ticket)


class LimitHeaders:
    """ASGI middleware: the key's `x-ratelimit-*` headers on the response's start (a stream's
    too), and the ticket settled and counted once the response is over, however it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def with_headers(message: Message) -> None:
            ticket = state.get(TICKET)
            if message["type"] == "http.response.start" and ticket is not None:
                headers = [*message.get("headers", []), *ticket.header_items()]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            ticket = state.pop(TICKET, None)
            if ticket is not None:
                ticket.close()


usage_routes = APIRouter()


@usage_routes.get("/v1/usage")
async def read_usage(request: Request) -> dict[str, Any]:
    """This API's usage by key name and model since it started, and the limits in force
    (an admin key only: `KEY@*`)."""
    credential = getattr(request.state, "credential", None)
    entry = getattr(credential, "entry", None)
    if entry is None:
        raise Unauthorized(
            "usage needs an admin key: send `Authorization: Bearer <key>` with a key given "
            "as KEY@* (admin)"
        )
    if entry.users is not None:
        raise Forbidden("usage needs an admin key (one given as KEY@*); this key is not one")
    limits: Limits = request.app.state.limits
    usage = limits.usage.snapshot()
    return {
        "object": "usage",
        "node_id": getattr(request.app.state, "node_id", None),
        "keys": usage,
        "totals": key_totals(usage),
        "limits": limits.in_force(),
    }


def install_limits(
    app: FastAPI, rules: dict[str, KeyRule], *, service: str, dependencies: list[Any]
) -> Limits:
    """Per-key limits and usage on `app`: the `Limits` (`app.state.limits`, its counters in
    the app's metrics registry), the headers middleware and `GET /v1/usage`.

    Args:
        rules: the `key_limits` setting, parsed.
        service: the metrics prefix (`install_common`'s).
        dependencies: the API's authentication (`serving.auth.authenticate`).
    """
    limits = Limits(rules, UsageBook(service, app.state.metrics.registry))
    app.state.limits = limits
    app.add_middleware(LimitHeaders)
    app.include_router(usage_routes, dependencies=dependencies)
    return limits
