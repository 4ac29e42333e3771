"""What the console's bar says about its bus link: a refused login says so and how to fix it
(`broker.settings.refused_message`), never just "disconnected"."""

from __future__ import annotations

import nats.errors

from broker.errors import Unauthorized
from broker.settings import BusSettings, refused_message

_VIOLATION = "authorization violation"


def refusal_of(exc: BaseException, bus: BusSettings) -> str | None:
    """The bar's text for an error of the bus link when it is a refused login, else None.

    `Unauthorized` comes from the first connect. A reconnect refused (the broker came back
    with other passwords) reaches nats-py's error callback as a plain `Error` carrying the
    server's `'Authorization Violation'`, or as its `AuthorizationError`.
    """
    if isinstance(exc, Unauthorized):
        return exc.message
    if isinstance(exc, nats.errors.AuthorizationError) or _VIOLATION in str(exc).lower():
        return refused_message(bus.url, bus.user)
    return None


def link_text(url: str, *, connected: bool, refused: str | None) -> str:
    """`NATS <url>: connected`; else why not, and that the console keeps trying."""
    if connected:
        return f"NATS {url}: connected"
    return f"{refused or f'NATS {url}: disconnected'} (retrying)"
