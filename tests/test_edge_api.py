"""A live edge (uvicorn) + a real nats-server + a real cloud worker, driven by the openai client.

Everything runs in the test's event loop except the models, which run in their own threads
(the edge's onnxruntime-genai worker, the cloud engine's batching thread). The models are the
session's tiny model set (`tiny_models`).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect, send_control
from broker.server import NatsServer, free_port
from broker.store import FleetConfig
from edge.route.rules import length_threshold
from edge.runtime import EdgeRuntime, Prefill, SamplingParams
from hybridgen.fleet_policy import set_node_policy
from models.chat import render_chat
from models.registry import ModelSet
from models.scoring import encode_with_span
from tests.fixtures_edge import LiveEdge
from tests.fixtures_models import copy_model_set
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

IN_DOMAIN = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files, to deal in the Software without restriction"
)
OUT_OF_DOMAIN = (
    "def __init__(self, *args, **kwargs):\n    Return a new OrderedDict whose keys are the "
    "elements of the iterable; raise TypeError if self.maxlen is None"
)


# ------------------------------------------------------------------------------ helpers
# (the fixtures start_edge, start_worker and edge_dir are in tests/fixtures_edge.py)


def extra(obj: Any) -> dict[str, Any]:
    return dict(obj.model_extra or {})


def assert_finish(finish: str | None, tokens: int, max_tokens: int) -> None:
    """`length` exactly when the answer used all its `max_tokens`, else `stop` (an end
    token): the finish reason agrees with the tokens made."""
    assert 1 <= tokens <= max_tokens, (tokens, max_tokens)
    assert finish == ("length" if tokens == max_tokens else "stop"), (finish, tokens)


async def chat(edge: LiveEdge, content: str, **kwargs: Any) -> Any:
    extra_body = {k: kwargs.pop(k) for k in ("route", "local_only") if k in kwargs}
    async with edge.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=kwargs.pop("model", "hg-edge"),
            messages=[{"role": "user", "content": content}],
            max_tokens=kwargs.pop("max_tokens", 8),
            temperature=0,
            extra_body=extra_body or None,
            **kwargs,
        )
    body = raw.parse()
    fields = extra(body)
    assert raw.headers["x-hybridgen-served-by"] == fields["served_by"]
    assert raw.headers["x-hybridgen-route-reason"] == fields["route_reason"]
    assert raw.headers["x-request-id"] == fields["request_id"]
    assert body.id.endswith(fields["request_id"])
    return body


# --------------------------------------------------------------------------------- tests


async def test_local_answer_plain_and_streamed(start_edge: Callable[..., Any]) -> None:
    # The perplexity rule off: a 2-token greeting is not what this test is about.
    edge = await start_edge(policy={"perplexity_threshold": 1e9})
    body = await chat(edge, "hello there")
    assert extra(body)["served_by"] == "edge"
    assert extra(body)["route_reason"] == "in_domain"
    assert body.model == "hg-edge"
    assert_finish(body.choices[0].finish_reason, body.usage.completion_tokens, 8)

    async with edge.client() as client:
        stream = await client.completions.create(
            model="hg-edge", prompt="The program", max_tokens=6, stream=True, temperature=0,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    first = extra(chunks[0])
    assert first["served_by"] == "edge" and first["route_reason"] and first["request_id"]
    assert chunks[-1].usage is not None
    assert_finish(chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens, 6)
    assert len({extra(c)["request_id"] for c in chunks}) == 1

    async with edge.client() as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["hg-edge", "hg-cloud"]


async def test_forced_cloud_and_cloud_model(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    await start_worker()
    edge = await start_edge()
    events: list[wire.Event] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events("edge", edge.node_id), cb=on_event)
    body = await chat(edge, "hello", route="cloud")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("cloud", "requested_cloud")
    assert body.model == "hg-cloud"
    assert_finish(body.choices[0].finish_reason, body.usage.completion_tokens, 8)

    body = await chat(edge, "hello", model="hg-cloud")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("cloud", "cloud_model")

    async with edge.client() as client:
        stream = await client.chat.completions.create(
            model="hg-edge",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,  # sampled, an end token drawn fifth would end it `stop` at 5
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"route": "cloud"},
        )
        chunks = [chunk async for chunk in stream]
    assert extra(chunks[0])["served_by"] == "cloud"
    assert chunks[-1].usage is not None
    assert_finish(chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens, 5)
    await eventually(lambda: any(e.request_id == extra(body)["request_id"] for e in events))
    # Each cloud-served request: a `fallback` event, then a `request` event when done.
    assert {e.kind for e in events} == {"fallback", "request"}


async def test_context_overflow_goes_to_cloud(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    await start_worker()
    edge = await start_edge()
    context = edge.node.runtime.context_length  # 128 for the tiny edge model
    body = await chat(edge, "word " * 20, max_tokens=context)
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("cloud", "context_overflow")


async def test_cloud_stopped_answers_locally_and_breaker_recovers(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    policy = {"breaker": {"failure_threshold": 2, "open_seconds": 0.5}}
    edge = await start_edge(policy=policy)
    for _ in range(2):  # no worker: no responders, answered locally
        body = await chat(edge, "hello", route="cloud")
        assert (extra(body)["served_by"], extra(body)["route_reason"]) == (
            "edge",
            "cloud_unavailable",
        )
    assert edge.node.breaker.state == "open"
    body = await chat(edge, "hello", model="hg-cloud")  # breaker open: not even tried
    assert extra(body)["route_reason"] == "cloud_unavailable" and body.model == "hg-edge"

    await start_worker()
    # Half-open after `open_seconds`: the next request is a probe; its success closes it.
    await eventually(lambda: edge.node.breaker.state == "half_open", "the breaker half-open")
    body = await chat(edge, "hello", route="cloud")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("cloud", "requested_cloud")
    assert edge.node.breaker.state == "closed"


async def test_local_only_publishes_nothing(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    await start_worker()
    edge = await start_edge(telemetry_interval_s=3600)  # no heartbeat during the test
    seen: list[tuple[str, bytes]] = []

    async def spy(msg: Any) -> None:
        if not msg.subject.startswith(("hg.telemetry.cloud.", "hg.events.cloud.")):
            seen.append((msg.subject, bytes(msg.data)))  # what the edge publishes

    await nc.subscribe("hg.>", cb=spy)
    await nc.flush()
    for route in ("cloud", "auto"):
        body = await chat(edge, "a private note", route=route, local_only=True)
        assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "local_only")
    body = await chat(edge, "secret", model="hg-cloud", local_only=True)
    assert extra(body)["served_by"] == "edge"
    async with edge.client() as client:  # streamed too
        stream = await client.completions.create(
            model="hg-edge",
            prompt="x",
            max_tokens=4,
            stream=True,
            extra_body={"local_only": True, "route": "cloud"},
        )
        reasons = [extra(c)["route_reason"] async for c in stream]
        assert reasons[0] == "local_only"
    # The marker: a normal cloud request afterwards, whose request and `request` event the
    # spy sees; anything the local-only requests had published would have come before.
    body = await chat(edge, "public", route="cloud")
    assert extra(body)["served_by"] == "cloud"
    public = extra(body)["request_id"]
    request_event = subjects.events("edge", edge.node_id)

    def about() -> list[str | None]:
        return [
            wire.decode(data, wire.Event).request_id
            if subject == request_event
            else wire.decode(data, wire.GenerateRequest).request_id
            for subject, data in seen
            if subject in (request_event, subjects.gen("hg-cloud"))
        ]

    await eventually(
        lambda: any(
            s == request_event and wire.decode(d, wire.Event).kind == "request" for s, d in seen
        ),
        "the public request's event",
    )
    assert seen[0][0] == subjects.gen("hg-cloud")  # the edge's first message: the marker's
    assert set(about()) == {public}
    assert {subject for subject, _ in seen} == {subjects.gen("hg-cloud"), request_event}


async def _scored(edge_dir: Path, text: str) -> tuple[float, int]:
    """Perplexity of a chat user message as the edge scores it (content tokens only)."""
    runtime = EdgeRuntime(edge_dir, threads=1)
    try:
        rendered = render_chat([{"role": "user", "content": text}])
        start = rendered.index(text)
        ids, span = encode_with_span(runtime.encode, rendered, (start, start + len(text)))
        generation = runtime.submit(
            ids, SamplingParams(max_tokens=1), hold_after_prefill=True, score_span=span
        )
        prefill = await generation.next_event()
        generation.cancel()
        assert isinstance(prefill, Prefill) and prefill.perplexity is not None
        return prefill.perplexity, prefill.scored_tokens
    finally:
        await runtime.close()


async def test_out_of_domain_escalates_in_domain_stays_and_kv_policy_is_live(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    # Fixed thresholds, not taken from the model's own scores: a perplexity is never below
    # 1, so 1.0 sends every prompt over the threshold (to the cloud) and 1e9 none. Whether the
    # tiny model separates the two texts is the calibration's business (next test), not this.
    await start_worker()
    edge = await start_edge()
    config = await FleetConfig.open(nc)

    async def policy_is(threshold: float) -> None:
        await eventually(lambda: edge.node.policy.perplexity_threshold == threshold)

    await config.put(subjects.policy_key(), {"perplexity_threshold": 1.0})
    await policy_is(1.0)
    body = await chat(edge, OUT_OF_DOMAIN)
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("cloud", "low_confidence")

    await config.put(subjects.policy_key(), {"perplexity_threshold": 1e9})
    await policy_is(1e9)
    body = await chat(edge, IN_DOMAIN)
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "in_domain")

    # A per-node override wins over the fleet default, live.
    await config.put(subjects.policy_key(edge.node_id), {"perplexity_threshold": 1.0})
    await policy_is(1.0)
    body = await chat(edge, IN_DOMAIN)
    assert extra(body)["route_reason"] == "low_confidence"
    # ... and so does `hybridgen fleet set-policy`: the node checks and applies the values
    # (its set-policy verb), the operator side stores the override (the node never writes).
    reply = await set_node_policy(nc, edge.node_id, {"perplexity_threshold": 1e9})
    assert reply.ok, reply.message
    stored = await config.get(subjects.policy_key(edge.node_id))
    assert stored == {"perplexity_threshold": 1e9}
    body = await chat(edge, OUT_OF_DOMAIN)
    assert extra(body)["route_reason"] == "in_domain"
    bad = await set_node_policy(nc, edge.node_id, {"perplexity_threshold": -3})
    assert not bad.ok and "perplexity_threshold" in bad.message
    assert await config.get(subjects.policy_key(edge.node_id)) == stored  # nothing stored


#: Further from the tiny edge's domain than OUT_OF_DOMAIN (a wider margin over the threshold).
FAR_OUT_OF_DOMAIN = (
    "class OrderedDict(dict):\n    def popitem(self, last=True):\n        Remove and return a "
    "(key, value) pair from the dictionary. Pairs are returned in LIFO order if last is true "
    "or FIFO order if false."
)


async def test_model_sets_calibrated_threshold_is_the_default(
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nc: Client,
    edge_dir: Path,
    tiny_models: ModelSet,
    tmp_path: Path,
) -> None:
    # The calibrated threshold is derived from the model by the build: here that derived
    # value IS the thing under test (the edge takes it, per length bucket, as its default).
    # The routing decisions are checked on a copy of the set whose manifest holds a fixed
    # threshold instead, so that they do not depend on the tiny model's own scores.
    routing = tiny_models.manifest["routing"]
    calibrated = routing["perplexity_threshold"]
    n_in, n_out = (
        (await _scored(edge_dir, IN_DOMAIN))[1],
        (await _scored(edge_dir, OUT_OF_DOMAIN))[1],
    )
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    await start_worker()
    calibrated_edge = await start_edge(telemetry_interval_s=0.2)  # no policy anywhere
    assert calibrated_edge.node.policy.perplexity_threshold is None
    assert (calibrated_edge.node.perplexity_threshold, calibrated_edge.node.threshold_source) == (
        calibrated,
        "model_set",
    )
    for n in (n_in, n_out):  # each prompt is judged against its length bucket's threshold
        expected = length_threshold(routing, n)
        assert expected is not None
        assert calibrated_edge.node.threshold_for(n) == (expected, "model_set")

    # A copy of the set calibrated to 1.0 (a perplexity is never lower): with no policy,
    # every prompt must go to the cloud -- only if the model set's threshold is applied.
    fixed = copy_model_set(tiny_models, tmp_path / "home")
    manifest_path = fixed.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["routing"] = {"mode": "calibrated", "perplexity_threshold": 1.0}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    edge = await start_edge(model_dir=fixed.edge_dir("int4"), telemetry_interval_s=0.2)
    assert (edge.node.perplexity_threshold, edge.node.threshold_source) == (1.0, "model_set")
    for text in (IN_DOMAIN, FAR_OUT_OF_DOMAIN):
        body = await chat(edge, text)
        assert (extra(body)["served_by"], extra(body)["route_reason"]) == (
            "cloud",
            "low_confidence",
        )
    await eventually(lambda: any(b.extra.get("perplexity_threshold_source") for b in beats))
    beat = [b for b in beats if b.node_id == calibrated_edge.node_id][-1]
    assert beat.extra["perplexity_threshold"] == calibrated
    assert beat.extra["perplexity_threshold_source"] == "model_set"

    # An explicit policy value wins, live (here: a huge one, i.e. this rule off).
    config = await FleetConfig.open(nc)
    await config.put(subjects.policy_key(), {"perplexity_threshold": 1e9})
    await eventually(lambda: edge.node.threshold_source == "policy")
    assert edge.node.threshold_for(n_in) == edge.node.threshold_for(n_out) == (1e9, "policy")
    body = await chat(edge, FAR_OUT_OF_DOMAIN)
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "in_domain")
    # ... and removing it hands the threshold back to the model set.
    await config.put(subjects.policy_key(), {"latency_budget_ms": 5000})
    await eventually(lambda: edge.node.threshold_source == "model_set")
    assert edge.node.perplexity_threshold == 1.0
    body = await chat(edge, IN_DOMAIN)
    assert extra(body)["route_reason"] == "low_confidence"

    # A model outside any model set has no calibration: the rule is off after the swap.
    alone = tmp_path / "edge-int4"
    shutil.copytree(edge_dir, alone)
    reply = await send_control(nc, edge.node_id, "reload-model", {"model_dir": str(alone)})
    assert reply.ok, reply.message
    assert (edge.node.perplexity_threshold, edge.node.threshold_source) == (math.inf, "off")
    body = await chat(edge, FAR_OUT_OF_DOMAIN)
    assert extra(body)["route_reason"] == "edge_default"
    # ... and swapping back to a build of the set restores it.
    fp32 = tiny_models.edge_dir("fp32")
    reply = await send_control(nc, edge.node_id, "reload-model", {"model_dir": str(fp32)})
    assert reply.ok, reply.message
    assert (edge.node.perplexity_threshold, edge.node.threshold_source) == (
        calibrated,
        "model_set",
    )


async def test_hot_swap_under_load_loses_no_request(
    start_edge: Callable[..., Any], nc: Client, tiny_models: ModelSet
) -> None:
    edge = await start_edge(max_active=2)
    old_runtime = edge.node.runtime

    async def one(index: int) -> str:
        async with edge.client() as client:
            stream = await client.completions.create(
                model="hg-edge",
                prompt=f"line {index}",
                max_tokens=24,
                stream=True,
                temperature=0,
                extra_body={"local_only": True},
            )
            finish = None
            async for chunk in stream:
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            assert finish in ("stop", "length")
            return "ok"

    # One stream is running during the swap for sure: its first chunk is in, the rest is
    # read only after the swap, and the old runtime counts it in flight when the swap starts.
    swapped = asyncio.Event()
    first_chunk = asyncio.Event()

    async def running_during_swap() -> str:
        async with edge.client() as client:
            stream = await client.completions.create(
                model="hg-edge", prompt="line", max_tokens=100, stream=True, temperature=0,
                extra_body={"local_only": True, "route": "edge"},
            )  # fmt: skip
            finish = None
            async for chunk in stream:
                first_chunk.set()
                await swapped.wait()
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            assert finish in ("stop", "length")
            return "ok"

    running = asyncio.create_task(running_during_swap())
    tasks = [asyncio.create_task(one(i)) for i in range(10)]
    await first_chunk.wait()
    in_flight_at_swap = old_runtime.in_flight
    fp32 = tiny_models.edge_dir("fp32")
    reply = await send_control(nc, edge.node_id, "reload-model", {"model_dir": str(fp32)})
    swapped.set()
    assert reply.ok, reply.message
    assert in_flight_at_swap >= 1
    later = [asyncio.create_task(one(i)) for i in range(10, 14)]
    results = await asyncio.gather(running, *tasks, *later)
    assert results == ["ok"] * 15
    assert edge.node.runtime is not old_runtime
    assert edge.node.runtime.model_dir == fp32
    bad = await send_control(nc, edge.node_id, "reload-model", {"model_dir": "/nonexistent"})
    assert not bad.ok


async def test_drain_and_resume(start_edge: Callable[..., Any], nc: Client) -> None:
    edge = await start_edge()
    info = json.loads((await nc.request("$SRV.INFO.hybridgen-edge", b"", timeout=BOUND_S)).data)
    assert info["metadata"]["node_id"] == edge.node_id  # discoverable as a nats.micro service
    assert (await send_control(nc, edge.node_id, "drain")).ok
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.post(
            "/v1/completions", json={"model": "hg-edge", "prompt": "x", "max_tokens": 2}
        )
        assert response.status_code == 503
        # As a draining cloud worker answers: go elsewhere (not "busy, retry here").
        assert response.json()["error"]["code"] == "unavailable"
        assert response.headers["retry-after"]
        assert (await http.get("/readyz")).status_code == 503
        assert (await send_control(nc, edge.node_id, "resume")).ok
        assert (await http.get("/readyz")).status_code == 200


async def test_heartbeat(start_edge: Callable[..., Any], nc: Client) -> None:
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    edge = await start_edge(telemetry_interval_s=0.2)
    await chat(edge, "hi")
    await eventually(lambda: any(b.rps > 0 for b in beats))
    beat = beats[-1]
    assert beat.node_id == edge.node_id and beat.model == "hg-edge"
    assert beat.model_version and beat.status == "ready"
    assert "breaker" in beat.extra and "routes" in beat.extra


async def test_mid_stream_cloud_failure_finishes_locally(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A cloud worker that streams two chunks then goes silent: the idle timeout, then the
    edge finishes the answer. (A stand-in, silent for as long as the test needs; the real
    failures, a worker killed and the broker stopped, are in tests/test_edge_midstream.py.)"""

    async def flaky(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text=" one", token_ids=[1])
        await responder.chunk(text=" two", token_ids=[2])
        await asyncio.sleep(30)  # silent: the stand-in's failure, not a wait

    worker_nc = await connect(nats_url, name="flaky-worker")
    async with GenerationService(worker_nc, model="hg-cloud", handler=flaky, node_id="flaky"):
        edge = await start_edge(policy={"cloud_idle_timeout_ms": 300})
        async with edge.client() as client:
            stream = await client.completions.create(
                model="hg-edge",
                prompt="count:",
                max_tokens=10,
                stream=True,
                extra_body={"route": "cloud"},
            )
            chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text.startswith(" one two")
        assert extra(chunks[0])["served_by"] == "cloud"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert extra(chunks[-1])["completed_by"] == "edge"
        assert edge.node.counters.mid_stream_recoveries == 1
    await worker_nc.close()


