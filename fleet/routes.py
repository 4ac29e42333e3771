"""The edge's route reasons as the fleet reads them: which ones send a request to the cloud.

A heartbeat's `fallback_ratio` is keyed by these reasons; the edge's routing table
(`edge.route.rules.Reason`) names them, and the console adds them up across the fleet.
"""

from __future__ import annotations

#: Route reasons that send an edge's request to the cloud.
CLOUD_ROUTE_REASONS = frozenset(
    {
        "requested_cloud",
        "cloud_model",
        "context_overflow",
        "edge_overloaded",
        "low_confidence",
        "low_draft_confidence",
    }
)
