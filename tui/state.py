"""The console's model of the fleet's nodes: pure Python, no Textual, no bus.

Heartbeats and discovered services go in (`FleetState.apply_heartbeat`,
`FleetState.apply_discovery`); sorted and filtered rows, per-node history and the fleet
summary (`tui.fleet_summary`) come out. Events live apart, in `tui.event_log`. Times are the
console's own clock at receipt (`clock`, monotonic by default), never the node's `ts`, so a
node with a skewed clock is judged by when it was last heard.

A node's status is its reported one while its heartbeats are fresh; then `stale`, then
`gone` (pruned). A node that answers nats.micro discovery but sends no heartbeats is
`silent`; discovery alone never keeps it longer than `gone_after` after the last answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker import wire
from tui.fleet_summary import FleetSummary, summarize

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

#: Statuses drawn in bold red across the row: the console no longer hears the node.
LOST_STATUSES = frozenset({"stale", "gone", "silent"})
#: Statuses drawn in yellow: the node is up but not taking its full share.
WARN_STATUSES = frozenset({"draining", "degraded"})


def row_style(status: str) -> str:
    """The rich style a fleet row is drawn in for this status ("" for none)."""
    if status in LOST_STATUSES:
        return "bold red"
    if status in WARN_STATUSES:
        return "yellow"
    return ""


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
    """What the console knows of one node: its last heartbeat and when it came.

    A node known only from discovery (`heard` False) carries a placeholder heartbeat made
    from its service metadata, and `last_seen` is when it was first discovered.

    Attributes:
        heard: whether a heartbeat ever came.
        discovered_at: when nats.micro discovery last listed one of its services.
        services: service name -> its metadata, as discovery last saw them.
    """

    heartbeat: wire.Heartbeat
    last_seen: float
    history: NodeHistory
    heard: bool = True
    discovered_at: float | None = None
    services: dict[str, dict[str, str]] = field(default_factory=dict)

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
        #: Nodes that sent a heartbeat naming another node or role (`tui.trust`).
        self.impostors: set[str] = set()

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
            node.heard = True
        node.history.append(now, heartbeat)
        return node

    def apply_discovery(
        self, node_id: str, role: str, info: Mapping[str, str], *, service: str = ""
    ) -> Node:
        """Record that nats.micro discovery lists a service of `node_id`.

        A node never heard by heartbeat gets a row (status `silent`) built from `role` and
        the metadata (`model`, `model_version`); a node already heard is only marked as
        discovered. Only `discovered_at` is refreshed, so discovery never revives `last_seen`.

        Args:
            node_id: the service's `node_id` metadata.
            role: the node's role (the service's `role` metadata, or inferred).
            info: the service's metadata.
            service: the service's name, to list it on the node.
        """
        now = self.clock()
        node = self._nodes.get(node_id)
        if node is None:
            placeholder = wire.Heartbeat(role=role, node_id=node_id)
            node = Node(placeholder, now, NodeHistory(self.history_size), heard=False)
            self._nodes[node_id] = node
        if not node.heard:
            hb = node.heartbeat
            node.heartbeat = hb.model_copy(
                update={
                    "role": role or hb.role,
                    "model": info.get("model") or hb.model,
                    "model_version": info.get("model_version") or hb.model_version,
                }
            )
        node.discovered_at = now
        node.services[service or "?"] = dict(info)
        return node

    def status(self, node: Node, now: float | None = None) -> str:
        """The node's status: reported while heard, then `stale`; `silent` while only
        discovery finds it; `gone` once both heartbeats and discovery are old."""
        now = self.clock() if now is None else now
        if node.heard:
            age = now - node.last_seen
            if age < self.stale_after:
                return node.heartbeat.status
            if age < self.gone_after:
                return "stale"
        if node.discovered_at is not None and now - node.discovered_at < self.gone_after:
            return "silent"
        return "gone"

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

    def summary(self) -> FleetSummary:
        """The whole fleet's figures now (`tui.fleet_summary.summarize`): nodes that are not
        heard count only by status."""
        now = self.clock()
        nodes = list(self._nodes.values())
        statuses = [self.status(node, now) for node in nodes]
        heard = [
            node.heartbeat
            for node, status in zip(nodes, statuses, strict=True)
            if status not in LOST_STATUSES
        ]
        return summarize(statuses, heard)
