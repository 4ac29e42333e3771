"""`hybridgen fleet`: fleet operations from the command line.

- `experiment start|status|stop`: A/B variants.
- `rollout VERSION`: send a model-set version to the edges, node by node or a canary share
  first; after each step watch the new version's heartbeats and halt on a regression, putting
  the regressing nodes back on their previous version.
- `rollback`: put every node the last roll-out changed back on its previous version.
- `set-policy NODE KEY=VALUE...`: one node's routing policy override (`fleet_policy`).

A roll-out is recorded in the fleet config (`models.rollouts`, key `rollout.last`), the same
record the console's roll-out screen reads and writes, and every step is published as an
`operator_action` event, as the console publishes its actions.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from broker import subjects, wire
from broker.errors import HybridgenError
from broker.service import send_control
from broker.telemetry import default_node_id, publish_operator_action
from hybridgen.fleet_experiment import add_experiment_parser
from hybridgen.fleet_policy import add_policy_parser
from models.rollouts import RolloutRecord, load_record, save_record
from tui.trust import sent_as

#: Seconds each node has to answer `reload-model` (pulling and loading a set is slow).
RELOAD_TIMEOUT_S = 300.0
#: Seconds of heartbeats listened to when looking for the edges.
DISCOVER_S = 2.5
#: Seconds over which an edge counts `rps` and `errors` (`broker.telemetry.RequestStats`).
STATS_WINDOW_S = 30.0


# ------------------------------------------------------------------------ the halting rule


@dataclass(frozen=True)
class Figures:
    """What a node's heartbeats say about one model version."""

    #: Failed requests / all requests (the worst heartbeat of the span).
    error_rate: float
    #: The highest p95 latency reported (None: no successful request).
    p95_ms: float | None
    #: Heartbeats the figures come from.
    heartbeats: int


@dataclass(frozen=True)
class Bounds:
    """How far the new version may regress before a roll-out halts.

    Attributes:
        max_error_rate: allowed rise of the error rate over the baseline (0.05: 5 points).
        max_p95_ms: allowed rise of the p95 latency over the baseline, in ms.
    """

    max_error_rate: float = 0.05
    max_p95_ms: float = 500.0


def heartbeat_error_rate(beat: wire.Heartbeat, window_s: float = STATS_WINDOW_S) -> float:
    """A heartbeat's error rate: its errors over its requests of the stats window."""
    served = beat.rps * window_s
    total = served + beat.errors
    return 0.0 if total <= 0 else beat.errors / total


def figures(beats: Sequence[wire.Heartbeat], window_s: float = STATS_WINDOW_S) -> Figures | None:
    """The figures of a span of heartbeats (None: no heartbeat); each heartbeat already
    covers its stats window, so the worst one of the span stands for it."""
    if not beats:
        return None
    p95s = [b.latency_p95_ms for b in beats if b.latency_p95_ms is not None]
    return Figures(
        error_rate=max(heartbeat_error_rate(b, window_s) for b in beats),
        p95_ms=max(p95s) if p95s else None,
        heartbeats=len(beats),
    )


def judge(
    after: Figures | None,
    before: Figures | None,
    peers: Figures | None,
    bounds: Bounds,
) -> str | None:
    """Why a roll-out must halt on this node, or None when the new version may stay.

    Args:
        after: the node's figures on the new version, while watched.
        before: the node's own figures before the swap (the baseline when it has one).
        peers: the other nodes' figures (the baseline when the node had none of its own).
        bounds: the allowed regression.

    The new version halts the roll-out when it never reported (no heartbeat with it), when
    its error rate exceeds the baseline's by more than `max_error_rate` (with no baseline:
    exceeds `max_error_rate`), or when its p95 exceeds the baseline's by more than
    `max_p95_ms` (no baseline p95: latency is not judged).
    """
    if after is None:
        return "no heartbeat reported the new version while watched"
    base = before if before is not None else peers
    base_error = 0.0 if base is None else base.error_rate
    if after.error_rate > base_error + bounds.max_error_rate:
        return (
            f"error rate {after.error_rate:.3f} > baseline {base_error:.3f} + "
            f"{bounds.max_error_rate:g}"
        )
    base_p95 = None if base is None else base.p95_ms
    if base_p95 is None and before is not None and peers is not None:
        base_p95 = peers.p95_ms
    if (
        after.p95_ms is not None
        and base_p95 is not None
        and after.p95_ms > base_p95 + bounds.max_p95_ms
    ):
        return f"p95 {after.p95_ms:.0f} ms > baseline {base_p95:.0f} ms + {bounds.max_p95_ms:g} ms"
    return None


