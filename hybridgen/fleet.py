"""`hybridgen fleet`: fleet operations from the command line.

- `experiment start|status|stop`: A/B variants.
- `rollout VERSION`: send a model-set version to the edges, node by node or a canary share
  first; after each step watch the new version's heartbeats and halt on a regression, putting
  the regressing nodes back on their previous version.
- `rollback`: put every node the last roll-out changed back on its previous version.
- `set-policy NODE KEY=VALUE...`: one node's routing policy override (`fleet_policy`).
- `usage`, `limits`: API keys' usage summed over the API instances, and their limits in the
  fleet config (`fleet_keys`).

`rollout` and `rollback` drive the roll-out engine the console's roll-out screen drives too
(`fleet.rollout`, through `hybridgen.fleet_rollout`): the record in the fleet config (key
`rollout.last`) is the same, and every step is published as an `operator_action` event.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from nats.aio.client import Client

from broker import subjects
from broker.errors import HybridgenError
from broker.settings import add_context_argument
from fleet.rollout import RELOAD_TIMEOUT_S, RolloutOptions
from fleet.watch import Bounds
from hybridgen.fleet_experiment import add_experiment_parser
from hybridgen.fleet_keys import add_keys_parsers
from hybridgen.fleet_policy import add_policy_parser
from hybridgen.fleet_rollout import DISCOVER_S, Operator, rollback, rollout


def _nodes(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [subjects.token(n.strip(), what="node id") for n in text.split(",") if n.strip()]


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError("the canary share is a percentage in (0, 100]")
    return value


def _add_bus_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="the bus URL (default: HG_NATS_URL, else the context's)")
    add_context_argument(parser)


def add_rollout_parsers(sub: Any) -> None:
    """Add `rollout` and `rollback` to the `fleet` sub-parsers."""
    p = sub.add_parser("rollout", help="roll a model-set version out to the edges")
    p.add_argument("version", help="the model-set version (published in hg_models)")
    p.add_argument("--nodes", help="comma-separated edge ids (default: every live edge)")
    p.add_argument("--canary", type=_percent, help="swap this share first (e.g. 25%%)")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=Bounds.max_error_rate,
        help="halt when the error rate rises more than this over the baseline (default 0.05)",
    )
    p.add_argument(
        "--max-p95-ms",
        type=float,
        default=Bounds.max_p95_ms,
        help="halt when p95 latency rises more than this many ms over the baseline",
    )
    p.add_argument(
        "--watch-s", type=float, default=10.0, help="seconds to watch each step (0: no watch)"
    )
    p.add_argument("--discover-s", type=float, default=DISCOVER_S, help=argparse.SUPPRESS)
    p.add_argument(
        "--reload-timeout-s",
        type=float,
        default=RELOAD_TIMEOUT_S,
        help="seconds each node has to pull, load and swap (300)",
    )
    _add_bus_option(p)
    p.set_defaults(run=_run_rollout)
    b = sub.add_parser("rollback", help="restore the version the last roll-out replaced")
    b.add_argument("--nodes", help="comma-separated edge ids (default: every changed node)")
    b.add_argument(
        "--reload-timeout-s",
        type=float,
        default=RELOAD_TIMEOUT_S,
        help="seconds each node has to load and swap (300)",
    )
    _add_bus_option(b)
    b.set_defaults(run=_run_rollback)


async def _connected(args: argparse.Namespace) -> Client:
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    settings = BusSettings.resolve(url=args.nats_url, context=args.context)
    return await connect_settings(settings, name="hybridgen-fleet")


async def _run_rollout(args: argparse.Namespace) -> int:
    nc = await _connected(args)
    try:
        op = Operator(nc, reload_timeout_s=args.reload_timeout_s)
        options = RolloutOptions(
            version=args.version,
            canary_percent=args.canary,
            bounds=Bounds(args.max_error_rate, args.max_p95_ms),
            watch_s=args.watch_s,
        )
        return await rollout(op, options, _nodes(args.nodes), args.discover_s)
    finally:
        await nc.close()


async def _run_rollback(args: argparse.Namespace) -> int:
    nc = await _connected(args)
    try:
        op = Operator(nc, reload_timeout_s=args.reload_timeout_s)
        return await rollback(op, _nodes(args.nodes))
    finally:
        await nc.close()


def build_parser() -> argparse.ArgumentParser:
    """The `hybridgen fleet` parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="hybridgen fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_experiment_parser(sub)  # hybridgen.fleet_experiment
    add_rollout_parsers(sub)
    add_policy_parser(sub)  # hybridgen.fleet_policy
    add_keys_parsers(sub)  # hybridgen.fleet_keys: usage, limits
    return parser


async def run(argv: list[str]) -> int:
    """`hybridgen fleet ...` in a running event loop (tests call this)."""
    args = build_parser().parse_args(argv)
    try:
        return int(await args.run(args))
    except HybridgenError as exc:
        print(f"hybridgen fleet {args.command}: {exc.message}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    """Dispatch `hybridgen fleet COMMAND [ARGS...]`."""
    return asyncio.run(run(argv))
