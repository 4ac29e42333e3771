"""The bus catalogue, the edge's side: bad routing policy values in the KV bucket a real
edge watches (`hg_config`, `policy.default` and `policy.node.<node_id>`, docs/edge.md
"Changing the policy live").

A value that is not a JSON object, or whose fields do not make a valid policy (a wrong type,
a value out of range), is refused: that key keeps its last valid value, the other key still
changes the policy live, and the edge keeps serving. Unknown fields are ignored. The policy
in force is read where an operator reads it, in the edge's heartbeat (`extra.policy`), after
a positive marker: a valid change of the other key, written after the bad value, in force.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.store import FleetConfig
from fleet.policy import merge_policy
from tests.fixtures_edge import LiveEdge
from tests.waits import BOUND_S, eventually

FLEET = subjects.policy_key()
#: The fields each layer sets in these tests (and their values before the bad write).
FLEET_FIELD, FLEET_VALUE = "latency_budget_ms", 1500.0
NODE_FIELD, NODE_VALUE = "cloud_timeout_ms", 3000.0


class Heartbeats:
    """The edge's heartbeats, newest last."""

    def __init__(self) -> None:
        self.seen: list[wire.Heartbeat] = []

    async def on_beat(self, msg: Any) -> None:
        self.seen.append(wire.decode(msg.data, wire.Heartbeat))

    async def policy_with(self, field: str, value: float) -> dict[str, Any]:
        """The policy of the first heartbeat (from now on) whose `field` has `value`."""
        start = len(self.seen)

        def found() -> dict[str, Any] | None:
            for beat in self.seen[start:]:
                policy: dict[str, Any] = beat.extra["policy"]
                if policy[field]["value"] == value:
                    return policy
            return None

        result: dict[str, Any] = await eventually(found, f"a heartbeat with {field}={value}")
        return result


@pytest.fixture
async def edge(start_edge: Callable[..., Any]) -> LiveEdge:
    live: LiveEdge = await start_edge(telemetry_interval_s=0.05)
    return live


@pytest.fixture
async def beats(nc: Client, edge: LiveEdge) -> Heartbeats:
    heartbeats = Heartbeats()
    await nc.subscribe(subjects.telemetry("edge", edge.node_id), cb=heartbeats.on_beat)
    await nc.flush()
    return heartbeats


@pytest.fixture
async def config(nc: Client, edge: LiveEdge, beats: Heartbeats) -> FleetConfig:
    """The fleet config, with both layers set and in force on the edge."""
    fleet_config = await FleetConfig.open(nc)
    await fleet_config.put(FLEET, {FLEET_FIELD: FLEET_VALUE})
    await fleet_config.put(subjects.policy_key(edge.node_id), {NODE_FIELD: NODE_VALUE})
    policy = await beats.policy_with(NODE_FIELD, NODE_VALUE)
    assert policy[FLEET_FIELD] == {"value": FLEET_VALUE, "source": "fleet"}
    return fleet_config


async def still_serving(edge: LiveEdge) -> None:
    async with httpx.AsyncClient(base_url=edge.url, timeout=BOUND_S) as http:
        response = await http.post(
            "/v1/completions",
            json={"model": "hg-edge", "prompt": "Hello", "max_tokens": 1, "route": "edge"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["served_by"] == "edge"


#: (case, the raw value written)
BAD_VALUES: list[tuple[str, bytes]] = [
    ("not JSON", b"{not json"),
    ("a JSON list", b"[1, 2]"),
    ("a wrong type", b'{"latency_budget_ms": "fast", "cloud_timeout_ms": "slow"}'),
    ("out of range", b'{"latency_budget_ms": -1, "cloud_timeout_ms": 0}'),
    ("a bad breaker", b'{"breaker": {"failure_threshold": 0}}'),
    ("a breaker that is not an object", b'{"breaker": "tight"}'),
]


@pytest.mark.parametrize("layer", ["fleet", "node"])
@pytest.mark.parametrize(("case", "raw"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
async def test_a_bad_policy_value_is_refused_and_the_previous_one_kept(
    edge: LiveEdge,
    beats: Heartbeats,
    config: FleetConfig,
    case: str,
    raw: bytes,
    layer: str,
) -> None:
    node_key = subjects.policy_key(edge.node_id)
    bad_key, other_key = (FLEET, node_key) if layer == "fleet" else (node_key, FLEET)
    await config.kv.put(bad_key, raw)
    # The marker: a valid change of the other key, written after the bad value.
    if layer == "fleet":
        fleet, node = {FLEET_FIELD: FLEET_VALUE}, {NODE_FIELD: 3100.0}
        await config.put(other_key, node)
        policy = await beats.policy_with(NODE_FIELD, 3100.0)
    else:
        fleet, node = {FLEET_FIELD: 1600.0}, {NODE_FIELD: NODE_VALUE}
        await config.put(other_key, fleet)
        policy = await beats.policy_with(FLEET_FIELD, 1600.0)
    assert policy[FLEET_FIELD] == {"value": fleet[FLEET_FIELD], "source": "fleet"}
    assert policy[NODE_FIELD] == {"value": node[NODE_FIELD], "source": "node"}
    assert policy["breaker.failure_threshold"] == {"value": 3, "source": "default"}
    assert edge.node.policy == merge_policy(edge.node.settings.policy, fleet, node)
    await still_serving(edge)


async def test_unknown_policy_fields_are_ignored(
    edge: LiveEdge, beats: Heartbeats, config: FleetConfig
) -> None:
    await config.put(FLEET, {"colour": "blue", FLEET_FIELD: 1700.0})
    policy = await beats.policy_with(FLEET_FIELD, 1700.0)
    assert "colour" not in policy
    assert edge.node.policy == merge_policy(
        edge.node.settings.policy, {FLEET_FIELD: 1700.0}, {NODE_FIELD: NODE_VALUE}
    )
    await still_serving(edge)


@pytest.mark.parametrize(("case", "raw"), BAD_VALUES[:3], ids=[c[0] for c in BAD_VALUES[:3]])
async def test_an_edge_started_on_a_bad_fleet_value_takes_its_own_override(
    nc: Client, start_edge: Callable[..., Any], case: str, raw: bytes
) -> None:
    """The bad value is there before the edge starts: refused, and the node's own override,
    read after it, is in force all the same."""
    fleet_config = await FleetConfig.open(nc)
    node_id = "edge-bad-fleet"
    await fleet_config.kv.put(FLEET, raw)
    await fleet_config.put(subjects.policy_key(node_id), {NODE_FIELD: NODE_VALUE})
    beats = Heartbeats()
    await nc.subscribe(subjects.telemetry("edge", node_id), cb=beats.on_beat)
    edge = await start_edge(node_id=node_id, telemetry_interval_s=0.05)
    policy = await beats.policy_with(NODE_FIELD, NODE_VALUE)
    assert policy[NODE_FIELD] == {"value": NODE_VALUE, "source": "node"}
    assert policy[FLEET_FIELD] == {"value": 2000.0, "source": "default"}
    assert edge.node.policy == merge_policy(
        edge.node.settings.policy, None, {NODE_FIELD: NODE_VALUE}
    )
    await still_serving(edge)
