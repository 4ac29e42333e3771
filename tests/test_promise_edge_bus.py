"""Promises of docs/edge.md and README.md about what an edge tells and sends on the bus.

The events table (`request`, `fallback`, `cloud_error`), the heartbeat's status and policy
sources, the `set-policy` reply, that the routing perplexity of a personalized request is
that of the caller's own text, that the `user` id never leaves the edge, and that an edge
with `--no-cloud` never uses the cloud. A live edge (real uvicorn, the session's tiny int4
model) on the test's real nats-server, with a real cloud worker where the cloud answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect, send_control
from broker.store import FleetConfig
from tests.fixtures_edge import ADMIN_HEADERS, LiveEdge
from tests.waits import eventually

PROMPT = "Zanzibar quokkas juggle marmalade"
#: The fields of every `request` event (docs/edge.md, "Telemetry and control").
REQUEST_FIELDS = {
    "served_by",
    "route_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "route_ms",
    "ttft_ms",
    "total_ms",
}


class Events:
    """Every event an edge publishes, decoded, with the raw payloads."""

    def __init__(self) -> None:
        self.seen: list[wire.Event] = []
        self.raw: list[bytes] = []

    async def start(self, nc: Client, node_id: str) -> None:
        async def record(msg: Any) -> None:
            self.raw.append(bytes(msg.data))
            self.seen.append(wire.decode(msg.data, wire.Event))

        await nc.subscribe(subjects.events("edge", node_id), cb=record)
        await nc.flush()

    def of(self, request_id: str, kind: str) -> wire.Event | None:
        return next((e for e in self.seen if e.request_id == request_id and e.kind == kind), None)

    async def wait(self, request_id: str, kind: str) -> wire.Event:
        event: wire.Event = await eventually(
            lambda: self.of(request_id, kind), f"a {kind} event for {request_id}"
        )
        return event


async def complete(edge: LiveEdge, **fields: Any) -> dict[str, Any]:
    body = {"model": "hg-edge", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        answer = await http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


# ----------------------------------------------------------------------------- events


async def test_request_and_fallback_events_tell_the_path_and_sizes_never_the_text(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    worker = await start_worker()
    edge: LiveEdge = await start_edge()
    events = Events()
    await events.start(nc, edge.node_id)

    local = await complete(edge, route="edge")
    event = await events.wait(local["request_id"], "request")
    assert set(event.data) == REQUEST_FIELDS
    assert (event.data["served_by"], event.data["route_reason"]) == ("edge", "requested_edge")
    assert event.data["model"] == "hg-edge"
    assert event.data["prompt_tokens"] == local["usage"]["prompt_tokens"]
    assert event.data["completion_tokens"] == local["usage"]["completion_tokens"]
    assert event.data["finish_reason"] == local["choices"][0]["finish_reason"]

    cloud = await complete(edge, route="cloud")
    assert cloud["served_by"] == "cloud"
    fallback = await events.wait(cloud["request_id"], "fallback")
    assert fallback.data == {"reason": "requested_cloud"}
    event = await events.wait(cloud["request_id"], "request")
    assert set(event.data) == REQUEST_FIELDS | {"hop_ms", "worker", "cloud_model_version"}
    assert (event.data["served_by"], event.data["route_reason"]) == ("cloud", "requested_cloud")
    assert event.data["worker"] == worker.node_id
    assert event.data["cloud_model_version"] == worker.model_version
    assert event.data["completion_tokens"] == cloud["usage"]["completion_tokens"]

    answers = [a["choices"][0]["text"].strip() for a in (local, cloud)]
    for raw in events.raw:  # never the prompt, never the answer
        assert PROMPT.encode() not in raw
        for text in answers:
            if len(text) >= 6:  # (a word or two could be anywhere)
                assert text.encode() not in raw, text


async def test_a_cloud_that_fails_is_a_cloud_error_event_and_a_degraded_heartbeat(
    start_edge: Callable[..., Any], nc: Client
) -> None:
    """No worker serves `hg.gen.hg-nobody`: the request is answered locally, a `cloud_error`
    event says why, and while the breaker is open the heartbeat says `degraded`; a drained
    edge's heartbeat says `draining`."""
    edge: LiveEdge = await start_edge(
        cloud_model="hg-nobody",
        telemetry_interval_s=0.1,
        policy={"breaker": {"failure_threshold": 1, "open_seconds": 3600}},
    )
    events = Events()
    await events.start(nc, edge.node_id)
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry("edge", edge.node_id), cb=on_beat)
    await eventually(lambda: beats and beats[-1].status == "ready", "a ready heartbeat")
    answer = await complete(edge, route="cloud")
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "cloud_unavailable")
    error = await events.wait(answer["request_id"], "cloud_error")
    assert error.message.startswith("unavailable")
    request = await events.wait(answer["request_id"], "request")
    assert (request.data["served_by"], request.data["route_reason"]) == (
        "edge",
        "cloud_unavailable",
    )
    assert events.of(answer["request_id"], "fallback") is None  # the cloud accepted nothing
    seen = len(beats)
    degraded = await eventually(lambda: len(beats) > seen and beats[-1], "a later heartbeat")
    assert (degraded.status, degraded.extra["breaker"]) == ("degraded", "open")
    assert (await send_control(nc, edge.node_id, "drain")).ok
    seen = len(beats)
    draining = await eventually(lambda: len(beats) > seen and beats[-1], "a later heartbeat")
    assert draining.status == "draining"


