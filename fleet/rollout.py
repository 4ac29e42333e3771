"""The one roll-out engine: send a model-set version to the edges step by step, watch each
step, halt on a failed swap or a regression and put the regressing nodes back; roll the
last roll-out back.

`hybridgen fleet rollout|rollback` and the console's roll-out screen both drive
`RolloutEngine`; each only shows the steps (`Observer`) and picks the options. A roll-out
goes node by node, or a canary share first. Every swap is a `reload-model` control request;
the record (`fleet.rollout_record`, key `rollout.last`) is written after every swap, so a
roll back from any machine sees what changed even when a roll-out stopped half-way, and
each step is published as an `operator_action` event. The halting rule is
`fleet.watch.judge`; with `watch_s` 0 (the console's choice) only a failed swap halts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client
from nats.errors import Error as NatsError

from broker.control import send_control
from broker.errors import HybridgenError
from fleet.rollout_record import (
    DONE,
    HALTED,
    PARTLY_ROLLED_BACK,
    ROLLED_BACK,
    RolloutRecord,
    load_record,
    save_record,
)
from fleet.watch import Bounds, EdgeView, HeartbeatLog, describe, figures, judge, version_of

#: Seconds each node has to answer `reload-model` (pulling and loading a set is slow, and a
#: node that answers late still swaps: failing it early would halt a roll-out that went on).
RELOAD_TIMEOUT_S = 300.0
#: Operator-event actions: a swap, a swap back, a watch verdict, a halt on a regression.
ROLLOUT, ROLLBACK, WATCH, HALT = "rollout", "rollback", "rollout-watch", "rollout-halt"
#: A step's states.
WAITING, LOADING, SWAPPED, FAILED, SKIPPED = "waiting", "loading", "done", "failed", "skipped"

#: Records one operator action: (action, target, ok, message).
Recorder = Callable[[str, str, bool, str], Awaitable[None]]


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


def reason(exc: Exception) -> str:
    """What went wrong, in a line: a hybridgen error's message, else the exception's text."""
    return exc.message if isinstance(exc, HybridgenError) else str(exc) or type(exc).__name__


@dataclass
class Step:
    """One node's part of a roll-out or roll back."""

    node: str
    from_version: str | None
    to_version: str
    #: waiting, loading, done, failed or skipped.
    state: str = WAITING
    #: When its reload was sent (monotonic), to count the seconds while it loads.
    started: float | None = None
    seconds: float | None = None
    message: str = ""

    def line(self) -> str:
        """The status line: node, from -> to, state, seconds, message."""
        return (
            f"{self.node:<20} {self.from_version or '-'} -> {self.to_version:<12} "
            f"{self.state:<11} {self.seconds or 0.0:6.1f}s  {self.message}"
        )


class Observer(Protocol):
    """Who shows a roll-out as it goes (the CLI prints, the console draws)."""

    def step(self, step: Step) -> None:
        """A step changed state (loading, then done or failed; or skipped)."""
        ...

    def note(self, text: str, *, warn: bool = False) -> None:
        """A line about the roll-out; `warn` when it needs the operator's eye."""
        ...


@dataclass
class RolloutOptions:
    """How a roll-out goes: the version, a canary share, the watch and its bounds."""

    version: str
    canary_percent: float | None = None
    bounds: Bounds = field(default_factory=Bounds)
    #: Seconds each step is watched before the next (0: no watch, only a failed swap halts).
    watch_s: float = 10.0