def canary_count(nodes: int, percent: float) -> int:
    """How many of `nodes` a canary of `percent` % takes: at least one, rounded up."""
    if nodes <= 0:
        return 0
    return max(1, min(nodes, math.ceil(nodes * percent / 100.0)))


def stages(nodes: Sequence[str], canary_percent: float | None) -> list[list[str]]:
    """The roll-out's steps: the canary share together first (when asked), then node by node."""
    if not canary_percent:
        return [[node] for node in nodes]
    first = canary_count(len(nodes), canary_percent)
    return [list(nodes[:first])] + [[node] for node in nodes[first:]]


# ---------------------------------------------------------------------- watching the fleet


class HeartbeatLog:
    """Every edge heartbeat seen since `start()`, by node; a context manager."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.beats: dict[str, list[tuple[float, wire.Heartbeat]]] = {}
        self._sub: Any = None

    async def start(self) -> HeartbeatLog:
        """Subscribe to `hg.telemetry.edge.*`."""
        self._sub = await self.nc.subscribe(subjects.telemetry_of_role("edge"), cb=self._on_beat)
        return self

    async def _on_beat(self, msg: Any) -> None:
        try:
            beat = wire.decode(msg.data, wire.Heartbeat)
        except HybridgenError:
            return
        if not sent_as(msg.subject, beat):  # a node posing as another: not counted
            return
        self.beats.setdefault(beat.node_id, []).append((time.monotonic(), beat))

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def live_edges(self) -> list[str]:
        """Edges whose last heartbeat is not `stopped`, sorted."""
        return sorted(
            node for node, beats in self.beats.items() if beats and beats[-1][1].status != "stopped"
        )

    def last(self, node: str) -> wire.Heartbeat | None:
        """A node's last heartbeat."""
        beats = self.beats.get(node)
        return beats[-1][1] if beats else None

    def since(
        self, node: str, start: float, *, version: str | None = None, until: float | None = None
    ) -> list[wire.Heartbeat]:
        """A node's heartbeats seen from `start` (monotonic) to `until`, of one version."""
        return [
            beat
            for seen, beat in self.beats.get(node, [])
            if seen >= start
            and (until is None or seen <= until)
            and (version is None or beat.model_version == version)
        ]


# --------------------------------------------------------------------------- the roll-out


@dataclass
class Step:
    """One node's part of a roll-out or roll back, as printed."""

    node: str
    from_version: str | None
    to_version: str
    state: str = "waiting"
    seconds: float = 0.0
    message: str = ""

    def line(self) -> str:
        """The status line: node, from -> to, state, seconds, message."""
        return (
            f"{self.node:<20} {self.from_version or '-'} -> {self.to_version:<12} "
            f"{self.state:<11} {self.seconds:6.1f}s  {self.message}"
        )


