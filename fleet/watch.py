"""Watching a roll-out: which edges are live, what they run, their figures, and the
halting rule.

The roll-out engine (`fleet.rollout`) sees the edges through an `EdgeView`: the CLI's is a
`HeartbeatLog` (every edge heartbeat heard while it runs), the console's its fleet table.
`live_edges` and `version_of` are the one rule for which edges a roll-out reaches and what
each runs. `figures` sums up a span of heartbeats for one model version; `judge` says
whether the new version regressed past the `Bounds` against its baseline (the node before
the swap, or its peers). The rule is pure, so it is tested without a network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nats.aio.client import Client

from broker import subjects, wire
from broker.errors import HybridgenError

#: Seconds over which an edge counts `rps` and `errors` (`broker.telemetry.RequestStats`).
STATS_WINDOW_S = 30.0
#: An edge's statuses that keep it out of a roll-out: it said it stopped, it is no longer
#: heard (`stale`, `gone`: the console's statuses past a heartbeat's age), or only discovery
#: lists it (`silent`: never heard, so not known to be serving).
NOT_LIVE = frozenset({"stopped", "stale", "gone", "silent"})


# ------------------------------------------------------------------------ the edges in view


class EdgeView(Protocol):
    """What a roll-out needs to know of the edges."""

    def edge_statuses(self) -> dict[str, str]:
        """Each edge's status now: its last heartbeat's, or why it is not heard."""
        ...

    def last(self, node: str) -> wire.Heartbeat | None:
        """A node's last heartbeat (None: never heard)."""
        ...


def live_edges(edges: EdgeView) -> list[str]:
    """The edges a roll-out reaches: heard, fresh and not `stopped` (`NOT_LIVE`), sorted."""
    return sorted(node for node, status in edges.edge_statuses().items() if is_live(status))


def is_live(status: str) -> bool:
    """Whether an edge with this status takes part in a roll-out."""
    return status not in NOT_LIVE


def version_of(edges: EdgeView, node: str) -> str | None:
    """The model-set version a node's last heartbeat reported."""
    last = edges.last(node)
    return None if last is None else last.model_version


def sent_as(subject: str, heartbeat: wire.Heartbeat) -> bool:
    """True when `subject` is the heartbeat subject of the role and node the payload names
    (the bus lets a node publish only its own subjects; the payload is whatever it wrote)."""
    try:
        return subject == subjects.telemetry(heartbeat.role, heartbeat.node_id)
    except ValueError:  # a node id or role that is no subject token: never its own subject
        return False


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


def describe(f: Figures | None) -> str:
    """The figures as printed: error rate, p95 and how many heartbeats."""
    if f is None:
        return "no heartbeat"
    p95 = "-" if f.p95_ms is None else f"{f.p95_ms:.0f} ms"
    return f"error rate {f.error_rate:.3f}, p95 {p95} ({f.heartbeats} heartbeats)"


# ---------------------------------------------------------------------- watching the fleet


class HeartbeatLog:
    """Every edge heartbeat seen since `start()`, by node (an `EdgeView`); a heartbeat whose
    payload names another node than its subject is not counted."""

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

    def edge_statuses(self) -> dict[str, str]:
        """Each edge heard with its last heartbeat's status (all heard since `start()`)."""
        return {node: beats[-1][1].status for node, beats in self.beats.items() if beats}

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
