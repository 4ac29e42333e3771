"""An edge node: the one object the HTTP app, the bus link and the benchmark use.

`EdgeNode.generate` routes and serves one request: it yields a `RouteInfo` first (where the
answer comes from and why, known before any text), then `Piece`s of text, then an
`Outcome`. The node is assembled from one module per concept:

* `edge.lifecycle`: the node's state and how it changes while it serves (the model swap,
  policy updates and the thresholds they set, the drain flag, counters, the event sink);
* `edge.route.router`: the `generate` flow, which decides where each request is served;
* `edge.route.cloud`: serving through the cloud, with the breaker, the local fallback when
  the cloud does not accept, and the local finish when it fails mid-stream;
* `edge.route.request`: the request and the items of its answer.

The request types are importable from here too.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from edge.lifecycle import NodeCounters, NodeLifecycle
from edge.route.cloud import CLOUD_DOWN, CloudBridge
from edge.route.request import EdgeRequest, Item, Outcome, Piece, RouteInfo
from edge.route.router import Router
from edge.route.rules import PolicySettings
from edge.runtime import EdgeRuntime
from edge.settings import EdgeSettings

__all__ = [
    "CLOUD_DOWN",
    "EdgeNode",
    "EdgeRequest",
    "Item",
    "NodeCounters",
    "Outcome",
    "Piece",
    "RouteInfo",
]


class EdgeNode(NodeLifecycle):
    """The serving core of an edge node: its state and its request path.

    The state (runtime, policy, breaker, bus connection, counters) is `NodeLifecycle`'s;
    requests go through the `Router`, and through the `CloudBridge` when routed to the cloud.

    The bus link (`edge.link.BusLink`) sets `nc` when connected and updates `policy`; a
    `local_only` request never touches `nc`.

    Args:
        settings: the node's settings.
        runtime: the model to serve first.
        policy: the routing policy as configured (local, fleet and node layers merged).
    """

    def __init__(
        self, settings: EdgeSettings, runtime: EdgeRuntime, policy: PolicySettings
    ) -> None:
        super().__init__(settings, runtime, policy)
        self.router = Router(self, CloudBridge(self))

    def check_model(self, model: str) -> bool:
        """Whether `model` is served only by the cloud (NotFound for unknown names)."""
        return self.router.check_model(model)

    def generate(self, request: EdgeRequest) -> AsyncGenerator[Item, None]:
        """Route and serve one request: `RouteInfo`, then `Piece`s, then an `Outcome`.

        Raises (before the RouteInfo): BadRequest, NotFound, ContextLengthExceeded,
        Overloaded (edge queue full and no cloud). Raises after it only when the answer can
        be neither finished by the cloud nor locally.
        """
        return self.router.generate(request)
