"""The routing policy schema of the fleet config: validation and layering. Pure, no server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import edge.routing
from broker.policy import BreakerSettings, PolicySettings, merge_policy


def test_defaults_without_layers() -> None:
    policy = merge_policy(None, {})
    assert policy == PolicySettings()
    assert policy.perplexity_threshold is None
    assert policy.breaker == BreakerSettings()


@pytest.mark.parametrize(
    ("layer", "field"),
    [
        ({"perplexity_threshold": -3}, "perplexity_threshold"),
        ({"latency_budget_ms": 0}, "latency_budget_ms"),
        ({"second_stage_k": "many"}, "second_stage_k"),
        ({"breaker": {"failure_threshold": 0}}, "breaker.failure_threshold"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(layer: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        merge_policy(layer)
    assert field in str(raised.value)


def test_a_bad_override_is_refused_even_over_a_good_default() -> None:
    with pytest.raises(ValidationError, match="perplexity_threshold"):
        merge_policy({"perplexity_threshold": 40.0}, {"perplexity_threshold": -1})


def test_node_override_wins_field_by_field_over_the_fleet_default() -> None:
    fleet = {"perplexity_threshold": 40.0, "latency_budget_ms": 500, "breaker": {"open_seconds": 9}}
    node = {"perplexity_threshold": 25.0, "breaker": {"failure_threshold": 7}}
    policy = merge_policy(fleet, node)
    assert policy.perplexity_threshold == 25.0
    assert policy.latency_budget_ms == 500
    assert policy.breaker.open_seconds == 9  # kept from the fleet: breakers merge per field
    assert policy.breaker.failure_threshold == 7
    assert merge_policy(fleet, None).perplexity_threshold == 40.0


def test_unknown_fields_are_ignored() -> None:
    assert merge_policy({"no_such_field": 1}) == PolicySettings()


def test_the_edge_uses_the_same_model() -> None:
    assert edge.routing.PolicySettings is PolicySettings
    assert edge.routing.BreakerSettings is BreakerSettings
    assert edge.routing.merge_policy is merge_policy
