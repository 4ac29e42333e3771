"""Control endpoints on the bus: `hg.ctl.<node_id>.<verb>` served by a node (nats.micro)
and sent by the console and the `hybridgen fleet` command.

A control request is a `wire.ControlRequest`; every answer is a `wire.ControlReply`, a
refusal included (`ok=False`, with the error's code and field in `data`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats import micro
from nats.aio.client import Client
from nats.micro.request import Request

from broker import subjects, wire
from broker.errors import BadRequest, HybridgenError, Internal, NoResponders, Timeout
from broker.inbox_only import add_service
from broker.permissions import CONTROL_SERVICE, EDGE_SERVICE
from broker.service import SOFTWARE_VERSION, reply_subject

log = logging.getLogger(__name__)


ControlHandler = Callable[[wire.ControlRequest], Awaitable[wire.ControlReply]]


async def serve_control(
    nc: Client,
    *,
    node_id: str,
    role: str,
    handlers: dict[str, ControlHandler],
    name: str | None = None,
    version: str = SOFTWARE_VERSION,
) -> micro.Service:
    """Answer `hg.ctl.<node_id>.<verb>` for each verb of `handlers` (a nats.micro service).

    The service is `name`, by default its role's (`broker.permissions.ROLE_SERVICES`), the
    only names its role may answer discovery for. Bad input, a wrong verb or a failing
    handler answer `ControlReply(ok=False, message)`, with `data` `{"code"}` for a coded
    error (and `"param"`, the field at fault). Stop it with `await service.stop()`.

    Raises:
        ValueError: a verb that is not one of `subjects.CONTROL_VERBS`.
    """
    for verb in handlers:
        subjects.control(node_id, verb)  # validates verb and node id
    name = name or (EDGE_SERVICE if role == "edge" else CONTROL_SERVICE)
    service = await add_service(
        nc, name=name, version=version, metadata={"node_id": node_id, "role": role}
    )
    for verb, handler in handlers.items():
        await service.add_endpoint(
            name=verb,
            subject=subjects.control(node_id, verb),
            handler=_control_endpoint(verb, handler),
            metadata={"node_id": node_id, "verb": verb},
        )
    await nc.flush()
    return service


def _control_endpoint(verb: str, handler: ControlHandler) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            control = wire.decode(request.data, wire.ControlRequest)
            if control.verb != verb:
                raise BadRequest(
                    f"verb {control.verb!r} sent to the {verb!r} endpoint", param="verb"
                )
            reply = await handler(control)
        except HybridgenError as exc:
            coded = {"code": exc.code.value, **({"param": exc.param} if exc.param else {})}
            reply = wire.ControlReply(ok=False, message=exc.message, data=coded)
        except Exception as exc:
            log.exception("control %s failed", verb)
            reply = wire.ControlReply(ok=False, message=f"internal error ({type(exc).__name__})")
        if reply_subject(request):  # add_service dropped any request with a non-inbox one
            await request.respond(wire.encode(reply))

    return handle


async def send_control(
    nc: Client,
    node_id: str,
    verb: str,
    args: dict[str, Any] | None = None,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> wire.ControlReply:
    """Send one control request and return the node's reply.

    Raises:
        NoResponders: no such node is listening.
        Timeout: the node did not answer in time.
    """
    request = wire.ControlRequest(verb=verb, args=args or {})  # type: ignore[arg-type]
    try:
        msg = await nc.request(
            subjects.control(node_id, verb), wire.encode(request), timeout=timeout
        )
    except nats.errors.NoRespondersError:
        raise NoResponders(f"node {node_id} does not answer {verb}") from None
    except TimeoutError:
        raise Timeout(f"node {node_id} did not answer {verb} within {timeout:g} s") from None
    try:
        return wire.decode(msg.data, wire.ControlReply)
    except BadRequest as exc:
        raise Internal(f"malformed control reply from {node_id}: {exc.message}") from None
