"""The routing policy schema: what the fleet config in `hg_config` may hold under `policy.*`.

A fleet rule, shared by the edge, which reads it to route, and by the operator console and
`hybridgen fleet policy`, which validate an edit with the very same model before writing it
(the store is `broker.store.FleetConfig`, the keys `broker.subjects.policy_key`). Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BreakerSettings(BaseModel):
    """Circuit breaker of the cloud path."""

    model_config = ConfigDict(extra="ignore")

    failure_threshold: int = Field(
        default=3, ge=1, description="Consecutive cloud failures that open the breaker."
    )
    open_seconds: float = Field(
        default=5.0, gt=0, description="How long it stays open before a half-open probe."
    )
    half_open_probes: int = Field(
        default=1, ge=1, description="Requests let through while half-open."
    )


class PolicySettings(BaseModel):
    """Routing thresholds; read from the `hg_config` KV bucket and changed live.

    Stored as JSON under `policy.default` (fleet) and `policy.node.<node_id>` (override;
    its fields win over the fleet's).
    """

    model_config = ConfigDict(extra="ignore")

    perplexity_threshold: float | None = Field(
        default=None,
        gt=0,
        description="Prompt perplexity above which a request goes to the cloud. Unset "
        "(None): the model set's calibrated threshold (`manifest.json` -> `routing`), off "
        "when it has none; a very large number turns this rule off.",
    )
    second_stage_k: int = Field(
        default=0,
        ge=0,
        description="Draft this many tokens (not streamed) before committing to the edge; "
        "0 disables the second stage.",
    )
    draft_logprob_threshold: float = Field(
        default=-math.inf,
        description="Mean log-probability of the k drafted tokens below which the request "
        "escalates to the cloud (the draft is discarded).",
    )
    speculative: bool = Field(
        default=True,
        description="Edge nodes draft tokens from the request's own text and the user's "
        "cache and check them in one forward pass (each token is still the model's own "
        "choice); false turns it off.",
    )
    latency_budget_ms: float = Field(
        default=2000.0,
        gt=0,
        description="Predicted edge wait beyond which a request goes to the cloud.",
    )
    cloud_timeout_ms: float = Field(
        default=2000.0, gt=0, description="Accept timeout of a cloud request."
    )
    cloud_idle_timeout_ms: float = Field(
        default=10000.0, gt=0, description="Longest gap between two cloud chunks."
    )
    request_timeout_ms: float = Field(
        default=120000.0,
        gt=0,
        description="Deadline of a whole request when the client sets none (and the most a "
        "client's own `X-Request-Timeout` may ask for); sent on the bus as `timeout_ms`.",
    )
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)


def merge_policy(*layers: dict | None) -> PolicySettings:
    """Policy from JSON layers, later ones winning field by field (fleet, then node).

    Raises:
        pydantic.ValidationError: a value out of range or of the wrong type (the message
            names the field).
    """
    merged: dict = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            if key == "breaker" and isinstance(value, dict):
                merged["breaker"] = {**merged.get("breaker", {}), **value}
            else:
                merged[key] = value
    return PolicySettings.model_validate(merged)


#: Where a policy value in force comes from (`policy_sources`): the schema's default, the
#: node's own settings, the fleet default, the node's override; `model_set` (the calibrated
#: perplexity threshold) is set by the edge, which alone knows its model set.
PolicySource = Literal["default", "settings", "fleet", "node", "model_set"]


def policy_sources(
    base: dict | None, fleet: dict | None, node: dict | None
) -> dict[str, dict[str, object]]:
    """Each policy value in force and the layer it comes from, for display.

    Args:
        base: the node's own settings (`EdgeSettings.policy`), source `settings`.
        fleet: the fleet default (`policy.default`), source `fleet`.
        node: the node's override (`policy.node.<id>`), source `node`.

    Returns:
        `{field: {"value": v, "source": "default|settings|fleet|node"}}`; the breaker's
        fields are named `breaker.<field>`. The latest layer that sets a field wins, as in
        `merge_policy`.

    Raises:
        pydantic.ValidationError: the layers do not merge into a valid policy.
    """
    merged = merge_policy(base, fleet, node).model_dump()
    layers: tuple[tuple[PolicySource, dict], ...] = (
        ("settings", base or {}),
        ("fleet", fleet or {}),
        ("node", node or {}),
    )

    def source(name: str, sub: str | None = None) -> PolicySource:
        found: PolicySource = "default"
        for label, layer in layers:
            value = layer.get(name)
            sets = name in layer if sub is None else isinstance(value, dict) and sub in value
            if sets:
                found = label
        return found

    result: dict[str, dict[str, object]] = {}
    for name, value in merged.items():
        if name == "breaker":
            for sub, sub_value in value.items():
                result[f"breaker.{sub}"] = {"value": sub_value, "source": source(name, sub)}
        else:
            result[name] = {"value": value, "source": source(name)}
    return result
