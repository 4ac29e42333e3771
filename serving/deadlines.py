"""Request deadlines and client hang-ups, shared by the edge API and the cloud API.

A client may set its own deadline with the `X-Request-Timeout` header (seconds, as the
`timeout` of the OpenAI clients, which they do not send themselves): the service uses it,
capped by its own budget, and sends what is left of it on the bus as `timeout_ms`.

`until_disconnect` awaits some work and cancels it when the client goes away, for answers
that are not streamed (a streamed answer notices the hang-up when it next writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from broker.errors import BadRequest, Cancelled
from serving.headers import HEADER_TIMEOUT

T = TypeVar("T")


def client_timeout_s(request: Request) -> float | None:
    """The client's own deadline in seconds (`X-Request-Timeout`), None when it sets none.

    Raises:
        BadRequest: the header is not a positive number of seconds.
    """
    raw = request.headers.get(HEADER_TIMEOUT)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadRequest(
            f"header {HEADER_TIMEOUT} must be a positive number of seconds, got {raw!r}",
            param=HEADER_TIMEOUT,
        )
    return value


def budget_s(client_s: float | None, cap_s: float) -> float:
    """The deadline in force: the client's own, at most the service's `cap_s`."""
    return cap_s if client_s is None else min(client_s, cap_s)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    Raises:
        Cancelled: the client went away (the work was cancelled and awaited).
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise Cancelled("the client disconnected")
    return task.result()
