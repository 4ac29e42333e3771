"""The edge's routing policy and circuit breaker, without servers."""

from __future__ import annotations

import math

import pytest

from broker.errors import ContextLengthExceeded
from edge.route.rules import (
    CircuitBreaker,
    Decision,
    EdgeState,
    Reason,
    RequestFacts,
    Target,
    decide,
    decide_after_draft,
    effective_threshold,
    length_threshold,
    with_threshold,
)
from fleet.policy import BreakerSettings, PolicySettings, merge_policy

EDGE = EdgeState(context_length=128, predicted_wait_s=0.0)
POLICY = PolicySettings(perplexity_threshold=50.0, latency_budget_ms=500.0)


def route(facts: RequestFacts, *, edge=EDGE, policy=POLICY, cloud=True, ppl=None) -> Decision:
    return decide(facts, edge, policy, cloud_available=cloud, perplexity=ppl)


# ------------------------------------------------------------------------- hard limits


def test_overflow_goes_to_cloud() -> None:
    decision = route(RequestFacts(prompt_tokens=100, max_tokens=29))
    assert (decision.target, decision.reason) == (Target.CLOUD, Reason.CONTEXT_OVERFLOW)
    assert decision.served_by == "cloud"


def test_exact_fit_stays_for_perplexity() -> None:
    decision = route(RequestFacts(prompt_tokens=100, max_tokens=28))
    assert decision.target is Target.PREFILL


def test_route_cloud_and_cloud_model_go_to_cloud() -> None:
    assert route(RequestFacts(5, 5, route="cloud")).reason is Reason.REQUESTED_CLOUD
    assert route(RequestFacts(5, 5, cloud_only_model=True)).reason is Reason.CLOUD_MODEL
    assert route(RequestFacts(5, 5, route="cloud")).target is Target.CLOUD


def test_local_only_always_edge_even_when_cloud_would_win() -> None:
    facts = RequestFacts(5, 5, route="cloud", local_only=True, cloud_only_model=True)
    busy = EdgeState(context_length=128, predicted_wait_s=100.0)
    decision = route(facts, edge=busy, ppl=1e6)
    assert (decision.target, decision.reason) == (Target.EDGE, Reason.LOCAL_ONLY)


def test_local_only_overflow_is_an_error() -> None:
    with pytest.raises(ContextLengthExceeded):
        route(RequestFacts(120, 20, local_only=True))


def test_route_edge_is_forced_and_overflow_is_an_error() -> None:
    decision = route(RequestFacts(5, 5, route="edge"), ppl=1e6)
    assert (decision.target, decision.reason) == (Target.EDGE, Reason.REQUESTED_EDGE)
    with pytest.raises(ContextLengthExceeded):
        route(RequestFacts(120, 20, route="edge"))


# -------------------------------------------------------------------------------- load


def test_predicted_wait_beyond_budget_goes_to_cloud() -> None:
    busy = EdgeState(context_length=128, predicted_wait_s=0.6)
    assert route(RequestFacts(5, 5), edge=busy).reason is Reason.EDGE_OVERLOADED
    calm = EdgeState(context_length=128, predicted_wait_s=0.4)
    assert route(RequestFacts(5, 5), edge=calm).target is Target.PREFILL


# -------------------------------------------------------------------------- confidence


def test_perplexity_threshold() -> None:
    facts = RequestFacts(5, 5)
    assert route(facts).target is Target.PREFILL
    high = route(facts, ppl=50.01)
    assert (high.target, high.reason) == (Target.CLOUD, Reason.LOW_CONFIDENCE)
    low = route(facts, ppl=50.0)
    assert (low.target, low.reason) == (Target.EDGE, Reason.IN_DOMAIN)


def test_infinite_threshold_skips_prefill_wait() -> None:
    policy = PolicySettings(perplexity_threshold=math.inf)
    decision = route(RequestFacts(5, 5), policy=policy)
    assert (decision.target, decision.reason) == (Target.EDGE, Reason.EDGE_DEFAULT)


