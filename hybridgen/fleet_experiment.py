"""`hybridgen fleet experiment start|status|stop`: A/B variants from the command line.

The experiment lives in the fleet config (`hg_config`, key `experiment`, schema
`fleet.experiment.Experiment`); every edge watches that key and applies it within a second.

    hybridgen fleet experiment start NAME --cloud-model M [--share 0.5] [--variant b]
    hybridgen fleet experiment start NAME --edge-version V [--share 0.5] [--variant b]
    hybridgen fleet experiment status [--seconds 3] [--json]
    hybridgen fleet experiment stop

`status` listens to the edges' heartbeats for a few seconds and prints each variant's
figures side by side, added up over the edges (`fleet.experiment.combine`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from nats.aio.client import Client
from pydantic import ValidationError

from broker import subjects, wire
from broker.errors import BadRequest, HybridgenError
from broker.settings import add_context_argument
from broker.store import FleetConfig
from fleet.experiment import EXPERIMENT_KEY, Experiment, combine, figures_table, format_table

#: Seconds of heartbeats `status` listens to by default.
STATUS_S = 3.0


def add_experiment_parser(sub: Any) -> None:
    """Add `experiment start|status|stop` to the `fleet` sub-parsers."""
    parser = sub.add_parser("experiment", help="A/B variants: start, status, stop")
    verbs = parser.add_subparsers(dest="verb", required=True)
    start = verbs.add_parser("start", help="give a share of requests to a variant")
    start.add_argument("name", help="the experiment's name (also the assignment's hash salt)")
    target = start.add_mutually_exclusive_group(required=True)
    target.add_argument("--cloud-model", help="the variant's cloud model (hg.gen.<model>)")
    target.add_argument("--edge-version", help="the variant's edge model-set version")
    start.add_argument("--share", type=float, default=0.5, help="its share, (0, 1] (0.5)")
    start.add_argument("--variant", default="b", help="the variant's name in answers (b)")
    start.add_argument(
        "--replace", action="store_true", help="replace an experiment already running"
    )
    status = verbs.add_parser("status", help="the experiment and its variants' figures")
    status.add_argument(
        "--seconds", type=float, default=STATUS_S, help="seconds of heartbeats to listen to (3)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    verbs.add_parser("stop", help="end the experiment (the edges unload a variant model)")
    for verb in verbs.choices.values():
        verb.add_argument(
            "--nats-url", help="the bus URL (default: HG_NATS_URL, else the context's)"
        )
        add_context_argument(verb)
    parser.set_defaults(run=run_experiment)


async def run_experiment(args: argparse.Namespace) -> int:
    """Run one `experiment` verb; its exit status."""
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    settings = BusSettings.resolve(url=args.nats_url, context=args.context)
    nc = await connect_settings(settings, name="hybridgen-fleet-experiment")
    try:
        config = await FleetConfig.open(nc)
        if args.verb == "start":
            return await start(config, args)
        if args.verb == "stop":
            return await stop(config)
        return await status(nc, config, seconds=args.seconds, as_json=args.json)
    finally:
        await nc.close()


def describe(experiment: Experiment) -> str:
    """One line per variant: its name, share and what serves it."""
    lines = [f"experiment {experiment.name}"]
    for v in experiment.variants:
        what = (
            f"cloud model {v.cloud_model}" if v.cloud_model else f"edge model set {v.edge_version}"
        )
        lines.append(f"  {v.name}: {v.share:.0%} of requests, {what}")
    rest = 1 - sum(v.share for v in experiment.variants)
    lines.append(f"  control: {rest:.0%} of requests, the nodes' own models")
    return "\n".join(lines)


async def start(config: FleetConfig, args: argparse.Namespace) -> int:
    """Write the experiment to `hg_config` (refused when one runs, unless `--replace`)."""
    current = await config.get(EXPERIMENT_KEY)
    if current is not None and not args.replace:
        print(
            f"an experiment is running ({current.get('name')}): stop it first "
            "(`hybridgen fleet experiment stop`) or pass --replace",
            file=sys.stderr,
        )
        return 1
    variant = {"name": args.variant, "share": args.share}
    variant["cloud_model" if args.cloud_model else "edge_version"] = (
        args.cloud_model or args.edge_version
    )
    try:
        experiment = Experiment.model_validate(
            {"name": args.name, "variants": [variant], "started_at": time.time()}
        )
    except ValidationError as exc:
        raise BadRequest(f"invalid experiment: {exc.errors()[0]['msg']}") from None
    await config.put(EXPERIMENT_KEY, experiment.model_dump(exclude_none=True))
    print(describe(experiment))
    print("started: the edges apply it within a second")
    return 0


async def stop(config: FleetConfig) -> int:
    """Delete the experiment from `hg_config`."""
    current = await config.get(EXPERIMENT_KEY)
    if current is None:
        print("no experiment is running")
        return 0
    await config.delete(EXPERIMENT_KEY)
    print(f"experiment {current.get('name')} stopped")
    return 0


async def collect(nc: Client, name: str, seconds: float) -> dict[str, dict[str, Any]]:
    """The last `extra["variants"]` of every edge reporting experiment `name`, listening to
    heartbeats for `seconds`; by node id."""
    reports: dict[str, dict[str, Any]] = {}

    async def on_beat(msg: Any) -> None:
        try:
            beat = wire.decode(msg.data, wire.Heartbeat)
        except HybridgenError:
            return
        if beat.extra.get("experiment") == name and isinstance(beat.extra.get("variants"), dict):
            reports[beat.node_id] = beat.extra["variants"]

    sub = await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    try:
        await asyncio.sleep(seconds)
    finally:
        await sub.unsubscribe()
    return reports


async def status(nc: Client, config: FleetConfig, *, seconds: float, as_json: bool) -> int:
    """Print the experiment and its variants' figures over the edges heard in `seconds`."""
    value = await config.get(EXPERIMENT_KEY)
    if value is None:
        print(json.dumps({"experiment": None}) if as_json else "no experiment is running")
        return 0
    experiment = Experiment.model_validate(value)
    reports = await collect(nc, experiment.name, seconds)
    variants = combine(list(reports.values()))
    if as_json:
        body = {"experiment": value, "edges": sorted(reports), "variants": variants}
        print(json.dumps(body, indent=2))
        return 0
    print(describe(experiment))
    print(f"edges reporting: {len(reports)} ({', '.join(sorted(reports)) or 'none yet'})")
    if variants:
        print(format_table(figures_table(variants)))
    else:
        print("no request served under the experiment yet")
    return 0
