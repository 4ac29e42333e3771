"""Services answer only inboxes.

A requester picks the reply subject of its request, and nats-server lets a responder
publish to it whatever the responder's publish permissions deny (`allow_responses`). A
request with the reply `$KV.hg_config.policy.default` or `$O.hg_models.…` would make the
service write its answer into the fleet config or the model store. So every service of
hybridgen is registered through `add_service`, whose subscriptions (the endpoints and the
`$SRV.PING/INFO/STATS` handlers of nats.micro alike) drop a request whose reply subject is
not an inbox (`broker.subjects.is_inbox`) before any handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from nats import micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import subjects

log = logging.getLogger(__name__)


def answerable(subject: str, reply: str | None) -> bool:
    """False (and a warning naming both) when a request's reply subject is not an inbox.

    A requester picks the reply subject, and nats-server lets a responder publish to it
    whatever the responder's publish permissions deny: a reply of `$KV.hg_config.…` or
    `$O.hg_models.…` would make the service write into the fleet config or the models.
    A request without a reply subject (a plain publish) is answerable: nothing is sent.
    """
    if reply and not subjects.is_inbox(reply):
        log.warning("%s: request dropped, its reply subject %r is not an inbox", subject, reply)
        return False
    return True


MsgHandler = Callable[[Msg], Awaitable[None]]


class InboxOnlyClient:
    """The client a nats.micro service is given: its subscriptions drop requests whose
    reply subject is not an inbox (`answerable`) before the handler runs.

    nats.micro subscribes its endpoints and its own `$SRV.PING/INFO/STATS` handlers through
    the client it holds, so this one place covers every reply a service sends. Everything
    else is the wrapped client's.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def subscribe(
        self, subject: str, queue: str = "", cb: MsgHandler | None = None, **kwargs: Any
    ) -> Subscription:
        guarded = None if cb is None else _inbox_only(cb)
        return await self._nc.subscribe(subject, queue=queue, cb=guarded, **kwargs)


def _inbox_only(cb: MsgHandler) -> MsgHandler:
    async def guarded(msg: Msg) -> None:
        if answerable(msg.subject, msg.reply):
            await cb(msg)

    return guarded


async def add_service(nc: Client, **config: Any) -> micro.Service:
    """`nats.micro.add_service` through an `InboxOnlyClient`: every endpoint and discovery
    handler of the service answers inboxes only. Use it for every service."""
    return await micro.add_service(cast(Client, InboxOnlyClient(nc)), **config)


async def stop_service(service: micro.Service) -> None:
    """Stop `service` without dropping the requests already routed to it: nats.micro's
    `stop()` unsubscribes its endpoints, which loses the ones the broker sent before it saw
    the unsubscription (their callers wait out an accept timeout). Each endpoint is drained
    first instead (unsubscribe, a round trip, then its pending requests are handled);
    nats.micro keeps no public handle on them."""
    endpoints, service._endpoints = service._endpoints, []
    for endpoint in endpoints:
        subscription, endpoint._subscription = endpoint._subscription, None
        if subscription is not None:
            await subscription.drain()
    await service.stop()
