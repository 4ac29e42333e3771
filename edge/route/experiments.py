"""An edge node's side of an A/B experiment (`fleet.experiment`): which variant serves each
request, the variant's extra runtime, and the figures per variant its heartbeat reports.

The bus link hands the experiment from `hg_config` to `EdgeService.apply_experiment`, which
loads the edge variant's model set (at most one extra runtime) and sets it here; until it is
loaded, requests that hash to that variant stay `control`. The router asks `assign` for each
request and reports its end to `record`.

Feedback (`POST /v1/users/{id}/feedback`) counts for the variant that served the user's last
request on this node (a `UserListener`); feedback from a user with no request since the
experiment started is not counted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from broker.telemetry import RequestStats
from fleet.experiment import CONTROL, Experiment

if TYPE_CHECKING:
    from edge.route.request import EdgeRequest
    from edge.runtime import EdgeRuntime

#: Users whose last variant is remembered (for feedback), the least recent forgotten first.
MAX_USERS = 10_000
#: Seconds of requests the latency and tokens/s figures cover.
WINDOW_S = 60.0


@dataclass
class VariantFigures:
    """One variant's figures on this node since the experiment started."""

    stats: RequestStats = field(default_factory=lambda: RequestStats(WINDOW_S))
    requests: int = 0
    errors: int = 0
    cloud: int = 0
    feedback_accepted: int = 0
    feedback_rejected: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The figures a heartbeat carries (`fleet.experiment.FIGURES`)."""
        window = self.stats.snapshot()
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "latency_p50_ms": window["latency_p50_ms"],
            "latency_p95_ms": window["latency_p95_ms"],
            "tokens_per_s": round(float(window["tokens_per_s"]), 3),
            "cloud_share": self.cloud / self.requests if self.requests else 0.0,
            "feedback_accepted": self.feedback_accepted,
            "feedback_rejected": self.feedback_rejected,
        }


class ExperimentState:
    """The experiment in force on one node, its edge variant's runtime and its figures."""

    def __init__(self) -> None:
        self.experiment: Experiment | None = None
        #: The edge variant's model, once loaded (`EdgeService.apply_experiment`).
        self.edge_runtime: EdgeRuntime | None = None
        self.figures: dict[str, VariantFigures] = {}
        self._last_variant: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # feedback arrives from worker threads

    def set(self, experiment: Experiment | None) -> None:
        """Put `experiment` in force (None: none); figures restart with a new experiment."""
        with self._lock:
            old = self.experiment
            if experiment is None or old is None or old.name != experiment.name:
                self.figures = {}
                self._last_variant.clear()
            self.experiment = experiment

    def assign(self, request: EdgeRequest) -> tuple[EdgeRequest, EdgeRuntime | None]:
        """The request with its `variant` (and a cloud variant's `cloud_model`) set, and the
        runtime to serve it locally with (None: the node's own).

        Without an experiment the request is returned as it is.
        """
        experiment = self.experiment
        if experiment is None:
            return request, None
        # Every choice of one answer (`answer_id`) gets the same variant.
        variant = experiment.assign(request.user or request.answer_id or request.request_id)
        runtime = None
        if variant is not None and variant.edge_version is not None:
            runtime = self.edge_runtime
            if runtime is None:  # not loaded (yet): the node's own model serves it
                variant = None
        if variant is None:
            return replace(request, variant=CONTROL), None
        return replace(request, variant=variant.name, cloud_model=variant.cloud_model), runtime

    def record(
        self,
        request: EdgeRequest,
        *,
        latency_s: float,
        tokens: int = 0,
        served_by: str | None = None,
        error: bool = False,
    ) -> None:
        """Count one finished (or failed) request of the variant `request.variant`."""
        name = request.variant
        if name is None or self.experiment is None:
            return
        with self._lock:
            figures = self.figures.setdefault(name, VariantFigures())
            figures.requests += 1
            figures.errors += int(error)
            figures.cloud += int(served_by == "cloud")
            figures.stats.record(latency_s, tokens, error)
            if request.user:
                self._last_variant[request.user] = name
                self._last_variant.move_to_end(request.user)
                while len(self._last_variant) > MAX_USERS:
                    self._last_variant.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """`{"experiment": name | None, "variants": {variant: figures}}` for the heartbeat."""
        with self._lock:
            experiment = self.experiment
            variants = {name: f.as_dict() for name, f in self.figures.items()}
        return {"experiment": None if experiment is None else experiment.name, "variants": variants}

    # ------------------------------------------------------------- UserListener

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        """Count a user's feedback for the variant that served their last request."""
        with self._lock:
            name = self._last_variant.get(user_id)
            if name is None or self.experiment is None:
                return
            figures = self.figures.setdefault(name, VariantFigures())
            figures.feedback_accepted += 1
            figures.feedback_rejected += int(rejected is not None)

    def on_forget(self, user_id: str) -> None:
        """A reset or deleted user: forget which variant served them."""
        with self._lock:
            self._last_variant.pop(user_id, None)