async def test_bus_unreachable_serves_locally_then_reconnects(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    port = free_port()
    edge = await start_edge(nats_url=f"nats://127.0.0.1:{port}")
    body = await chat(edge, "hello", route="cloud")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "cloud_unavailable")
    async with NatsServer(store_dir=tmp_path / "late", port=port):
        await eventually(lambda: edge.node.bus_connected, "the edge connected")
        body = await chat(edge, "hello", route="cloud")  # no worker yet: still local
        assert extra(body)["route_reason"] == "cloud_unavailable"


def _chat_body(**fields: Any) -> bytes:
    return json.dumps(
        {"model": "hg-edge", "messages": [{"role": "user", "content": "x"}], **fields}
    ).encode()


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (json.dumps({"model": "hg-edge"}).encode(), 400, "messages"),
        (json.dumps({"model": "hg-edge", "messages": []}).encode(), 400, "messages"),
        (
            _chat_body(max_tokens="5"),
            400,
            "max_tokens",
        ),
        (
            _chat_body(route="sideways"),
            400,
            "route",
        ),
        (
            json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model",
        ),
        (
            _chat_body(max_tokens=4000, local_only=True),
            400,
            "max_tokens",
        ),
    ],
)
async def test_bad_inputs_are_coded_errors(
    start_edge: Callable[..., Any], payload: bytes, status: int, param: str | None
) -> None:
    edge = await start_edge(no_cloud=True)
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.post(
            "/v1/chat/completions", content=payload, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        if status == 404 or (param == "max_tokens" and b"local_only" in payload):
            assert response.headers["x-request-id"]  # routed, then refused: traceable
        error = response.json()["error"]
        assert error["message"] and error["code"]
        if param is not None:
            assert error["param"] == param
        big = await http.post("/v1/completions", content=b"x" * (2 << 20))
        assert big.status_code == 413
        assert (await http.get("/healthz")).status_code == 200  # still serving


async def test_openai_client_raises_on_bad_request(start_edge: Callable[..., Any]) -> None:
    edge = await start_edge(no_cloud=True)
    async with edge.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="hg-edge", messages=[], max_tokens=2)
        assert caught.value.status_code == 400
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")


