"""API keys: `Authorization: Bearer <key>` checked in constant time; no keys = open (dev)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Request

from broker.config import is_loopback
from broker.errors import Unauthorized

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


def check_exposure(
    host: str,
    api_keys: Sequence[str],
    *,
    allow_open: bool,
    metrics_require_key: bool,
    set_key: str,
    allow: str,
) -> None:
    """The rule both APIs start under: no open API (no keys) beyond loopback unless allowed
    explicitly, and no key-protected /metrics without keys.

    Args:
        set_key: how to set a key, for the message (e.g. `--api-key KEY or HG_EDGE_API_KEYS`).
        allow: how to accept the risk, for the message.

    Raises:
        ValueError: the message says how to set a key.
    """
    if not api_keys and not is_loopback(host) and not allow_open:
        raise ValueError(
            f"refusing to serve without an API key on {host} (beyond loopback): set one with "
            f"{set_key} (or {allow} to accept the risk)"
        )
    if metrics_require_key and not api_keys:
        raise ValueError(
            f"metrics_require_key (a key-protected /metrics) needs API keys: set {set_key}"
        )
