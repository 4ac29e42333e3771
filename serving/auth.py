"""API keys: `Authorization: Bearer <key>` checked in constant time; no keys = open (dev)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Request

from broker.errors import (
    Unauthorized,
)

logger = logging.getLogger(__name__)


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
