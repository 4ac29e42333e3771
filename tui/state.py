"""The console's model of the fleet: pure Python, no Textual, no bus.

Heartbeats and events go in (`FleetState.apply_heartbeat`, `EventLog.add`); sorted and
filtered rows, per-node history and filtered events come out. Times are the console's own
clock at receipt (`clock`, monotonic by default), never the node's `ts`, so a node with a
skewed clock is judged by when it was last heard.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from broker import wire

Clock = Callable[[], float]

#: Fleet table columns, in display order: (key, label).
FLEET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("role", "role"),
    ("node", "node"),
    ("status", "status"),
    ("model", "model@version"),
    ("in_flight", "in flight"),
    ("queue", "queue"),
    ("rps", "rps"),
    ("latency", "p50/p95 ms"),
    ("tokens_per_s", "tok/s"),
    ("cloud_share", "cloud"),
    ("errors", "errors"),
)
SORT_KEYS: tuple[str, ...] = tuple(key for key, _ in FLEET_COLUMNS)
ROLES: tuple[str, ...] = ("edge", "cloud", "api")


@dataclass
class NodeHistory:
    """The last `size` samples of one node's figures, oldest first, for plots."""

    size: int = 120
    at: deque[float] = field(init=False)
    latency_p50_ms: deque[float] = field(init=False)
    latency_p95_ms: deque[float] = field(init=False)
    tokens_per_s: deque[float] = field(init=False)
    queue_depth: deque[float] = field(init=False)
    cloud_share: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        for name in self.series_names():
            setattr(self, name, deque(maxlen=self.size))

    @staticmethod
    def series_names() -> tuple[str, ...]:
        """The names of the deques, `at` (receipt times) first."""
        return (
            "at",
            "latency_p50_ms",
            "latency_p95_ms",
            "tokens_per_s",
            "queue_depth",
            "cloud_share",
        )

    def append(self, at: float, heartbeat: wire.Heartbeat) -> None:
        """Record one heartbeat received at `at` (a missing latency counts as 0)."""
        self.at.append(at)
        self.latency_p50_ms.append(heartbeat.latency_p50_ms or 0.0)
        self.latency_p95_ms.append(heartbeat.latency_p95_ms or 0.0)
        self.tokens_per_s.append(heartbeat.tokens_per_s)
        self.queue_depth.append(float(heartbeat.queue_depth))
        self.cloud_share.append(cloud_share(heartbeat) or 0.0)


def cloud_share(heartbeat: wire.Heartbeat) -> float | None:
    """Share of requests a node sent to the cloud (sum over route reasons), None if unknown."""
    if not heartbeat.fallback_ratio:
        return None
    return min(1.0, max(0.0, sum(heartbeat.fallback_ratio.values())))


@dataclass
class Node:
    """What the console knows of one node: its last heartbeat and when it came."""

    heartbeat: wire.Heartbeat
    last_seen: float
    history: NodeHistory

    @property
    def node_id(self) -> str:
        return self.heartbeat.node_id

    @property
    def role(self) -> str:
        return self.heartbeat.role