async def test_load_and_second_stage_send_to_cloud(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    await start_worker()
    edge = await start_edge(max_active=1, policy={"latency_budget_ms": 0.001})
    runtime = edge.node.runtime
    # Held after their prefill, they keep the one slot and the queue busy until cancelled
    # (running ones could finish before the request below arrives on a fast machine).
    busy = [
        runtime.submit(
            runtime.encode("busy"), SamplingParams(max_tokens=100), hold_after_prefill=True
        )
        for _ in range(3)
    ]
    try:
        await eventually(lambda: runtime.estimate_wait_s() > 0)
        body = await chat(edge, "hello")
        assert (extra(body)["served_by"], extra(body)["route_reason"]) == (
            "cloud",
            "edge_overloaded",
        )
    finally:
        for generation in busy:
            generation.cancel()
    await eventually(lambda: runtime.in_flight == 0)

    # Second stage: k drafted tokens, never shown; a mean log-prob below 0 always escalates.
    # (The perplexity rule off, so the draft decides.)
    edge.node.set_policy(
        edge.node.policy.model_copy(
            update={
                "second_stage_k": 3,
                "draft_logprob_threshold": 0.0,
                "perplexity_threshold": 1e9,
            }
        )
    )
    body = await chat(edge, "hello")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == (
        "cloud",
        "low_draft_confidence",
    )
    edge.node.set_policy(edge.node.policy.model_copy(update={"draft_logprob_threshold": -1e9}))
    body = await chat(edge, "hello", max_tokens=6)
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "confident_draft")
    assert_finish(body.choices[0].finish_reason, body.usage.completion_tokens, 6)


