"""The routing policy schema of the fleet config: validation and layering. Pure, no server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import edge.route.rules
from fleet.policy import BreakerSettings, PolicySettings, merge_policy, policy_sources


def test_defaults_without_layers() -> None:
    policy = merge_policy(None, {})
    assert policy == PolicySettings()
    assert policy.perplexity_threshold is None
    assert policy.breaker == BreakerSettings()


@pytest.mark.parametrize(
    ("layer", "loc", "kind"),
    [
        ({"perplexity_threshold": -3}, ("perplexity_threshold",), "greater_than"),
        ({"latency_budget_ms": 0}, ("latency_budget_ms",), "greater_than"),
        ({"second_stage_k": "many"}, ("second_stage_k",), "int_parsing"),
        (
            {"breaker": {"failure_threshold": 0}},
            ("breaker", "failure_threshold"),
            "greater_than_equal",
        ),
        ({"breaker": "tight"}, ("breaker",), "model_type"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(layer: dict, loc: tuple, kind: str) -> None:
    with pytest.raises(ValidationError) as raised:
        merge_policy(layer)
    assert [(e["loc"], e["type"]) for e in raised.value.errors()] == [(loc, kind)]


def test_a_bad_override_is_refused_even_over_a_good_default() -> None:
    with pytest.raises(ValidationError) as raised:
        merge_policy({"perplexity_threshold": 40.0}, {"perplexity_threshold": -1})
    assert [e["loc"] for e in raised.value.errors()] == [("perplexity_threshold",)]


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
    assert edge.route.rules.PolicySettings is PolicySettings
    assert edge.route.rules.BreakerSettings is BreakerSettings
    assert edge.route.rules.merge_policy is merge_policy


def test_policy_sources_name_the_layer_each_value_comes_from() -> None:
    base = {"latency_budget_ms": 800, "second_stage_k": 2}
    fleet = {"perplexity_threshold": 40.0, "latency_budget_ms": 500, "breaker": {"open_seconds": 9}}
    node = {"perplexity_threshold": 25.0, "breaker": {"failure_threshold": 7}}
    sources = policy_sources(base, fleet, node)
    assert sources["perplexity_threshold"] == {"value": 25.0, "source": "node"}
    assert sources["latency_budget_ms"] == {"value": 500.0, "source": "fleet"}
    assert sources["second_stage_k"] == {"value": 2, "source": "settings"}
    assert sources["cloud_timeout_ms"] == {"value": 2000.0, "source": "default"}
    assert sources["breaker.open_seconds"] == {"value": 9.0, "source": "fleet"}
    assert sources["breaker.failure_threshold"] == {"value": 7, "source": "node"}
    assert sources["breaker.half_open_probes"] == {"value": 1, "source": "default"}
    # Every field of the merged policy is there, with the merged value.
    merged = merge_policy(base, fleet, node).model_dump()
    flat = {k: v for k, v in merged.items() if k != "breaker"}
    flat |= {f"breaker.{k}": v for k, v in merged["breaker"].items()}
    assert {k: v["value"] for k, v in sources.items()} == flat


def test_policy_sources_without_layers_are_all_defaults() -> None:
    sources = policy_sources(None, None, {})
    assert {entry["source"] for entry in sources.values()} == {"default"}
    assert sources["perplexity_threshold"]["value"] is None
