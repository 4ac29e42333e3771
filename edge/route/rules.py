"""Where a request is served: the pure routing policy, its settings, and the cloud breaker.

`decide` is a pure function of the request's facts, the edge's state, the cloud's health and
the policy; it does no I/O, so every rule is tested without servers. It is called twice for
an `auto` request: first without a perplexity (hard limits, load and cloud health can already
settle it), then, if it answered `Target.PREFILL`, with the prompt perplexity read from the
edge model's prefill logits, before a single token is streamed.

Route reasons (the `route_reason` every answer carries):

=====================  ========  =============================================================
reason                 served    why
=====================  ========  =============================================================
local_only             edge      the request must never leave the node
requested_edge         edge      `route: edge`
in_domain              edge      prompt perplexity at or below the threshold
edge_default           edge      no confidence rule in force (no threshold: e.g. both ends run
                                 the same weights), or nothing the perplexity can score (a
                                 one-token prompt), and nothing sent it to the cloud
confident_draft        edge      second stage: the first k drafted tokens were confident
cloud_unavailable      edge      the cloud was wanted but the breaker is open / no bus / failed
requested_cloud        cloud     `route: cloud`
cloud_model            cloud     a model only the cloud serves
context_overflow       cloud     prompt + max_tokens beyond the edge context window
edge_overloaded        cloud     predicted edge wait beyond the latency budget
low_confidence         cloud     prompt perplexity above the threshold
low_draft_confidence   cloud     second stage: the first k drafted tokens were not confident
=====================  ========  =============================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

# The policy schema is a fleet rule (`fleet.policy`); re-exported for the edge's modules.
from fleet.policy import BreakerSettings as BreakerSettings
from fleet.policy import PolicySettings as PolicySettings
from fleet.policy import merge_policy as merge_policy
from serving.context import check_fits, overflow


class Target(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"
    #: Not decided yet: prefill the prompt on the edge and decide again with its perplexity.
    PREFILL = "prefill"


class Reason(StrEnum):
    LOCAL_ONLY = "local_only"
    REQUESTED_EDGE = "requested_edge"
    IN_DOMAIN = "in_domain"
    EDGE_DEFAULT = "edge_default"
    CONFIDENT_DRAFT = "confident_draft"
    CLOUD_UNAVAILABLE = "cloud_unavailable"
    REQUESTED_CLOUD = "requested_cloud"
    CLOUD_MODEL = "cloud_model"
    CONTEXT_OVERFLOW = "context_overflow"
    EDGE_OVERLOADED = "edge_overloaded"
    LOW_CONFIDENCE = "low_confidence"
    LOW_DRAFT_CONFIDENCE = "low_draft_confidence"
    PENDING = "pending"


ThresholdSource = Literal["policy", "model_set", "off"]


def effective_threshold(
    policy: PolicySettings, calibrated: float | None
) -> tuple[float, ThresholdSource]:
    """The perplexity threshold in force and where it comes from. Pure.

    An explicit policy value always wins (a very large one disables the rule); otherwise the
    model set's calibrated threshold applies; without one the rule is off (inf).
    """
    if policy.perplexity_threshold is not None:
        return policy.perplexity_threshold, "policy"
    if calibrated is not None and math.isfinite(calibrated) and calibrated > 0:
        return calibrated, "model_set"
    return math.inf, "off"


def length_threshold(
    routing: Mapping[str, object] | None, scored_tokens: int, *, chat: bool = False
) -> float | None:
    """The model set's calibrated threshold for a prompt of `scored_tokens` scored tokens. Pure.

    `routing` is the manifest's `routing` section. A calibrated `signal` decides when the
    section has one (`signal_threshold`; `chat`: the prompt is a chat message); otherwise
    its `thresholds_by_length` buckets
    (`max_tokens` ascending, None for the last, open one) are searched for the first with
    `scored_tokens <= max_tokens`; that bucket's threshold applies when it has one, else the
    overall `perplexity_threshold` (also for sets calibrated before buckets existed).
    """
    if not routing:
        return None
    by_signal = signal_threshold(routing, scored_tokens, chat=chat)
    if by_signal is not None:
        return by_signal
    overall = _positive(routing.get("perplexity_threshold"))
    buckets = routing.get("thresholds_by_length")
    if not isinstance(buckets, list):
        return overall
    for bucket in buckets:
        if not isinstance(bucket, Mapping):
            continue
        most = bucket.get("max_tokens")
        if most is None or (isinstance(most, int | float) and scored_tokens <= most):
            found = _positive(bucket.get("threshold"))
            return found if found is not None else overall
    return overall


#: Signals a model set's calibration may choose (`routing.signal`, models.lab.calibration_eval).
ROUTING_SIGNALS = ("prompt_perplexity", "perplexity_by_length", "prefill_learned")


def signal_threshold(
    routing: Mapping[str, object], scored_tokens: int, *, chat: bool = False
) -> float | None:
    """The perplexity threshold a calibrated routing `signal` sets for one prompt. Pure.

    `exp(signal_threshold + length_intercept + length_slope * ln(scored_tokens) +
    chat_offset * chat)`: constant for `prompt_perplexity`; for `perplexity_by_length` and
    `prefill_learned` it follows the prompt's length and kind (short prompts and chat
    messages score high whatever their domain). Missing terms count 0. None for sets
    calibrated without a signal (they route by `thresholds_by_length`).
    """
    signal = routing.get("signal")
    threshold = routing.get("signal_threshold")
    if signal not in ROUTING_SIGNALS or not isinstance(threshold, int | float):
        return None

    def term(name: str) -> float:
        value = routing.get(name)
        return float(value) if isinstance(value, int | float) else 0.0

    log_threshold = float(threshold) + term("length_intercept")
    log_threshold += term("length_slope") * math.log(max(1, scored_tokens))
    log_threshold += term("chat_offset") if chat else 0.0
    return math.exp(min(log_threshold, 700.0))


def _positive(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number > 0:
            return number
    return None


def with_threshold(policy: PolicySettings, calibrated: float | None) -> PolicySettings:
    """`policy` with its effective perplexity threshold filled in (see effective_threshold)."""
    threshold, _ = effective_threshold(policy, calibrated)
    return policy.model_copy(update={"perplexity_threshold": threshold})


@dataclass(frozen=True)
class RequestFacts:
    """What the router knows about one request before generating."""

    prompt_tokens: int
    #: None: until the model stops or the context is full (`serving.context`).
    max_tokens: int | None
    route: Literal["auto", "edge", "cloud"] = "auto"
    local_only: bool = False
    #: The model asked for is served by the cloud only (e.g. "hg-cloud").
    cloud_only_model: bool = False
    #: The request's input field, named when the prompt alone fills the window.
    input_field: str = "messages"


@dataclass(frozen=True)
class EdgeState:
    context_length: int
    predicted_wait_s: float = 0.0


@dataclass(frozen=True)
class Decision:
    target: Target
    reason: Reason
    #: max_tokens to use on the edge (clipped to the context window when the cloud was
    #: wanted for an overflow but is unavailable).
    max_tokens: int | None = None

    @property
    def served_by(self) -> str:
        return "cloud" if self.target is Target.CLOUD else "edge"


def decide(
    facts: RequestFacts,
    edge: EdgeState,
    policy: PolicySettings,
    *,
    cloud_available: bool,
    perplexity: float | None = None,
    prefilled: bool = False,
) -> Decision:
    """Decide where one request is served. Pure: no I/O, no clock.

    Args:
        facts: the request.
        edge: the edge's context window and predicted wait.
        policy: the thresholds; an unset `perplexity_threshold` counts as off (the node
            fills in the model set's calibrated one first, see `with_threshold`).
        cloud_available: the breaker allows a cloud request and the bus is connected
            (always pass False for a `local_only` request: it never leaves the node).
        perplexity: the edge model's prompt perplexity, once prefilled.
        prefilled: the prompt was prefilled: a None `perplexity` then means nothing could be
            scored (a one-token prompt), so no confidence can be judged (`edge_default`).

    Returns:
        The decision; `Target.PREFILL` asks the caller to prefill on the edge and call
        again with the perplexity.

    Raises:
        ContextLengthExceeded: the request cannot be served anywhere it may go (a
            `local_only` or `route: edge` request, or a prompt that alone fills the edge
            context while the cloud is unavailable).
    """
    window, field = edge.context_length, facts.input_field
    fits = overflow(facts.prompt_tokens, facts.max_tokens, window, input_field=field) is None

    def edge_only(reason: Reason) -> Decision:
        check_fits(facts.prompt_tokens, facts.max_tokens, window, input_field=field,
                   why=" (the edge's) and the request may not leave the node")  # fmt: skip
        return Decision(Target.EDGE, reason, facts.max_tokens)

    def to_cloud(reason: Reason) -> Decision:
        if cloud_available:
            return Decision(Target.CLOUD, reason, facts.max_tokens)
        if fits:
            return Decision(Target.EDGE, Reason.CLOUD_UNAVAILABLE, facts.max_tokens)
        # Too long for the edge with its max_tokens: the edge answers what fits, if anything.
        check_fits(facts.prompt_tokens, None, window, input_field=field,
                   why=" (the edge's) and the cloud is unavailable")  # fmt: skip
        return Decision(Target.EDGE, Reason.CLOUD_UNAVAILABLE, window - facts.prompt_tokens)

    # Hard limits.
    if facts.local_only:
        return edge_only(Reason.LOCAL_ONLY)
    if facts.route == "edge":
        return edge_only(Reason.REQUESTED_EDGE)
    if facts.route == "cloud":
        return to_cloud(Reason.REQUESTED_CLOUD)
    if facts.cloud_only_model:
        return to_cloud(Reason.CLOUD_MODEL)
    if not fits:
        return to_cloud(Reason.CONTEXT_OVERFLOW)
    # Load.
    if edge.predicted_wait_s * 1000.0 > policy.latency_budget_ms:
        return to_cloud(Reason.EDGE_OVERLOADED)
    # Confidence (an unset threshold is off here: the caller fills in a calibrated one).
    threshold = policy.perplexity_threshold
    if threshold is None:
        threshold = math.inf
    if math.isinf(threshold) and policy.second_stage_k == 0:
        return Decision(Target.EDGE, Reason.EDGE_DEFAULT, facts.max_tokens)
    if perplexity is None:
        if prefilled:  # nothing to score: served as with no rule (a second stage still runs)
            return Decision(Target.EDGE, Reason.EDGE_DEFAULT, facts.max_tokens)
        return Decision(Target.PREFILL, Reason.PENDING, facts.max_tokens)
    if perplexity > threshold:
        return to_cloud(Reason.LOW_CONFIDENCE)
    return Decision(Target.EDGE, Reason.IN_DOMAIN, facts.max_tokens)


def decide_after_draft(
    draft_logprobs: list[float], policy: PolicySettings, *, cloud_available: bool
) -> Decision:
    """Second stage: after `k` drafted tokens (not shown to the client), stay or escalate.

    The draft is discarded when escalating, so nothing the client saw is contradicted.
    """
    if not draft_logprobs:  # the answer ended before the first token: nothing to judge
        return Decision(Target.EDGE, Reason.CONFIDENT_DRAFT)
    mean = sum(draft_logprobs) / len(draft_logprobs)
    if mean >= policy.draft_logprob_threshold:
        return Decision(Target.EDGE, Reason.CONFIDENT_DRAFT)
    if not cloud_available:
        return Decision(Target.EDGE, Reason.CLOUD_UNAVAILABLE)
    return Decision(Target.CLOUD, Reason.LOW_DRAFT_CONFIDENCE)


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Cloud health: opens after consecutive failures, probes after a cool-down.

    Fed by timeouts, no-responders and `overloaded` replies (`record_failure`) and by
    successful cloud answers (`record_success`). While open, `allow()` is False and requests
    stay local (`cloud_unavailable`); after `open_seconds` it turns half-open and lets
    `half_open_probes` requests through: a success closes it, a failure reopens it.

    Args:
        settings: thresholds (replace `settings` live; it is read on every call).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self, settings: BreakerSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.settings.open_seconds:
            self._state = "half_open"
            self._probes = 0
        return self._state

    def available(self) -> bool:
        """Whether a cloud request would be let through now (does not take a probe slot)."""
        state = self.state
        return state == "closed" or (
            state == "half_open" and self._probes < self.settings.half_open_probes
        )

    def allow(self) -> bool:
        """Take permission for one cloud request (a probe slot while half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._probes < self.settings.half_open_probes:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probes = 0

    def record_failure(self) -> None:
        state = self.state
        self._failures += 1
        if state == "half_open" or self._failures >= self.settings.failure_threshold:
            if state != "open":
                self.opened_count += 1
            self._state = "open"
            self._opened_at = self._clock()
            self._probes = 0

    def release(self) -> None:
        """Give back a probe slot taken by `allow()` when the request never went out."""
        if self._state == "half_open" and self._probes > 0:
            self._probes -= 1