def test_second_stage_needs_a_prefill_even_without_threshold() -> None:
    policy = PolicySettings(second_stage_k=4)
    assert route(RequestFacts(5, 5), policy=policy).target is Target.PREFILL
    after = route(RequestFacts(5, 5), policy=policy, ppl=1e9)
    assert (after.target, after.reason) == (Target.EDGE, Reason.IN_DOMAIN)


def test_second_stage() -> None:
    policy = PolicySettings(second_stage_k=4, draft_logprob_threshold=-2.0)
    low = decide_after_draft([-3.0, -2.5, -1.0, -4.0], policy, cloud_available=True)
    assert (low.target, low.reason) == (Target.CLOUD, Reason.LOW_DRAFT_CONFIDENCE)
    ok = decide_after_draft([-0.5, -1.0], policy, cloud_available=True)
    assert (ok.target, ok.reason) == (Target.EDGE, Reason.CONFIDENT_DRAFT)
    down = decide_after_draft([-9.0], policy, cloud_available=False)
    assert (down.target, down.reason) == (Target.EDGE, Reason.CLOUD_UNAVAILABLE)
    fine = decide_after_draft([-0.1], policy, cloud_available=False)
    assert (fine.target, fine.reason) == (Target.EDGE, Reason.CONFIDENT_DRAFT)
    empty = decide_after_draft([], policy, cloud_available=True)
    assert empty.target is Target.EDGE


# ------------------------------------------------------------------------ cloud health


@pytest.mark.parametrize(
    "facts",
    [RequestFacts(5, 5, route="cloud"), RequestFacts(5, 5, cloud_only_model=True)],
)
def test_cloud_unavailable_stays_local(facts: RequestFacts) -> None:
    decision = route(facts, cloud=False)
    assert (decision.target, decision.reason) == (Target.EDGE, Reason.CLOUD_UNAVAILABLE)


def test_cloud_unavailable_low_confidence_and_overload_stay_local() -> None:
    assert route(RequestFacts(5, 5), cloud=False, ppl=1e6).reason is Reason.CLOUD_UNAVAILABLE
    busy = EdgeState(context_length=128, predicted_wait_s=10.0)
    assert route(RequestFacts(5, 5), edge=busy, cloud=False).reason is Reason.CLOUD_UNAVAILABLE
    # An in-domain prompt keeps its own reason.
    assert route(RequestFacts(5, 5), cloud=False, ppl=1.0).reason is Reason.IN_DOMAIN


def test_overflow_with_cloud_down_clips_max_tokens_or_fails() -> None:
    decision = route(RequestFacts(100, 64), cloud=False)
    assert (decision.target, decision.reason) == (Target.EDGE, Reason.CLOUD_UNAVAILABLE)
    assert decision.max_tokens == 28
    with pytest.raises(ContextLengthExceeded):
        route(RequestFacts(128, 8), cloud=False)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_open_probe_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_seconds=5), clock=clock)
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure()
    breaker.record_success()  # a success resets the count
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow() and not breaker.available()
    clock.now = 5.0
    assert breaker.state == "half_open" and breaker.available()
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    assert breaker.opened_count == 1


def test_breaker_failed_probe_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, open_seconds=1), clock=clock)
    breaker.record_failure()
    clock.now = 1.5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now = 2.0
    assert breaker.state == "open"
    clock.now = 2.6
    assert breaker.state == "half_open"
    assert breaker.allow()
    breaker.release()  # the probe never went out: the slot is free again
    assert breaker.allow()


def test_merge_policy_node_overrides_fleet() -> None:
    fleet = {"perplexity_threshold": 80, "breaker": {"failure_threshold": 5, "open_seconds": 9}}
    node = {"perplexity_threshold": 20, "breaker": {"open_seconds": 1}, "unknown": 1}
    policy = merge_policy(fleet, None, node)
    assert policy.perplexity_threshold == 20
    assert policy.breaker.failure_threshold == 5 and policy.breaker.open_seconds == 1
    assert merge_policy().latency_budget_ms == PolicySettings().latency_budget_ms


