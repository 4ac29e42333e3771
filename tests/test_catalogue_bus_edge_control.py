"""The bus catalogue, the edge's side: malformed control messages sent to a real edge's
control endpoints (`hg.ctl.<node_id>.<verb>`, docs/edge.md "Telemetry and control").

Each gets a coded refusal, compared whole: `ControlReply(ok=False, message, data={"code",
"param"})`, the param naming the field at fault where there is one. Nothing of the refused
request happens (a refused `drain` does not drain, a refused `set-policy` leaves the policy
as it was), and the edge keeps serving: its control endpoints and its HTTP API.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import send_control
from tests.fixtures_bus_catalogue import pack
from tests.fixtures_edge import LiveEdge
from tests.waits import BOUND_S

V = wire.VERSION


def control(verb: str, **fields: Any) -> bytes:
    return pack({"v": V, "type": "control", "verb": verb, **fields})


def refused(message: str, code: str = "bad_request", param: str | None = None) -> wire.ControlReply:
    data = {"code": code, **({"param": param} if param else {})}
    return wire.ControlReply(ok=False, message=message, data=data)


VERBS = "'drain', 'resume', 'reload-model' or 'set-policy'"

#: (case, the endpoint's verb, the payload, the reply)
CASES: list[tuple[str, str, bytes, wire.ControlReply]] = [
    ("not msgpack", "drain", b"\xc1", refused("malformed msgpack (FormatError: )")),
    ("not a map", "drain", pack(["drain"]), refused("message must be a msgpack map, got list")),
    (
        "another version",
        "drain",
        pack({"v": 2, "type": "control", "verb": "drain"}),
        refused("unsupported message version 2 (this node speaks v3)", param="v"),
    ),
    (
        "another message type",
        "drain",
        pack({"v": V, "type": "generate", "verb": "drain"}),
        refused("expected a 'control' message, got 'generate'", param="type"),
    ),
    (
        "an unknown verb",
        "drain",
        control("explode"),
        refused(f"invalid field 'verb': Input should be {VERBS}", param="verb"),
    ),
    (
        "no verb",
        "drain",
        pack({"v": V, "type": "control"}),
        refused("missing field 'verb'", param="verb"),
    ),
    (
        "a verb that is not a string",
        "drain",
        control(5),  # type: ignore[arg-type]
        refused(f"invalid field 'verb': Input should be {VERBS}", param="verb"),
    ),
    (
        "args that are not a map",
        "drain",
        control("drain", args="all"),
        refused("invalid field 'args': Input should be a valid dictionary", param="args"),
    ),
    (
        "another endpoint's verb",
        "resume",
        control("drain"),
        refused("verb 'drain' sent to the 'resume' endpoint", param="verb"),
    ),
    (
        "a policy value of the wrong type",
        "set-policy",
        control("set-policy", args={"latency_budget_ms": "fast"}),
        refused(
            "invalid policy: latency_budget_ms: Input should be a valid number, unable to "
            "parse string as a number",
            param="latency_budget_ms",
        ),
    ),
    (
        "a policy value out of range",
        "set-policy",
        control("set-policy", args={"cloud_timeout_ms": -1}),
        refused(
            "invalid policy: cloud_timeout_ms: Input should be greater than 0",
            param="cloud_timeout_ms",
        ),
    ),
    (
        "a breaker value out of range",
        "set-policy",
        control("set-policy", args={"breaker": {"failure_threshold": 0}}),
        refused(
            "invalid policy: breaker.failure_threshold: Input should be greater than or equal to 1",
            param="breaker.failure_threshold",
        ),
    ),
    (
        "a reload without a version",
        "reload-model",
        control("reload-model", args={}),
        refused("reload-model needs `version` or `model_dir`", param="version"),
    ),
    (
        "a reload whose version is not a string",
        "reload-model",
        control("reload-model", args={"version": 5}),
        refused("reload-model needs `version` or `model_dir`", param="version"),
    ),
    (
        "a reload of a version nobody published",
        "reload-model",
        control("reload-model", args={"version": "no-such-version"}),
        refused(
            "model set 'no-such-version' is not published in hg_models (published: none)",
            code="not_found",
        ),
    ),
]


@pytest.fixture
async def edge(start_edge: Callable[..., Any]) -> LiveEdge:
    live: LiveEdge = await start_edge()
    return live


async def still_serving(nc: Client, edge: LiveEdge) -> None:
    """The control endpoints and the HTTP API answer as before."""
    drained = await send_control(nc, edge.node_id, "drain", timeout=BOUND_S)
    resumed = await send_control(nc, edge.node_id, "resume", timeout=BOUND_S)
    assert (drained.ok, drained.message, resumed.ok, resumed.message) == (
        True,
        "draining",
        True,
        "resumed",
    )
    async with httpx.AsyncClient(base_url=edge.url, timeout=BOUND_S) as http:
        response = await http.post(
            "/v1/completions",
            json={"model": "hg-edge", "prompt": "Hello", "max_tokens": 1, "route": "edge"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["served_by"] == "edge"


@pytest.mark.parametrize(("case", "verb", "payload", "reply"), CASES, ids=[c[0] for c in CASES])
async def test_a_malformed_control_message_is_refused_with_a_code(
    nc: Client,
    edge: LiveEdge,
    case: str,
    verb: str,
    payload: bytes,
    reply: wire.ControlReply,
) -> None:
    node = edge.node
    policy, version = node.policy, node.runtime.version
    msg = await nc.request(subjects.control(edge.node_id, verb), payload, timeout=BOUND_S)
    assert wire.decode(msg.data, wire.ControlReply) == reply
    # Nothing of it happened: not drained, the same policy, the same model.
    assert (node.draining, node.policy, node.runtime.version) == (False, policy, version)
    await still_serving(nc, edge)


async def test_a_reload_from_a_folder_that_is_no_model_is_not_found(
    nc: Client, edge: LiveEdge, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    version = edge.node.runtime.version
    payload = control("reload-model", args={"model_dir": str(empty)})
    msg = await nc.request(subjects.control(edge.node_id, "reload-model"), payload, timeout=BOUND_S)
    assert wire.decode(msg.data, wire.ControlReply) == refused(
        f"{empty} is not an onnxruntime-genai model folder", code="not_found"
    )
    assert edge.node.runtime.version == version
    await still_serving(nc, edge)


async def test_a_verb_the_edge_does_not_serve_has_no_responders(nc: Client, edge: LiveEdge) -> None:
    """No endpoint listens on `hg.ctl.<node_id>.<anything else>`: the bus says so at once."""
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"hg.ctl.{edge.node_id}.explode", control("drain"), timeout=BOUND_S)
    await still_serving(nc, edge)