async def test_an_answer_the_edge_finished_says_so_in_its_request_event(
    start_edge: Callable[..., Any], nats_url: str, nc: Client
) -> None:
    """A stand-in worker: an `Error` reply after two chunks is a reply no real worker can be
    made to send on demand. The edge finishes the answer; the event says
    `completed_locally`."""

    async def failing(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text=" one", token_ids=[1])
        await responder.chunk(text=" two", token_ids=[2])
        raise RuntimeError("the worker fails mid-stream")

    worker_nc = await connect(nats_url, name="failing-worker")
    try:
        async with GenerationService(
            worker_nc, model="hg-failing", handler=failing, node_id="failing"
        ):
            edge: LiveEdge = await start_edge(cloud_model="hg-failing")
            events = Events()
            await events.start(nc, edge.node_id)
            answer = await complete(edge, route="cloud")
            assert answer["choices"][0]["text"].startswith(" one two")
            event = await events.wait(answer["request_id"], "request")
            assert event.data["completed_locally"] is True
            assert event.data["served_by"] == "cloud"
            error = await events.wait(answer["request_id"], "cloud_error")
            assert "mid-stream" in error.message
    finally:
        await worker_nc.close()


# ------------------------------------------------------------------- policy and control


async def test_set_policy_replies_with_the_threshold_in_force_and_the_heartbeat_names_sources(
    start_edge: Callable[..., Any], nc: Client
) -> None:
    """docs/edge.md: `set-policy` replies with the threshold in force and its source; the
    heartbeat's `extra.policy` gives each field's value and the layer it comes from."""
    config = await FleetConfig.open(nc)
    await config.put(subjects.policy_key(), {"cloud_idle_timeout_ms": 9000})
    edge: LiveEdge = await start_edge(
        telemetry_interval_s=0.1, policy={"latency_budget_ms": 1500, "cloud_timeout_ms": 900}
    )
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    def policy_where(check: Callable[[dict[str, Any]], bool]) -> wire.Heartbeat | None:
        return next((b for b in reversed(beats) if check(b.extra["policy"])), None)

    await nc.subscribe(subjects.telemetry("edge", edge.node_id), cb=on_beat)
    # The node has read the fleet's policy (its own override is read with it).
    await eventually(
        lambda: policy_where(lambda p: p["cloud_idle_timeout_ms"]["source"] == "fleet"),
        "a heartbeat with the fleet's policy",
    )
    override = {"cloud_timeout_ms": 700, "perplexity_threshold": 250}
    reply = await send_control(nc, edge.node_id, "set-policy", override)
    assert reply.ok, reply.message
    assert reply.data["effective_perplexity_threshold"] == 250
    assert reply.data["perplexity_threshold_source"] == "policy"
    assert reply.data["override"] == override
    beat = await eventually(
        lambda: policy_where(lambda p: p["perplexity_threshold"]["value"] == 250),
        "a heartbeat with the new threshold",
    )
    policy = beat.extra["policy"]
    assert policy["latency_budget_ms"] == {"value": 1500, "source": "settings"}
    assert policy["cloud_idle_timeout_ms"] == {"value": 9000, "source": "fleet"}
    assert policy["cloud_timeout_ms"] == {"value": 700, "source": "node"}
    assert policy["perplexity_threshold"] == {"value": 250, "source": "node"}
    assert policy["breaker.failure_threshold"] == {"value": 3, "source": "default"}
    assert beat.extra["perplexity_threshold_source"] == "policy"


