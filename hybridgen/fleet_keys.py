"""`hybridgen fleet usage` and `hybridgen fleet limits`: API keys across the fleet.

- `usage`: listens to the heartbeats of every cloud API instance and edge for a few seconds
  and prints each key's usage by model, summed over them (`serving.usage.sum_usage`: each
  instance reports its own totals since it started).
- `limits`: shows the `limits` key of the fleet config (`hg_config`), or replaces it
  (`--set JSON`, checked with the APIs' own rule, `serving.limits.parse_rules`) or deletes it
  (`--clear`); every API puts it in force at once.

    hybridgen fleet usage --json
    hybridgen fleet limits --set '{"alice": {"key_sha256": "1a2b3c4d", "rpm": 60}}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.errors import BadRequest
from broker.settings import add_context_argument
from broker.store import FleetConfig
from serving.limits import LIMITS_KEY, parse_rules
from serving.usage import Snapshot, key_totals, sum_usage

#: Roles whose heartbeats carry usage by key.
USAGE_ROLES = ("api", "edge")


def add_keys_parsers(sub: Any) -> None:
    """Add `usage` and `limits` to the `fleet` sub-parsers."""
    usage = sub.add_parser("usage", help="usage by API key, summed over the API instances")
    usage.add_argument(
        "--listen-s", type=float, default=2.5, help="seconds of heartbeats to hear (2.5)"
    )
    usage.add_argument("--json", action="store_true", help="print one JSON object")
    usage.add_argument("--nats-url", help="the bus URL (default: HG_NATS_URL, else the context's)")
    add_context_argument(usage)
    usage.set_defaults(run=run_usage)
    limits = sub.add_parser("limits", help="show or set the API keys' limits (hg_config)")
    change = limits.add_mutually_exclusive_group()
    change.add_argument("--set", dest="value", help="the new limits, a JSON object")
    change.add_argument("--clear", action="store_true", help="delete them (back to settings)")
    limits.add_argument("--nats-url", help="the bus URL (default: HG_NATS_URL, else the context's)")
    add_context_argument(limits)
    limits.set_defaults(run=run_limits)


async def _connect(args: argparse.Namespace, name: str) -> Client:
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    settings = BusSettings.resolve(url=args.nats_url, context=args.context)
    return await connect_settings(settings, name=name)


async def fleet_usage(nc: Client, listen_s: float) -> tuple[list[str], Snapshot]:
    """The nodes heard within `listen_s` seconds and their usage, summed (each node's last
    heartbeat counts, once)."""
    last: dict[str, dict[str, Any]] = {}

    async def on_beat(msg: Msg) -> None:
        try:
            beat = wire.decode(msg.data, wire.Heartbeat)
        except Exception:
            return  # not a heartbeat: nothing to sum
        if msg.subject == subjects.telemetry(beat.role, beat.node_id):
            last[beat.node_id] = beat.extra.get("usage") or {}

    subs = [await nc.subscribe(subjects.telemetry_of_role(r), cb=on_beat) for r in USAGE_ROLES]
    try:
        await asyncio.sleep(listen_s)  # heartbeats come every second
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return sorted(last), sum_usage(last.values())


async def run_usage(args: argparse.Namespace) -> int:
    """Run `usage`: print the keys' usage (0), or say no node was heard (1)."""
    nc = await _connect(args, "hybridgen-fleet-usage")
    try:
        nodes, usage = await fleet_usage(nc, args.listen_s)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps({"nodes": nodes, "keys": usage, "totals": key_totals(usage)}))
        return 0 if nodes else 1
    if not nodes:
        print("no cloud API or edge heard: is the fleet up?", file=sys.stderr)
        return 1
    print(f"usage over {len(nodes)} nodes ({', '.join(nodes)})")
    print(f"{'key':<24} {'model':<20} {'requests':>9} {'input':>9} {'output':>9}")
    for key, models in sorted(usage.items()):
        for model, figures in sorted(models.items()):
            print(
                f"{key[:24]:<24} {model[:20]:<20} {figures['requests']:>9} "
                f"{figures['input_tokens']:>9} {figures['output_tokens']:>9}"
            )
    return 0


async def run_limits(args: argparse.Namespace) -> int:
    """Run `limits`: show, set or clear the fleet config's `limits`."""
    value = None
    if args.value is not None:
        try:
            value = json.loads(args.value)
            parse_rules(value, where="--set")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    nc = await _connect(args, "hybridgen-fleet-limits")
    try:
        config = await FleetConfig.open(nc)
        if args.clear:
            await config.delete(LIMITS_KEY)
            print(f"deleted {LIMITS_KEY}: the APIs' own key_limits settings are in force")
            return 0
        if value is not None:
            revision = await config.put(LIMITS_KEY, value)
            print(f"stored {LIMITS_KEY} (revision {revision}): in force on every API")
            return 0
        print(json.dumps(await config.get(LIMITS_KEY) or {}, indent=2, sort_keys=True))
        return 0
    finally:
        await nc.close()
