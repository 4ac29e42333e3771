"""nats.micro discovery: find every node that answers the bus, heartbeats or not.

`discover` sends one `$SRV.INFO` request and collects the replies of every service for a
short while; `apply_services` feeds each service with a `node_id` in its metadata into a
`FleetState` (control services carry `node_id` and `role`; generation services carry
`node_id` and `model`, and are cloud workers). `run_discovery` repeats this every few
seconds for as long as it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg

from tui.state import FleetState

log = logging.getLogger(__name__)

#: The nats.micro subject every service answers with its name, id and metadata.
INFO_SUBJECT = "$SRV.INFO"
#: Seconds between discovery rounds.
DISCOVERY_S = 5.0
#: Seconds one round waits for replies.
COLLECT_S = 0.5
#: Longest node id taken from a reply (longer ones are ignored).
MAX_NODE_ID = 128


@dataclass(frozen=True)
class DiscoveredService:
    """One nats.micro service that names its node."""

    name: str
    node_id: str
    role: str
    metadata: dict[str, str]


def parse_info(data: bytes) -> DiscoveredService | None:
    """A `$SRV.INFO` reply as a service of a node; None when it names no node or is invalid.

    The role is the `role` metadata, else `cloud` for a generation service (one with a
    `model`), else `unknown`.
    """
    try:
        info = json.loads(data)
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    metadata = info.get("metadata")
    if not isinstance(metadata, dict):
        return None
    meta = {str(k): str(v) for k, v in metadata.items() if v is not None}
    node_id = meta.get("node_id", "")
    if not node_id or len(node_id) > MAX_NODE_ID:
        return None
    role = meta.get("role") or ("cloud" if meta.get("model") else "unknown")
    return DiscoveredService(str(info.get("name", "")), node_id, role, meta)


async def discover(nc: Client, *, collect_s: float = COLLECT_S) -> list[DiscoveredService]:
    """Ask every nats.micro service for its info and return those that name a node.

    One request on `$SRV.INFO` with a reply inbox; every reply that arrives within
    `collect_s` seconds counts.
    """
    found: list[DiscoveredService] = []

    async def collect(msg: Msg) -> None:
        service = parse_info(msg.data)
        if service is not None:
            found.append(service)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(INFO_SUBJECT, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(collect_s)
    finally:
        await sub.unsubscribe()
    return found


def apply_services(fleet: FleetState, services: list[DiscoveredService]) -> None:
    """Record every discovered service on its node (new nodes show as `silent`)."""
    for service in services:
        fleet.apply_discovery(service.node_id, service.role, service.metadata, service=service.name)


async def run_discovery(
    nc: Client,
    fleet: FleetState,
    *,
    interval_s: float = DISCOVERY_S,
    collect_s: float = COLLECT_S,
) -> None:
    """Discover at once, then every `interval_s` seconds, until cancelled.

    A failed round (the connection is away) is logged and retried at the next interval.
    """
    while True:
        try:
            services = await discover(nc, collect_s=collect_s)
        except Exception as exc:  # a lost connection: nats-py reconnects, try next round
            log.debug("console: discovery failed: %s", exc)
        else:
            apply_services(fleet, services)
        await asyncio.sleep(max(0.0, interval_s - collect_s))