async def test_reload_model_pulls_a_version_from_the_object_store(
    start_edge: Callable[..., Any],
    nc: Client,
    tiny_models: ModelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models import distribution

    await distribution.publish(nc, tiny_models)
    monkeypatch.setenv("HG_HOME", str(tmp_path / "edge-home"))  # nothing installed there
    edge = await start_edge()
    reply = await send_control(
        nc, edge.node_id, "reload-model", {"version": tiny_models.version}, timeout=60
    )
    assert reply.ok, reply.message
    assert reply.data["model_version"] == tiny_models.version
    pulled = tmp_path / "edge-home" / "models" / tiny_models.version / "edge-int4"
    assert edge.node.runtime.model_dir == pulled
    body = await chat(edge, "after the swap")
    assert extra(body)["served_by"] == "edge"
    missing = await send_control(nc, edge.node_id, "reload-model", {"version": "nope-1"})
    assert not missing.ok and "nope-1" in missing.message


async def test_api_keys(start_edge: Callable[..., Any]) -> None:
    edge = await start_edge(no_cloud=True, api_keys=["sekret"])
    async with edge.client() as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model="hg-edge", prompt="x", max_tokens=1)
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="sekret") as client:
        answer = await client.completions.create(model="hg-edge", prompt="x", max_tokens=1)
        assert extra(answer)["served_by"] == "edge"


