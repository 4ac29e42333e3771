"""The fleet summary the console's summary screen draws: pure Python, no Textual, no bus.

`summarize` reduces the nodes' statuses and heartbeats (`FleetState.summary`) to one
`FleetSummary`: requests/s entering the fleet, the share served at the edge and sent to the
cloud by route reason, the cloud workers' load, and usage by API key (summed over the API
instances and edges). `SummaryHistory` keeps the last ones as
series for plots. Apart from `tui.state` because it reads heartbeats only, never the console's
per-node bookkeeping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from broker import wire
from fleet.routes import CLOUD_ROUTE_REASONS
from serving.usage import Snapshot, sum_usage

#: Seconds over which nodes count `rps` and `errors` (`broker.telemetry.RequestStats`).
STATS_WINDOW_S = 30.0


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
    #: Usage by API key name and model, summed over every API instance and edge heard
    #: (each reports its own totals since it started: `serving.usage`).
    usage: Snapshot = field(default_factory=dict)


def summarize(statuses: Sequence[str], heartbeats: Iterable[wire.Heartbeat]) -> FleetSummary:
    """The fleet's figures from every node's status and the heartbeats of those still heard.

    Requests/s is what enters the fleet (every node but cloud workers). Edge and cloud
    shares weight each edge's route mix (`extra["routes"]` counts, else its
    `fallback_ratio`) by its rps. Cloud figures sum the cloud workers.

    Args:
        statuses: one per node, lost ones included (they count only by status).
        heartbeats: the last heartbeat of each node not lost, in node order.
    """
    heartbeats = list(heartbeats)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    total_rps = 0.0
    by_reason: dict[str, float] = {}
    cloud_reasons: set[str] = set()
    workers = queue = errors = 0
    worker_rps = 0.0
    for hb in heartbeats:
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
    # a reason an edge lists in `fallback_ratio` counts as cloud too, whatever its name
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
        nodes=len(statuses),
        statuses=dict(sorted(counts.items())),
        total_rps=total_rps,
        edge_share=(routed - to_cloud) / routed if routed else None,
        cloud_share=to_cloud / routed if routed else None,
        routes=routes,
        cloud_workers=workers,
        cloud_rps=worker_rps,
        cloud_queue_depth=queue,
        cloud_errors=errors,
        cloud_error_rate=min(1.0, errors / expected) if expected > 0 else None,
        usage=sum_usage(hb.extra.get("usage") for hb in heartbeats if hb.role != "cloud"),
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
