"""An edge node's state and how it changes while it serves.

`EdgeNode` holds what every request reads: the runtime (the model served), the policy
in force and the perplexity thresholds derived from it, the cloud breaker, the bus
connection, the drain flag, the counters and the event sink. The bus link
(`edge.link.BusLink`) and the model reload change it while requests are in flight: the link
sets `nc` when connected, applies policy updates (`set_policy`) and the drain flag; a reload
swaps the runtime (`swap_runtime`). Requests already running keep the runtime they started
with.

`policy` is the merged policy as configured (local, fleet, node); `routing_policy` is what
requests are routed with: the same, with the model set's calibrated perplexity threshold
(`manifest.json` -> `routing`) filled in when the policy leaves it unset. Both thresholds
are recomputed when the policy changes and when the model is swapped.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.telemetry import RequestStats
from edge.route.experiments import ExperimentState
from edge.route.rules import (
    CircuitBreaker,
    Decision,
    PolicySettings,
    ThresholdSource,
    effective_threshold,
    length_threshold,
    with_threshold,
)
from edge.runtime import EdgeRuntime
from edge.settings import EdgeSettings
from models.manifest import routing_calibration

if TYPE_CHECKING:
    from nats.aio.client import Client

logger = logging.getLogger(__name__)


@dataclass
class NodeCounters:
    """Figures for telemetry and /metrics."""

    stats: RequestStats = field(default_factory=RequestStats)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    cloud_failures: int = 0
    mid_stream_recoveries: int = 0
    errors: int = 0


class EdgeNode:
    """The state of an edge node and the changes made to it while it serves.

    Args:
        settings: the node's settings.
        runtime: the model to serve first.
        policy: the routing policy as configured (local, fleet and node layers merged).
    """

    def __init__(
        self, settings: EdgeSettings, runtime: EdgeRuntime, policy: PolicySettings
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.policy = policy
        self.calibration: dict[str, Any] | None = routing_calibration(runtime.model_dir)
        self.routing_policy = policy
        runtime.speculative = policy.speculative
        self.perplexity_threshold = float("inf")
        self.threshold_source: ThresholdSource = "off"
        self._resolve_threshold()
        self.breaker = CircuitBreaker(policy.breaker)
        self.nc: Client | None = None
        self.node_id = settings.node_id or "edge"
        self.counters = NodeCounters()
        self.draining = False
        self._event_sink: Any = None
        #: The A/B experiment in force here and its figures (`edge.route.experiments`).
        self.experiments = ExperimentState()

    # -------------------------------------------------------------- thresholds

    @property
    def calibrated_threshold(self) -> float | None:
        """The served model set's calibrated perplexity threshold, if it has one."""
        value = (self.calibration or {}).get("perplexity_threshold")
        return float(value) if value is not None else None

    @property
    def routing_signal(self) -> str | None:
        """The model set's calibrated routing signal, described for the console, if any.

        For example `perplexity_by_length (recovers 80% of the gap, ~32% to the cloud)`; None
        for sets calibrated before signals existed (they route by length buckets).
        """
        routing = self.calibration or {}
        signal = routing.get("signal")
        if not isinstance(signal, str):
            return None
        target, share = routing.get("target_recovered"), routing.get("expected_cloud_share")
        if isinstance(target, int | float) and isinstance(share, int | float):
            return f"{signal} (recovers {target:.0%} of the gap, ~{share:.0%} to the cloud)"
        return signal

    def threshold_for(
        self, scored_tokens: int, *, chat: bool = False
    ) -> tuple[float, ThresholdSource]:
        """Threshold in force for a prompt of `scored_tokens` scored tokens, and its source.

        The policy's value when set (all lengths); else the model set's calibrated signal
        at that length for a chat message (`chat`) or a completion, or its length bucket
        (`edge.route.rules.length_threshold`).
        """
        calibrated = length_threshold(self.calibration, scored_tokens, chat=chat)
        return effective_threshold(self.policy, calibrated)

    def _resolve_threshold(self) -> None:
        calibrated = self.calibrated_threshold
        self.perplexity_threshold, self.threshold_source = effective_threshold(
            self.policy, calibrated
        )
        self.routing_policy = with_threshold(self.policy, calibrated)

    # ------------------------------------------------------------------ changes

    def set_policy(self, policy: PolicySettings) -> None:
        """Apply a new policy now (the breaker keeps its state, takes the new thresholds)."""
        self.policy = policy
        self.runtime.speculative = policy.speculative
        self.breaker.settings = policy.breaker
        self._resolve_threshold()
        logger.info(
            "routing policy now %s; perplexity threshold %s (%s)",
            policy.model_dump(),
            self.perplexity_threshold,
            self.threshold_source,
        )

    def swap_runtime(self, runtime: EdgeRuntime) -> EdgeRuntime:
        """Serve new requests from `runtime`; returns the old one (still finishing its own).

        The new model's calibrated threshold applies from now on where the policy sets none.
        """
        calibration = routing_calibration(runtime.model_dir)
        old, self.runtime = self.runtime, runtime
        runtime.speculative = self.policy.speculative
        self.calibration = calibration
        self._resolve_threshold()
        logger.info(
            "model %s: perplexity threshold %s (%s)",
            runtime.version,
            self.perplexity_threshold,
            self.threshold_source,
        )
        return old

    # ----------------------------------------------------------------- the cloud

    @property
    def bus_connected(self) -> bool:
        """Whether the bus link holds a live connection."""
        return self.nc is not None and self.nc.is_connected

    def cloud_available(self) -> bool:
        """Whether a request may go to the cloud now (cloud on, bus up, breaker letting by)."""
        return not self.settings.no_cloud and self.bus_connected and self.breaker.available()

    # ------------------------------------------------------ counters and events

    def set_event_sink(self, sink: Any) -> None:
        """`sink(kind, message, request_id, **data)` publishes an event (set by the link)."""
        self._event_sink = sink

    def publish_event(self, kind: str, message: str, request_id: str | None, **data: Any) -> None:
        """Hand an event to the sink; dropped while no sink is set (no bus yet)."""
        if self._event_sink is not None:
            self._event_sink(kind, message, request_id, **data)

    def record_route(self, decision: Decision) -> None:
        """Count a request by its route reason and by where it is served."""
        self.counters.by_reason[decision.reason.value] += 1
        self.counters.by_target[decision.served_by] += 1