async def test_full_edge_queue_goes_to_cloud_or_is_a_503(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    await start_worker()
    edge = await start_edge(max_active=1, max_queue=0, policy={"latency_budget_ms": 1e9})
    runtime = edge.node.runtime
    # Take the only slot and keep it (held after its prefill, never resumed); no queue.
    busy = runtime.submit(
        runtime.encode("busy"), SamplingParams(max_tokens=8), hold_after_prefill=True
    )
    await busy.next_event()
    try:
        body = await chat(edge, "hello")
        assert (extra(body)["served_by"], extra(body)["route_reason"]) == (
            "cloud",
            "edge_overloaded",
        )
        async with edge.client() as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(
                    model="hg-edge", prompt="x", max_tokens=2, extra_body={"local_only": True}
                )
        assert caught.value.status_code == 503
        assert caught.value.response.headers.get("retry-after")
    finally:
        busy.cancel()


async def test_without_max_tokens_each_end_answers_up_to_its_own_cap(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """docs/api.md: a request without `max_tokens` runs until the model stops or the window
    is full, at most the cap of the server that generates: the edge's fallback carries no
    `max_tokens` of its own, so the worker's cap (7) bounds a cloud answer and the edge's (5)
    a local one. Greedy, the tiny models write no end token this soon."""
    await start_worker(max_tokens_cap=7)
    edge = await start_edge(max_tokens_cap=5)
    for route, cap in (("edge", 5), ("cloud", 7)):
        body = await chat(edge, "hello", route=route, max_tokens=openai.NOT_GIVEN)
        assert extra(body)["served_by"] == route
        assert (body.choices[0].finish_reason, body.usage.completion_tokens) == ("length", cap)
