"""A personalized request's prompt, as the routes hand it to the router.

The HTTP routes (`edge.api.app`) turn a request with `user` into its `Personalization`
(`personalization`: the user is authorized before anything of theirs is read), then tell the
router which parts of the rendered prompt are what: the characters of the caller's own text
it scores (`user_span`, `last_user_text`), the persona (and samples) prefix the runtime may
reuse from a kept prefill (`prefix_fields`), and the alternative with the user's samples in
context (`samples_alternative`). Kept apart from the app so it stays the wiring and the routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from edge.personal.personalizer import Personalization
from edge.route.request import WithSamples
from edge.service import EdgeService
from serving.auth import authorize_user


async def personalization(
    request: Request, service: EdgeService, user: str | None, text: str
) -> Personalization | None:
    """The personalization of a request with `user` (None: no user, or an unknown one);
    Unauthorized or Forbidden, before anything of the user is read, unless the key covers it."""
    if not user:
        return None
    authorize_user(request, user, param="user")
    # The user's samples take at most a quarter of the edge context.
    budget = min(
        service.settings.personalize_sample_tokens, service.node.runtime.context_length // 4
    )
    return await asyncio.to_thread(service.personalizer.prepare, user, text, budget)


def prefix_fields(prompt: str, text: str | None, key: str | None) -> dict[str, Any]:
    """`prefix_key` and `prefix_chars` of a personalized prompt: up to the end of its
    persona (and samples) `text`, which the runtime may reuse from a kept prefill."""
    if not text or key is None:
        return {}
    start = prompt.find(text)
    if start < 0:
        return {}
    return {"prefix_key": key, "prefix_chars": start + len(text)}


def samples_alternative(
    personal: Personalization | None, samples: tuple[str, tuple[int, int] | None] | None
) -> WithSamples | None:
    """The request's alternative with the user's samples in context (None: none)."""
    if personal is None or samples is None:
        return None
    prompt, span = samples
    return WithSamples(
        prompt=prompt,
        score_span=span,
        count=personal.samples_used,
        **prefix_fields(prompt, personal.samples_text, personal.samples_prefix_key),
    )


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The last user message's content (what the user's samples are matched against)."""
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            return content
    return ""


def user_span(messages: list[dict[str, Any]], prompt: str) -> tuple[int, int] | None:
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
