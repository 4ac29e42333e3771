"""The CLI's side of a roll-out: find the edges, drive the roll-out engine
(`fleet.rollout.RolloutEngine`) and print what it does, one line per step.

The engine, its record and its halting rule are shared with the console's roll-out screen;
here are only the printing, the edges heard on the bus, and the exit status.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from broker import subjects
from broker.telemetry import default_node_id, publish_operator_action
from fleet.rollout import RELOAD_TIMEOUT_S, RolloutEngine, RolloutOptions, Step
from fleet.watch import HeartbeatLog, live_edges

#: Seconds of heartbeats listened to when looking for the edges.
DISCOVER_S = 2.5


@dataclass
class Operator:
    """The CLI's side of the bus: the connection, its id and where lines are printed (the
    engine's `Observer`)."""

    nc: Client
    operator_id: str = field(default_factory=lambda: default_node_id("cli"))
    out: Any = None
    reload_timeout_s: float = RELOAD_TIMEOUT_S

    def print(self, text: str) -> None:
        """One status line, flushed (a roll-out is watched as it goes)."""
        print(text, file=self.out or sys.stdout, flush=True)

    def step(self, step: Step) -> None:
        """A step's status line."""
        self.print(step.line())

    def note(self, text: str, *, warn: bool = False) -> None:
        """A line about the roll-out."""
        self.print(text)

    async def record(self, action: str, target: str, ok: bool, message: str) -> None:
        """Publish an `operator_action` event, as the console does (lost ones are printed)."""
        try:
            await publish_operator_action(self.nc, self.operator_id, action, target, ok, message)
        except NatsError as exc:
            self.print(f"(event not published: {exc})")

    def engine(self, edges: HeartbeatLog | None) -> RolloutEngine:
        """The roll-out engine, printing here and publishing as this operator."""
        return RolloutEngine(
            self.nc,
            edges,
            self,
            self.record,
            by=self.operator_id,
            reload_timeout_s=self.reload_timeout_s,
        )


async def rollout(
    op: Operator,
    options: RolloutOptions,
    nodes: list[str] | None = None,
    discover_s: float = DISCOVER_S,
) -> int:
    """Roll `options.version` out to `nodes` (default: every live edge heard in
    `discover_s`); 0 when every node runs it, 1 when halted or failed."""
    beats = await HeartbeatLog(op.nc).start()
    try:
        await asyncio.sleep(discover_s)
        nodes = nodes or live_edges(beats)
        if not nodes:
            op.print(
                f"no edge heard on {subjects.telemetry_of_role('edge')} in "
                f"{discover_s:g} s: start one, or name them with --nodes"
            )
            return 1
        engine = op.engine(beats)
        return 0 if await engine.rollout(engine.plan(options.version, nodes), options) else 1
    finally:
        await beats.stop()


async def rollback(op: Operator, nodes: list[str] | None = None) -> int:
    """Put the nodes of the last roll-out (or those of `nodes` among them) back on their
    previous version; 0 when every one went back."""
    engine = op.engine(None)
    await engine.load()
    steps, by_hand = engine.rollback_plan(nodes)
    if not steps and not by_hand:
        return 1
    return 0 if await engine.rollback(steps) and not by_hand else 1
