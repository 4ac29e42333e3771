"""`hybridgen fleet set-policy NODE KEY=VALUE...`: one node's routing policy override.

Only operators write the fleet config (`hg_config`): the node checks the values and applies
them at once (its `set-policy` control verb), then this side stores the merged override
under `policy.node.<node_id>`, which the node watches and keeps across restarts.

    hybridgen fleet set-policy edge-kitchen perplexity_threshold=200 latency_budget_ms=900

Each VALUE is read as JSON when it parses (`200`, `true`, `null`), else as a string.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nats.aio.client import Client

from broker import subjects, wire
from broker.control import send_control
from broker.errors import BadRequest
from broker.settings import add_context_argument
from broker.store import FleetConfig


async def set_node_policy(
    nc: Client,
    node_id: str,
    values: dict[str, Any],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> wire.ControlReply:
    """Have `node_id` check and apply `values`, then store the merged override.

    Nothing is stored when the node refuses them (`reply.ok` False).

    Raises:
        NoResponders: the node does not answer.
        Timeout: it did not answer in time.
    """
    config = await FleetConfig.open(nc)
    key = subjects.policy_key(node_id)
    merged = {**(await config.get(key) or {}), **values}
    reply = await send_control(nc, node_id, "set-policy", values, timeout=timeout)
    if reply.ok:
        await config.put(key, merged)
    return reply


def parse_values(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs as a dict (JSON values where they parse).

    Raises:
        BadRequest: a pair without `=` or with an empty key.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise BadRequest(f"{pair!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text
    return values


def add_policy_parser(sub: Any) -> None:
    """Add `set-policy` to the `fleet` sub-parsers."""
    parser = sub.add_parser("set-policy", help="set fields of one node's routing policy")
    parser.add_argument("node", help="the node id")
    parser.add_argument("values", nargs="+", metavar="KEY=VALUE", help="policy fields")
    parser.add_argument("--nats-url", help="the bus URL (default: HG_NATS_URL, else the context's)")
    add_context_argument(parser)
    parser.set_defaults(run=run_set_policy)


async def run_set_policy(args: argparse.Namespace) -> int:
    """Run `set-policy`; 0 when the node applied the values and they are stored."""
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    values = parse_values(args.values)
    settings = BusSettings.resolve(url=args.nats_url, context=args.context)
    nc = await connect_settings(settings, name="hybridgen-fleet-policy")
    try:
        reply = await set_node_policy(nc, args.node, values)
    finally:
        await nc.close()
    if not reply.ok:
        print(f"{args.node} refused: {reply.message}", file=sys.stderr)
        return 1
    print(f"{args.node}: {reply.message}; stored {subjects.policy_key(args.node)}")
    return 0
