"""The console's model of the fleet: pure Python, no Textual, no bus.

Heartbeats, discovered services and events go in (`FleetState.apply_heartbeat`,
`FleetState.apply_discovery`, `EventLog.add`); sorted and filtered rows, per-node history,
the fleet summary and filtered events come out. Times are the console's own clock at receipt
(`clock`, monotonic by default), never the node's `ts`, so a node with a skewed clock is
judged by when it was last heard.

A node's status is its reported one while its heartbeats are fresh; then `stale`, then
`gone` (pruned). A node that answers nats.micro discovery but sends no heartbeats is
`silent`; discovery alone never keeps it longer than `gone_after` after the last answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
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

#: Statuses drawn in bold red across the row: the console no longer hears the node.
LOST_STATUSES = frozenset({"stale", "gone", "silent"})
#: Statuses drawn in yellow: the node is up but not taking its full share.
WARN_STATUSES = frozenset({"draining", "degraded"})

#: Route reasons that send a request to the cloud (`broker.wire.CLOUD_ROUTE_REASONS`); a
#: reason an edge lists in `fallback_ratio` counts as cloud too, whatever its name.
CLOUD_ROUTE_REASONS = wire.CLOUD_ROUTE_REASONS
#: Seconds over which nodes count `rps` and `errors` (`broker.telemetry.RequestStats`).
STATS_WINDOW_S = 30.0


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
        """The whole fleet's figures now (nodes that are not heard count only by status).

        Requests/s is what enters the fleet (every node but cloud workers). Edge and cloud
        shares weight each edge's route mix (`extra["routes"]` counts, else its
        `fallback_ratio`) by its rps. Cloud figures sum the cloud workers.
        """
        now = self.clock()
        statuses: dict[str, int] = {}
        total_rps = 0.0
        by_reason: dict[str, float] = {}
        cloud_reasons: set[str] = set()
        workers = queue = errors = 0
        worker_rps = 0.0
        for node in self._nodes.values():
            status = self.status(node, now)
            statuses[status] = statuses.get(status, 0) + 1
            if status in LOST_STATUSES:
                continue
            hb = node.heartbeat
            if hb.role == "cloud":
                workers += 1
                worker_rps += hb.rps
                queue += hb.queue_depth
                errors += hb.errors
                continue
            total_rps += hb.rps
            if hb.role != "edge" or hb.rps <= 0:
                continue
            cloud_reasons.update(hb.fallback_ratio)
            for reason, share in route_mix(hb).items():
                by_reason[reason] = by_reason.get(reason, 0.0) + share * hb.rps
        routed = sum(by_reason.values())
        cloud_reasons |= CLOUD_ROUTE_REASONS
        routes = tuple(
            RouteShare(
                reason=reason,
                served="cloud" if reason in cloud_reasons else "edge",
                rps=rps,
                share=rps / routed,
            )
            for reason, rps in sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
            if rps > 0
        )
        to_cloud = sum(r.rps for r in routes if r.served == "cloud")
        expected = worker_rps * STATS_WINDOW_S
        return FleetSummary(
            nodes=len(self._nodes),
            statuses=dict(sorted(statuses.items())),
            total_rps=total_rps,
            edge_share=(routed - to_cloud) / routed if routed else None,
            cloud_share=to_cloud / routed if routed else None,
            routes=routes,
            cloud_workers=workers,
            cloud_rps=worker_rps,
            cloud_queue_depth=queue,
            cloud_errors=errors,
            cloud_error_rate=min(1.0, errors / expected) if expected > 0 else None,
        )


def route_mix(heartbeat: wire.Heartbeat) -> dict[str, float]:
    """An edge's requests by route reason, as shares summing to 1.

    From `extra["routes"]` (counts by reason) when it has any; else from `fallback_ratio`
    (cloud reasons), the rest counted as `edge` (reason unknown). Empty when neither says.
    """
    counts = heartbeat.extra.get("routes")
    if isinstance(counts, dict):
        valid = {
            str(reason): float(count)
            for reason, count in counts.items()
            if isinstance(count, int | float) and not isinstance(count, bool) and count > 0
        }
        total = sum(valid.values())
        if total > 0:
            return {reason: count / total for reason, count in valid.items()}
    if not heartbeat.fallback_ratio:
        return {}
    mix = {r: min(1.0, max(0.0, s)) for r, s in heartbeat.fallback_ratio.items()}
    rest = 1.0 - sum(mix.values())
    if rest > 0:
        mix["edge"] = mix.get("edge", 0.0) + rest
    return {reason: share for reason, share in mix.items() if share > 0}


@dataclass(frozen=True)
class RouteShare:
    """One route reason across the fleet's edges."""

    reason: str
    #: Where requests with this reason are served: `edge` or `cloud`.
    served: str
    #: Requests/s with this reason (each edge's share weighted by its rps).
    rps: float
    #: Share of all routed edge requests.
    share: float


@dataclass(frozen=True)
class FleetSummary:
    """The fleet at one instant, for the summary screen (see `FleetState.summary`)."""

    nodes: int
    #: Nodes by status (`stale`, `silent`, ... included).
    statuses: dict[str, int]
    #: Requests/s entering the fleet (every heard node but cloud workers).
    total_rps: float
    #: Share of edge requests served at the edge / sent to the cloud (None: no traffic).
    edge_share: float | None
    cloud_share: float | None
    #: Route reasons, busiest first.
    routes: tuple[RouteShare, ...]
    cloud_workers: int
    cloud_rps: float
    cloud_queue_depth: int
    #: Failed requests the cloud workers report (in their stats window).
    cloud_errors: int
    #: Failed share of the cloud workers' requests (None: no cloud traffic).
    cloud_error_rate: float | None


class SummaryHistory:
    """The last `size` fleet summaries as series for plots, oldest first.

    The console samples it on every refresh tick (0.5 s: 600 samples are 5 minutes).
    """

    SERIES: tuple[str, ...] = ("total_rps", "edge_share", "cloud_queue_depth", "cloud_error_rate")

    def __init__(self, size: int = 600) -> None:
        if size < 1:
            raise ValueError("a summary history needs at least one sample")
        self.size = size
        self.at: deque[float] = deque(maxlen=size)
        self.series: dict[str, deque[float]] = {name: deque(maxlen=size) for name in self.SERIES}
        #: The latest summary sampled, if any.
        self.latest: FleetSummary | None = None

    def __len__(self) -> int:
        return len(self.at)

    def sample(self, summary: FleetSummary, at: float) -> None:
        """Append one summary taken at `at` (unknown shares and rates count as 0)."""
        self.latest = summary
        self.at.append(at)
        self.series["total_rps"].append(summary.total_rps)
        self.series["edge_share"].append(summary.edge_share or 0.0)
        self.series["cloud_queue_depth"].append(float(summary.cloud_queue_depth))
        self.series["cloud_error_rate"].append(summary.cloud_error_rate or 0.0)


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
