"""The CLI's roll-out engine: send a model-set version to the edges step by step, watch each
step, halt on a regression and put the regressing nodes back; roll the last roll-out back.

A roll-out goes node by node, or a canary share first. Every swap is a `reload-model`
control request, recorded in the fleet config (`models.rollouts`, key `rollout.last`, the
record the console's roll-out screen shares) and published as an `operator_action` event.
The halting rule is `hybridgen.fleet_watch.judge`.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from broker import subjects
from broker.control import send_control
from broker.errors import HybridgenError
from broker.telemetry import default_node_id, publish_operator_action
from hybridgen.fleet_watch import Bounds, HeartbeatLog, describe, figures, judge
from models.rollouts import RolloutRecord, load_record, save_record

#: Seconds each node has to answer `reload-model` (pulling and loading a set is slow).
RELOAD_TIMEOUT_S = 300.0
#: Seconds of heartbeats listened to when looking for the edges.
DISCOVER_S = 2.5


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
                await _halt(op, beats, record, skipped, halted)
                return 1
        record.state = "done"
        record.message = f"{len(record.nodes)} node(s) on {version}"
        await save_record(op.nc, record)
        op.print(f"roll-out of {version} done: {record.message}")
        return 0
    finally:
        await beats.stop()


async def _halt(
    op: Operator, beats: HeartbeatLog, record: RolloutRecord, skipped: list[str], why: str
) -> None:
    """Print the nodes left out, and record and print the halt."""
    for node in skipped:
        op.print(Step(node, beats.version_of(node), record.version, "skipped").line())
    record.state, record.message = "halted", why
    await save_record(op.nc, record)
    op.print(f"roll-out of {record.version} halted: {why}")


async def _run_stage(
    op: Operator,
    beats: HeartbeatLog,
    options: RolloutOptions,
    record: RolloutRecord,
    stage: list[str],
    everyone: list[str],
) -> str | None:
    """Swap the stage's nodes, watch them, roll regressing ones back; why it halted, or None."""
    swapped, failed = await _swap(op, beats, options.version, record, stage)
    if failed is not None:
        return failed
    if options.watch_s <= 0:
        return None
    op.print(f"watching {', '.join(stage)} for {options.watch_s:g} s ...")
    await asyncio.sleep(options.watch_s)
    regressed = await _watch(op, beats, options, record, swapped, stage, everyone)
    if not regressed:
        return None
    await _put_back(op, record, options.version, list(regressed))
    return "; ".join(f"{node}: {why}" for node, why in regressed.items())


async def _swap(
    op: Operator, beats: HeartbeatLog, version: str, record: RolloutRecord, stage: list[str]
) -> tuple[dict[str, float], str | None]:
    """Reload the stage's nodes one by one; when each swapped (monotonic), and why the first
    failing one halts the roll-out (None: all swapped)."""
    swapped: dict[str, float] = {}  # node -> when it swapped
    for node in stage:
        step = Step(node, beats.version_of(node), version)
        swap_started = time.monotonic()
        data = await op.reload(step)
        message = f"rollout {node}: {step.from_version or '-'} -> {version} {step.state}"
        await op.record("rollout", node, data is not None, f"{message}: {step.message}")
        if data is None:
            return swapped, f"{node} failed to swap ({step.message})"
        if step.from_version != version:
            record.nodes.setdefault(node, step.from_version)
        await save_record(op.nc, record)
        swapped[node] = swap_started
    return swapped, None


async def _watch(
    op: Operator,
    beats: HeartbeatLog,
    options: RolloutOptions,
    record: RolloutRecord,
    swapped: dict[str, float],
    stage: list[str],
    everyone: list[str],
) -> dict[str, str]:
    """Judge each swapped node against its baseline; the regressed ones, with why."""
    version = options.version
    regressed: dict[str, str] = {}
    for node, at in swapped.items():
        before = figures(beats.since(node, 0.0, until=at, version=record.nodes.get(node)))
        peers_beats = [
            beat for other in everyone if other not in stage for beat in beats.since(other, 0.0)
        ]
        after = figures(beats.since(node, at, version=version))
        why = judge(after, before, figures(peers_beats), options.bounds)
        if why is None:
            op.print(f"{node:<20} {version} healthy: {describe(after)}")
            await op.record("rollout-watch", node, True, f"{node} healthy on {version}")
        else:
            regressed[node] = why
            op.print(f"{node:<20} {version} regressed: {why}")
            await op.record("rollout-halt", node, False, f"{node} on {version}: {why}")
    return regressed


async def _put_back(op: Operator, record: RolloutRecord, version: str, nodes: list[str]) -> None:
    """Reload the regressed nodes on the version each ran before."""
    for node in nodes:
        previous = record.nodes.get(node)
        if previous is None:
            op.print(f"{node:<20} has no previous version to go back to: reload it by hand")
            continue
        step = Step(node, version, previous)
        ok = await op.reload(step) is not None
        await op.record("rollback", node, ok, f"rollback {node}: {version} -> {previous}")
        if ok:
            record.nodes.pop(node, None)


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