class RolloutEngine:
    """Roll-outs and roll backs over the bus, shown through an `Observer`.

    Args:
        nc: a connected client.
        edges: what the engine knows of the edges (their versions; a `HeartbeatLog` when
            steps are watched); None for a roll back alone.
        observer: shows the steps and notes.
        record_action: publishes one operator event.
        by: who runs it, as recorded (the CLI's or the console's id).
        reload_timeout_s: seconds each node has to answer `reload-model`.
    """

    def __init__(
        self,
        nc: Client,
        edges: EdgeView | None,
        observer: Observer,
        record_action: Recorder,
        *,
        by: str,
        reload_timeout_s: float = RELOAD_TIMEOUT_S,
    ) -> None:
        self.nc = nc
        self.edges = edges
        self.observer = observer
        self.record_action = record_action
        self.by = by
        self.reload_timeout_s = reload_timeout_s
        #: The roll-out a roll back undoes: this engine's last one, or the one read (`load`).
        self.record: RolloutRecord | None = None

    # -- the record -----------------------------------------------------------------------

    async def load(self) -> RolloutRecord | None:
        """Read the fleet's last roll-out as the one to roll back.

        Raises:
            Unavailable: JetStream is not reachable.
        """
        self.record = await load_record(self.nc)
        return self.record

    async def _save(self) -> bool:
        """Write the record; say so when it cannot be written."""
        if self.record is None:
            return False
        try:
            await save_record(self.nc, self.record)
        except (HybridgenError, NatsError) as exc:
            self.observer.note(
                f"roll-out not recorded in hg_config ({reason(exc)}): "
                "a roll back from elsewhere cannot see it",
                warn=True,
            )
            return False
        return True

    def heard_version(self, node: str) -> str | None:
        """The version a node's last heartbeat reported (None: not heard, or no edges)."""
        return None if self.edges is None else version_of(self.edges, node)

    # -- one swap -------------------------------------------------------------------------

    async def reload(self, step: Step) -> dict[str, Any] | None:
        """Send `reload-model` to one node and fill in its step; the reply's data, or None
        when it failed."""
        step.state, step.started = LOADING, time.monotonic()
        self.observer.step(step)
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
        except (HybridgenError, NatsError) as exc:  # NatsError: the connection went away
            step.message = reason(exc)
        step.seconds = time.monotonic() - step.started
        step.state = SWAPPED if data is not None else FAILED
        if data is not None:
            if "previous_version" in data:
                previous = data["previous_version"]
                step.from_version = None if previous is None else str(previous)
            if data.get("model_version"):
                step.to_version = str(data["model_version"])
            if data.get("load_s") is not None:
                step.message = f"{step.message} (load {data['load_s']} s)".strip()
        self.observer.step(step)
        return data

    async def _event(self, action: str, step: Step) -> None:
        """Publish a swap's operator event."""
        message = (
            f"{action} {step.node}: {step.from_version or '-'} -> {step.to_version} "
            f"{step.state} in {step.seconds or 0.0:.1f} s: {step.message}"
        )
        await self.record_action(action, step.node, step.state == SWAPPED, message)

    async def _swap_back(self, record: RolloutRecord, step: Step) -> bool:
        """Reload a changed node on its previous version; True when it went back."""
        ok = await self.reload(step) is not None
        await self._event(ROLLBACK, step)
        if ok:
            record.nodes.pop(step.node, None)
        await self._save()
        return ok

    # -- roll-out -------------------------------------------------------------------------

    def plan(self, version: str, nodes: Sequence[str]) -> list[Step]:
        """A roll-out's steps, all waiting, from each node's running version."""
        return [Step(node, self.heard_version(node), version) for node in nodes]

    async def rollout(self, steps: list[Step], options: RolloutOptions) -> bool:
        """Roll `options.version` out through `steps` (from `plan`); True when every node
        runs it, False when it halted."""
        beats = self.edges if isinstance(self.edges, HeartbeatLog) else None
        if options.watch_s > 0 and beats is None:
            raise ValueError("watching a roll-out needs a HeartbeatLog of the edges")
        version = options.version
        nodes = [step.node for step in steps]
        plan = stages(nodes, options.canary_percent)
        self.observer.note(f"rolling out {version} to {len(nodes)} node(s): " + ", ".join(nodes))
        if options.canary_percent:
            self.observer.note(f"canary ({options.canary_percent:g} %): {', '.join(plan[0])}")
        self.record = record = RolloutRecord(version=version, by=self.by)
        if not await self._save():  # a roll-out no one could roll back: not started
            self._skip(steps)
            self.observer.note(f"roll-out of {version} not started", warn=True)
            return False
        by_node = {step.node: step for step in steps}
        for stage in plan:
            stage_steps = [by_node[node] for node in stage]
            why = await self._run_stage(record, stage_steps, options, beats, nodes)
            if why is not None:
                self._skip(steps)
                record.state, record.message = HALTED, why
                await self._save()
                self.observer.note(f"roll-out of {version} halted: {why}", warn=True)
                return False
        record.state = DONE
        record.message = f"{len(record.nodes)} node(s) on {version}"
        await self._save()
        self.observer.note(f"roll-out of {version} done: {record.message}")
        return True

    def _skip(self, steps: list[Step]) -> None:
        """Mark the steps not reached `skipped`."""
        for step in steps:
            if step.state == WAITING:
                step.state = SKIPPED
                self.observer.step(step)

    async def _run_stage(
        self,
        record: RolloutRecord,
        stage: list[Step],
        options: RolloutOptions,
        beats: HeartbeatLog | None,
        everyone: list[str],
    ) -> str | None:
        """Swap the stage's nodes, watch them, roll regressing ones back; why it halted, or
        None."""
        swapped, failed = await self._swap(record, stage)
        if failed is not None:
            return failed
        if options.watch_s <= 0 or beats is None:
            return None
        names = [step.node for step in stage]
        self.observer.note(f"watching {', '.join(names)} for {options.watch_s:g} s ...")
        await asyncio.sleep(options.watch_s)
        regressed = await self._watch(record, beats, options, swapped, names, everyone)
        if not regressed:
            return None
        await self._put_back(record, list(regressed))
        return "; ".join(f"{node}: {why}" for node, why in regressed.items())

    async def _swap(
        self, record: RolloutRecord, stage: list[Step]
    ) -> tuple[dict[str, float], str | None]:
        """Reload the stage's nodes one by one, recording each; when each swapped
        (monotonic), and why the first failing one halts the roll-out (None: all swapped)."""
        swapped: dict[str, float] = {}
        for step in stage:
            swap_started = time.monotonic()
            data = await self.reload(step)
            await self._event(ROLLOUT, step)
            if data is None:
                return swapped, f"{step.node} failed to swap ({step.message})"
            if step.from_version != step.to_version:
                record.nodes.setdefault(step.node, step.from_version)
            await self._save()
            swapped[step.node] = swap_started
        return swapped, None

    async def _watch(
        self,
        record: RolloutRecord,
        beats: HeartbeatLog,
        options: RolloutOptions,
        swapped: dict[str, float],
        stage: list[str],
        everyone: list[str],
    ) -> dict[str, str]:
        """Judge each swapped node against its baseline; the regressed ones, with why."""
        version = options.version
        regressed: dict[str, str] = {}
        for node, at in swapped.items():
            before = figures(beats.since(node, 0.0, until=at, version=record.nodes.get(node)))
            peers = [b for other in everyone if other not in stage for b in beats.since(other, 0.0)]
            after = figures(beats.since(node, at, version=version))
            why = judge(after, before, figures(peers), options.bounds)
            if why is None:
                self.observer.note(f"{node:<20} {version} healthy: {describe(after)}")
                await self.record_action(WATCH, node, True, f"{node} healthy on {version}")
            else:
                regressed[node] = why
                self.observer.note(f"{node:<20} {version} regressed: {why}", warn=True)
                await self.record_action(HALT, node, False, f"{node} on {version}: {why}")
        return regressed

    async def _put_back(self, record: RolloutRecord, nodes: list[str]) -> None:
        """Reload the regressed nodes on the version each ran before."""
        for node in nodes:
            previous = record.nodes.get(node)
            if previous is None:
                self.observer.note(
                    f"{node:<20} has no previous version to go back to: reload it by hand",
                    warn=True,
                )
                continue
            await self._swap_back(record, Step(node, record.version, previous))

    # -- roll back ------------------------------------------------------------------------

    def rollback_plan(self, nodes: Sequence[str] | None = None) -> tuple[list[Step], list[str]]:
        """The steps that put the record's changed nodes (or those of `nodes` among them)
        back on their previous version, and the nodes that ran a bare model folder before
        (to be reloaded by hand); both empty when no roll-out changed a node."""
        record = self.record
        if record is None or not record.nodes:
            self.observer.note(
                "nothing to roll back: no roll-out changed a node (hg_config rollout.last)",
                warn=True,
            )
            return [], []
        targets = {n: p for n, p in record.nodes.items() if nodes is None or n in nodes}
        unknown = sorted(set(nodes or ()) - set(record.nodes))
        if unknown:
            self.observer.note(
                f"not changed by the last roll-out, left alone: {', '.join(unknown)}", warn=True
            )
        by_hand = sorted(node for node, previous in targets.items() if previous is None)
        if by_hand:
            self.observer.note(
                f"no previous version to go back to on {', '.join(by_hand)} (it ran a bare "
                "model folder): reload it by hand",
                warn=True,
            )
        steps = [
            Step(node, self.heard_version(node) or record.version or None, previous)
            for node, previous in sorted(targets.items())
            if previous is not None
        ]
        return steps, by_hand

    async def rollback(self, steps: list[Step]) -> bool:
        """Put the nodes of `steps` (from `rollback_plan`) back, one by one, each recorded;
        True when every one went back."""
        record = self.record
        if record is None:
            raise ValueError("no roll-out to roll back: load() or roll one out first")
        failed = 0
        for step in steps:
            if not await self._swap_back(record, step):
                failed += 1
        record.state = PARTLY_ROLLED_BACK if record.nodes else ROLLED_BACK
        await self._save()
        back = len(steps) - failed
        self.observer.note(f"rollback: {back}/{len(steps)} node(s) back", warn=bool(failed))
        return failed == 0