@dataclass(frozen=True)
class NodeView:
    """One fleet row at one instant: the node plus its derived status."""

    node: Node
    status: str
    age_s: float

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def sort_value(self, key: str) -> Any:
        """The value column `key` sorts by (None sorts last)."""
        hb = self.node.heartbeat
        values: dict[str, Any] = {
            "role": hb.role,
            "node": hb.node_id,
            "status": self.status,
            "model": f"{hb.model or ''}@{hb.model_version or ''}",
            "in_flight": hb.in_flight,
            "queue": hb.queue_depth,
            "rps": hb.rps,
            "latency": hb.latency_p95_ms,
            "tokens_per_s": hb.tokens_per_s,
            "cloud_share": cloud_share(hb),
            "errors": hb.errors,
        }
        return values[key]

    def cells(self) -> tuple[str, ...]:
        """The row's cells as plain strings, in `FLEET_COLUMNS` order."""
        hb = self.node.heartbeat
        share = cloud_share(hb)
        model = hb.model or "-"
        if hb.model_version:
            model = f"{model}@{hb.model_version}"
        return (
            hb.role,
            hb.node_id,
            self.status,
            model,
            str(hb.in_flight),
            str(hb.queue_depth),
            f"{hb.rps:.1f}",
            f"{_ms(hb.latency_p50_ms)}/{_ms(hb.latency_p95_ms)}",
            f"{hb.tokens_per_s:.0f}",
            "-" if share is None else f"{share:.0%}",
            str(hb.errors),
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


class FleetState:
    """Every node heard from, one per node id, with staleness derived from receipt times.

    Args:
        stale_after: seconds without a heartbeat before a node shows `stale`.
        gone_after: seconds without a heartbeat before it shows `gone` (and `prune` drops it).
        history_size: samples kept per node for plots.
        clock: the time source (monotonic seconds by default).
    """

    def __init__(
        self,
        *,
        stale_after: float = 5.0,
        gone_after: float = 60.0,
        history_size: int = 120,
        clock: Clock = time.monotonic,
    ) -> None:
        if stale_after <= 0 or gone_after < stale_after:
            raise ValueError("need 0 < stale_after <= gone_after")
        self.stale_after = stale_after
        self.gone_after = gone_after
        self.history_size = history_size
        self.clock = clock
        self._nodes: dict[str, Node] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> Node | None:
        """The node with this id, or None."""
        return self._nodes.get(node_id)

    def apply_heartbeat(self, heartbeat: wire.Heartbeat) -> Node:
        """Record a heartbeat: create or update the node's row and history."""
        now = self.clock()
        node = self._nodes.get(heartbeat.node_id)
        if node is None:
            node = Node(heartbeat, now, NodeHistory(self.history_size))
            self._nodes[heartbeat.node_id] = node
        else:
            node.heartbeat = heartbeat
            node.last_seen = now
        node.history.append(now, heartbeat)
        return node

    def status(self, node: Node, now: float | None = None) -> str:
        """The node's reported status, or `stale` / `gone` when it has gone quiet."""
        age = (self.clock() if now is None else now) - node.last_seen
        if age >= self.gone_after:
            return "gone"
        if age >= self.stale_after:
            return "stale"
        return node.heartbeat.status

    def view(self, node_id: str) -> NodeView | None:
        """One node's row now, or None if unknown."""
        node = self._nodes.get(node_id)
        if node is None:
            return None
        now = self.clock()
        return NodeView(node, self.status(node, now), now - node.last_seen)

    def rows(
        self,
        *,
        sort_by: str = "node",
        descending: bool = False,
        text: str = "",
        role: str | None = None,
    ) -> list[NodeView]:
        """The fleet's rows, filtered and sorted.

        Args:
            sort_by: a key of `SORT_KEYS`; ties fall back to role then node id.
            descending: reverse the order (unknown values still sort last).
            text: keep rows where any cell contains it (case-insensitive).
            role: keep only this role.

        Raises:
            ValueError: an unknown `sort_by`.
        """
        if sort_by not in SORT_KEYS:
            raise ValueError(f"unknown sort column {sort_by!r}: one of {', '.join(SORT_KEYS)}")
        now = self.clock()
        views = [NodeView(n, self.status(n, now), now - n.last_seen) for n in self._nodes.values()]
        if role:
            views = [v for v in views if v.node.role == role]
        needle = text.strip().lower()
        if needle:
            views = [v for v in views if any(needle in c.lower() for c in v.cells())]
        views.sort(key=lambda v: (v.node.role, v.node_id))
        known = [v for v in views if v.sort_value(sort_by) is not None]
        unknown = [v for v in views if v.sort_value(sort_by) is None]
        known.sort(key=lambda v: v.sort_value(sort_by), reverse=descending)
        return known + unknown

    def prune(self) -> list[str]:
        """Drop the nodes that are `gone`; return their ids."""
        now = self.clock()
        gone = [i for i, n in self._nodes.items() if self.status(n, now) == "gone"]
        for node_id in gone:
            del self._nodes[node_id]
        return gone


@dataclass(frozen=True)
class EventFilter:
    """Which events to show: each set field must match (substring, case-insensitive)."""

    node: str = ""
    kind: str = ""
    request_id: str = ""
    text: str = ""

    @classmethod
    def parse(cls, query: str) -> EventFilter:
        """Read `node:X kind:Y req:Z free words` (each part optional) into a filter."""
        fields = {"node": "", "kind": "", "request_id": "", "text": []}
        words: list[str] = []
        for part in query.split():
            name, sep, value = part.partition(":")
            name = {"req": "request_id", "request": "request_id"}.get(name, name)
            if sep and name in ("node", "kind", "request_id"):
                fields[name] = value
            else:
                words.append(part)
        return cls(
            node=str(fields["node"]),
            kind=str(fields["kind"]),
            request_id=str(fields["request_id"]),
            text=" ".join(words),
        )

    def matches(self, event: wire.Event) -> bool:
        """True when `event` passes every set field."""
        checks = (
            (self.node, event.node_id),
            (self.kind, event.kind),
            (self.request_id, event.request_id or ""),
        )
        if any(want and want.lower() not in have.lower() for want, have in checks):
            return False
        if self.text:
            haystack = " ".join(
                (event.node_id, event.kind, event.request_id or "", event.message)
            ).lower()
            return self.text.lower() in haystack
        return True


class EventLog:
    """A bounded ring of the most recent events, oldest first."""

    def __init__(self, size: int = 1000) -> None:
        self._events: deque[wire.Event] = deque(maxlen=size)
        #: Events ever added, so a view can tell it has something new to draw.
        self.added = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: wire.Event) -> None:
        """Append one event, dropping the oldest when full."""
        self._events.append(event)
        self.added += 1

    def select(
        self, where: EventFilter | None = None, *, limit: int | None = None
    ) -> list[wire.Event]:
        """The events that match `where`, newest first, at most `limit`."""
        chosen: list[wire.Event] = []
        for event in reversed(self._events):
            if where is None or where.matches(event):
                chosen.append(event)
                if limit is not None and len(chosen) >= limit:
                    break
        return chosen

    def extend(self, events: Iterable[wire.Event]) -> None:
        """Append several events in order."""
        for event in events:
            self.add(event)