@dataclass
class Operator:
    """The CLI's side of the bus: the connection, its id and where lines are printed."""

    nc: Client
    operator_id: str = field(default_factory=lambda: default_node_id("cli"))
    out: Any = None
    reload_timeout_s: float = RELOAD_TIMEOUT_S

    def print(self, text: str) -> None:
        """One status line, flushed (a roll-out is watched as it goes)."""
        print(text, file=self.out or sys.stdout, flush=True)

    async def record(self, action: str, target: str, ok: bool, message: str) -> None:
        """Publish an `operator_action` event, as the console does (lost ones are printed)."""
        try:
            await publish_operator_action(self.nc, self.operator_id, action, target, ok, message)
        except NatsError as exc:
            self.print(f"(event not published: {exc})")

    async def reload(self, step: Step) -> dict[str, Any] | None:
        """Send `reload-model` to one node, fill in and print its step; the reply's data, or
        None when it failed."""
        step.state = "loading"
        self.print(step.line())
        started = time.monotonic()
        data: dict[str, Any] | None = None
        try:
            reply = await send_control(
                self.nc,
                step.node,
                "reload-model",
                {"version": step.to_version},
                timeout=self.reload_timeout_s,
            )
            step.message = reply.message
            if reply.ok:
                data = dict(reply.data)
        except HybridgenError as exc:
            step.message = exc.message
        except NatsError as exc:
            step.message = str(exc) or type(exc).__name__
        step.seconds = time.monotonic() - started
        step.state = "done" if data is not None else "failed"
        if data is not None:
            previous = data.get("previous_version", step.from_version)
            step.from_version = None if previous is None else str(previous)
            if data.get("load_s") is not None:
                step.message = f"{step.message} (load {data['load_s']} s)"
        self.print(step.line())
        return data


@dataclass
class RolloutOptions:
    """What `hybridgen fleet rollout` was asked for."""

    version: str
    nodes: list[str] | None = None
    canary_percent: float | None = None
    bounds: Bounds = field(default_factory=Bounds)
    watch_s: float = 10.0
    discover_s: float = DISCOVER_S


async def rollout(op: Operator, options: RolloutOptions) -> int:
    """Roll `options.version` out; 0 when every node runs it, 1 when halted or failed."""
    version = options.version
    beats = await HeartbeatLog(op.nc).start()
    try:
        await asyncio.sleep(options.discover_s)
        nodes = options.nodes or beats.live_edges()
        if not nodes:
            op.print(
                f"no edge heard on {subjects.telemetry_of_role('edge')} in "
                f"{options.discover_s:g} s: start one, or name them with --nodes"
            )
            return 1
        plan = stages(nodes, options.canary_percent)
        op.print(f"rolling out {version} to {len(nodes)} node(s): " + ", ".join(nodes))
        if options.canary_percent:
            op.print(f"canary ({options.canary_percent:g} %): {', '.join(plan[0])}")
        record = RolloutRecord(version=version, by=op.operator_id)
        await save_record(op.nc, record)
        for index, stage in enumerate(plan):
            halted = await _run_stage(op, beats, options, record, stage, nodes)
            if halted is not None:
                skipped = [node for later in plan[index + 1 :] for node in later]
                for node in skipped:
                    op.print(Step(node, _version_of(beats, node), version, "skipped").line())
                record.state, record.message = "halted", halted
                await save_record(op.nc, record)
                op.print(f"roll-out of {version} halted: {halted}")
                return 1
        record.state = "done"
        record.message = f"{len(record.nodes)} node(s) on {version}"
        await save_record(op.nc, record)
        op.print(f"roll-out of {version} done: {record.message}")
        return 0
    finally:
        await beats.stop()