# ------------------------------------------------------------ calibrated default threshold


def test_unset_threshold_uses_the_model_sets_calibration() -> None:
    unset = merge_policy({"latency_budget_ms": 900})
    assert unset.perplexity_threshold is None
    assert effective_threshold(unset, 120.5) == (120.5, "model_set")
    assert effective_threshold(unset, None) == (math.inf, "off")
    assert effective_threshold(unset, math.nan) == (math.inf, "off")
    filled = with_threshold(unset, 120.5)
    assert filled.perplexity_threshold == 120.5 and filled.latency_budget_ms == 900
    facts = RequestFacts(5, 5)
    assert route(facts, policy=filled, ppl=121).reason is Reason.LOW_CONFIDENCE
    assert route(facts, policy=filled, ppl=120).reason is Reason.IN_DOMAIN
    # decide() itself treats an unset threshold as off: no prefill wait, and the answer does
    # not claim a confidence it never measured.
    assert route(facts, policy=unset).reason is Reason.EDGE_DEFAULT


def test_explicit_policy_threshold_beats_the_calibration() -> None:
    fleet = merge_policy({"perplexity_threshold": 1e9})
    assert effective_threshold(fleet, 120.5) == (1e9, "policy")
    assert route(RequestFacts(5, 5), policy=with_threshold(fleet, 120.5), ppl=500).reason is (
        Reason.IN_DOMAIN
    )
    node = merge_policy({"perplexity_threshold": 80}, {"perplexity_threshold": 30})
    assert effective_threshold(node, 120.5) == (30, "policy")
    # A layer that sets it back to null hands it to the model set again.
    cleared = merge_policy({"perplexity_threshold": 80}, {"perplexity_threshold": None})
    assert effective_threshold(cleared, 120.5) == (120.5, "model_set")
    with pytest.raises(ValueError):
        merge_policy({"perplexity_threshold": 0})


ROUTING = {
    "perplexity_threshold": 300.0,
    "thresholds_by_length": [
        {"max_tokens": 12, "threshold": 1000.0, "auc": 0.75},
        {"max_tokens": 24, "threshold": None, "auc": None},
        {"max_tokens": 48, "threshold": 320.0, "auc": 0.84},
        {"max_tokens": None, "threshold": 330.0, "auc": 0.85},
    ],
}


def test_length_bucket_threshold_by_scored_tokens() -> None:
    assert length_threshold(ROUTING, 1) == length_threshold(ROUTING, 12) == 1000.0
    assert length_threshold(ROUTING, 13) == 300.0  # bucket not fitted: the overall threshold
    assert length_threshold(ROUTING, 48) == 320.0
    assert length_threshold(ROUTING, 49) == length_threshold(ROUTING, 10_000) == 330.0
    # Sets calibrated before buckets existed, or not at all.
    assert length_threshold({"perplexity_threshold": 300.0}, 5) == 300.0
    assert length_threshold({"perplexity_threshold": None}, 5) is None
    assert length_threshold(None, 5) is None
    # Unset policy: the bucket; an explicit policy value wins for every length.
    unset = PolicySettings()
    assert effective_threshold(unset, length_threshold(ROUTING, 8)) == (1000.0, "model_set")
    assert effective_threshold(unset, length_threshold(ROUTING, 80)) == (330.0, "model_set")
    fixed = PolicySettings(perplexity_threshold=250)
    for n in (1, 8, 20, 40, 80):
        assert effective_threshold(fixed, length_threshold(ROUTING, n)) == (250, "policy")


def test_the_cloud_route_reasons_on_the_wire_are_the_routing_tables() -> None:
    from edge.route.rules import Reason
    from fleet.routes import CLOUD_ROUTE_REASONS

    assert {r.value for r in Reason} >= CLOUD_ROUTE_REASONS
    assert "cloud_unavailable" not in CLOUD_ROUTE_REASONS  # served at the edge