# -------------------------------------------------------------- what leaves the edge


async def test_a_personalized_request_is_routed_by_the_callers_text_and_its_user_stays(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    """docs/edge.md, "Persona": the perplexity that routes a personalized request is that of
    the caller's own text; "Request extensions": `user` is kept on the edge, even for a user
    who shares the persona."""
    await start_worker()
    # A perplexity is never below 1: every prompt is low_confidence, and goes to the cloud.
    edge: LiveEdge = await start_edge(policy={"perplexity_threshold": 1.0})
    events = Events()
    await events.start(nc, edge.node_id)
    user = "quokka-keeper-7f3a"
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS) as http:
        persona = {"persona": "Speaks like a lighthouse keeper.", "share_profile": True}
        assert (await http.put(f"/v1/users/{user}", json=persona)).status_code == 200
    sent: list[bytes] = []

    async def spy(msg: Any) -> None:
        sent.append(bytes(msg.data))

    await nc.subscribe(subjects.gen("hg-cloud"), cb=spy)
    await nc.flush()

    plain = await complete(edge)
    personal = await complete(edge, user=user)
    for answer in (plain, personal):
        assert (answer["served_by"], answer["route_reason"]) == ("cloud", "low_confidence")
    theirs = (await events.wait(plain["request_id"], "fallback")).data
    mine = (await events.wait(personal["request_id"], "fallback")).data
    # Every token of the caller's prompt is scored (behind the persona its first one is
    # predicted too), and none of the persona's.
    assert mine["scored_tokens"] == len(edge.node.runtime.encode(PROMPT))
    assert theirs["scored_tokens"] == len(edge.node.runtime.encode(PROMPT)) - 1
    assert (mine["perplexity_threshold"], mine["threshold_source"]) == (1.0, "policy")

    await eventually(lambda: len(sent) == 2, "both requests on the bus")
    requests = [wire.decode(data, wire.GenerateRequest) for data in sent]
    assert [r.request_id for r in requests] == [plain["request_id"], personal["request_id"]]
    assert requests[1].prompt is not None and requests[1].prompt.endswith(PROMPT)
    assert requests[1].user is None
    assert user.encode() not in sent[1]


async def test_an_edge_without_the_cloud_never_uses_it(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """docs/edge.md, "Running it": `--no-cloud` never touches the bus, even with a worker
    serving on it: the cloud's requests are answered locally."""
    await start_worker()
    edge: LiveEdge = await start_edge(no_cloud=True)
    for fields in ({"route": "cloud"}, {"model": "hg-cloud"}):
        answer = await complete(edge, **fields)
        assert (answer["served_by"], answer["route_reason"]) == ("edge", "cloud_unavailable")
    assert not edge.node.bus_connected