async def _run_stage(
    op: Operator,
    beats: HeartbeatLog,
    options: RolloutOptions,
    record: RolloutRecord,
    stage: list[str],
    everyone: list[str],
) -> str | None:
    """Swap the stage's nodes, watch them, roll regressing ones back; why it halted, or None."""
    version = options.version
    swapped: dict[str, float] = {}  # node -> when it swapped
    for node in stage:
        step = Step(node, _version_of(beats, node), version)
        swap_started = time.monotonic()
        data = await op.reload(step)
        message = f"rollout {node}: {step.from_version or '-'} -> {version} {step.state}"
        await op.record("rollout", node, data is not None, f"{message}: {step.message}")
        if data is None:
            return f"{node} failed to swap ({step.message})"
        if step.from_version != version:
            record.nodes.setdefault(node, step.from_version)
        await save_record(op.nc, record)
        swapped[node] = swap_started
    if options.watch_s <= 0:
        return None
    op.print(f"watching {', '.join(stage)} for {options.watch_s:g} s ...")
    await asyncio.sleep(options.watch_s)
    regressed: dict[str, str] = {}
    for node, at in swapped.items():
        before = figures(beats.since(node, 0.0, until=at, version=record.nodes.get(node)))
        peers_beats = [
            beat for other in everyone if other not in stage for beat in beats.since(other, 0.0)
        ]
        after = figures(beats.since(node, at, version=version))
        why = judge(after, before, figures(peers_beats), options.bounds)
        if why is None:
            op.print(f"{node:<20} {version} healthy: {_describe(after)}")
            await op.record("rollout-watch", node, True, f"{node} healthy on {version}")
        else:
            regressed[node] = why
            op.print(f"{node:<20} {version} regressed: {why}")
            await op.record("rollout-halt", node, False, f"{node} on {version}: {why}")
    if not regressed:
        return None
    for node in regressed:
        previous = record.nodes.get(node)
        if previous is None:
            op.print(f"{node:<20} has no previous version to go back to: reload it by hand")
            continue
        step = Step(node, version, previous)
        ok = await op.reload(step) is not None
        await op.record("rollback", node, ok, f"rollback {node}: {version} -> {previous}")
        if ok:
            record.nodes.pop(node, None)
    return "; ".join(f"{node}: {why}" for node, why in regressed.items())


def _version_of(beats: HeartbeatLog, node: str) -> str | None:
    last = beats.last(node)
    return None if last is None else last.model_version


def _describe(f: Figures | None) -> str:
    if f is None:
        return "no heartbeat"
    p95 = "-" if f.p95_ms is None else f"{f.p95_ms:.0f} ms"
    return f"error rate {f.error_rate:.3f}, p95 {p95} ({f.heartbeats} heartbeats)"


async def rollback(op: Operator, nodes: list[str] | None = None) -> int:
    """Put the nodes of the last roll-out (or those of `nodes` among them) back on their
    previous version; 0 when every one went back."""
    record = await load_record(op.nc)
    if record is None or not record.nodes:
        op.print("nothing to roll back: no roll-out changed a node (hg_config rollout.last)")
        return 1
    targets = {n: p for n, p in record.nodes.items() if nodes is None or n in nodes}
    if nodes is not None:
        unknown = sorted(set(nodes) - set(record.nodes))
        if unknown:
            op.print(f"not changed by the last roll-out, left alone: {', '.join(unknown)}")
    failed = 0
    for node, previous in sorted(targets.items()):
        if previous is None:
            op.print(f"{node:<20} ran a bare model folder before: reload it by hand")
            failed += 1
            continue
        step = Step(node, record.version, previous)
        ok = await op.reload(step) is not None
        await op.record("rollback", node, ok, f"rollback {node}: -> {previous} {step.state}")
        if ok:
            record.nodes.pop(node)
        else:
            failed += 1
        await save_record(op.nc, record)
    if not record.nodes:
        record.state = "rolled_back"
        await save_record(op.nc, record)
    op.print(f"rollback: {len(targets) - failed}/{len(targets)} node(s) back")
    return 1 if failed else 0


# ------------------------------------------------------------------------------- the CLI


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
    parser.add_argument("--nats-url", help="the bus (default: HG_NATS_URL / HG_NATS_* settings)")


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

    settings = BusSettings() if not args.nats_url else BusSettings(url=args.nats_url)
    return await connect_settings(settings, name="hybridgen-fleet")


async def _run_rollout(args: argparse.Namespace) -> int:
    nc = await _connected(args)
    try:
        op = Operator(nc, reload_timeout_s=args.reload_timeout_s)
        options = RolloutOptions(
            version=args.version,
            nodes=_nodes(args.nodes),
            canary_percent=args.canary,
            bounds=Bounds(args.max_error_rate, args.max_p95_ms),
            watch_s=args.watch_s,
            discover_s=args.discover_s,
        )
        return await rollout(op, options)
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
