"""Failure isolation on the edge: deadlines, client hang-ups and real cloud failures.

A live edge (uvicorn) on a real nats-server, with real cloud workers (in-process, or a worker
process that is killed) or, only where a failure's shape is wanted, a stand-in responder on
the real `GenerationService`. Every stream must end with a local completion or an error
event followed by `[DONE]`, never a cut connection. No test asserts a duration: where a
bound matters, the slow path is made to hang (a huge timeout) so a regression hangs the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect
from edge.runtime import SamplingParams
from models.registry import ModelSet
from serving.deadlines import HEADER_TIMEOUT
from tests.fixtures_edge import LiveEdge

pytestmark = pytest.mark.slow

#: A timeout no test may wait out: a request that depends on it hangs (and the test fails).
NEVER_MS = 3_600_000.0
#: The local route with the perplexity rule and the latency rule out of the way.
LOCAL_POLICY = {"perplexity_threshold": 1e9, "latency_budget_ms": NEVER_MS}


async def eventually(check: Callable[[], Any], within: float = 20.0) -> None:
    for _ in range(int(within / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check(), "condition not met in time"


def body(route: str, *, stream: bool, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": "hg-edge",
        "prompt": "Permission is hereby granted",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "route": route,
    }


async def sse(http: httpx.AsyncClient, payload: dict[str, Any], **kwargs: Any) -> list[str]:
    """POST a streamed request and return its `data:` lines (the connection must end them)."""
    async with http.stream("POST", "/v1/completions", json=payload, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        return [line async for line in response.aiter_lines() if line.startswith("data: ")]


def ends_well(events: list[str]) -> dict[str, Any]:
    """The stream ended with `[DONE]`; returns the last JSON event before it."""
    assert events and events[-1] == "data: [DONE]", events[-3:]
    last: dict[str, Any] = json.loads(events[-2][len("data: ") :])
    return last


@asynccontextmanager
async def stand_in(
    nats_url: str, handler: Callable[[wire.GenerateRequest, Responder], Any]
) -> AsyncIterator[None]:
    """A responder on `hg.gen.hg-cloud` run by the real `GenerationService`."""
    worker_nc = await connect(nats_url, name="stand-in-worker")
    try:
        async with GenerationService(
            worker_nc, model="hg-cloud", handler=handler, node_id="stand-in"
        ):
            yield
    finally:
        await worker_nc.close()


@asynccontextmanager
async def slot_taken(edge: LiveEdge) -> AsyncIterator[None]:
    """Take the edge's only slot (`max_active=1`) with a job held after its prefill, so a
    request behind it waits in the queue until the block ends."""
    runtime = edge.node.runtime
    busy = runtime.submit(
        runtime.encode("busy"), SamplingParams(max_tokens=1), hold_after_prefill=True
    )
    await busy.next_event()
    try:
        yield
    finally:
        busy.cancel()


# ------------------------------------------------------------------------------ deadlines


async def test_every_cloud_request_carries_a_counted_down_deadline(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    sent: list[int | None] = []

    async def record(request: wire.GenerateRequest, responder: Responder) -> None:
        sent.append(request.timeout_ms)
        await responder.chunk(text=" ok", token_ids=[1])
        await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))

    async with stand_in(nats_url, record):
        edge = await start_edge(policy={"request_timeout_ms": 7000})
        async with httpx.AsyncClient(base_url=edge.url) as http:
            for headers in ({HEADER_TIMEOUT: "5"}, {}, {HEADER_TIMEOUT: "1000"}):
                answer = await http.post(
                    "/v1/completions", json=body("cloud", stream=False), headers=headers
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["served_by"] == "cloud"
            bad = await http.post(
                "/v1/completions", json=body("cloud", stream=False), headers={HEADER_TIMEOUT: "0"}
            )
    # The client's own 5 s, less what the edge spent; else the policy's 7 s, which also caps
    # a client's 1000 s.
    assert len(sent) == 3 and all(ms is not None and ms > 0 for ms in sent), sent
    assert sent[0] < 5000 and sent[1] < 7000 and sent[2] < 7000, sent  # type: ignore[operator]
    assert sent[1] > 5000 and sent[2] > 5000, sent  # type: ignore[operator]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == HEADER_TIMEOUT


async def test_deadline_ends_a_cloud_stream_with_a_timeout_error(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A cloud that streams forever: the client's deadline ends it (error event, [DONE]);
    the worker's handler is stopped; the breaker does not count the client's deadline."""
    stopped = asyncio.Event()

    async def endless(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            for index in range(1_000_000):
                await responder.chunk(text=f" {index}", token_ids=[index])
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with stand_in(nats_url, endless):
        edge = await start_edge(policy={"cloud_idle_timeout_ms": NEVER_MS})
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse(
                http, body("cloud", stream=True, max_tokens=100), headers={HEADER_TIMEOUT: "1"}
            )
        await asyncio.wait_for(stopped.wait(), 20)
    assert ends_well(events)["error"]["code"] == "timeout"
    assert edge.node.counters.cloud_failures == 0


# ------------------------------------------------------------------------------ hang-ups


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_hang_up_cancels_the_local_generation(
    start_edge: Callable[..., Any], stream: bool
) -> None:
    """The tiny model writes a whole answer in milliseconds, so the request waits behind a
    held job: a hang-up must cancel its job before it runs. Without the cancel it would
    write `max_tokens` tokens once the slot frees."""
    edge = await start_edge(no_cloud=True, max_active=1, max_queue=4, policy=LOCAL_POLICY)
    runtime = edge.node.runtime
    async with slot_taken(edge), httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        payload = body("edge", stream=stream, max_tokens=64)
        hang_up = asyncio.Event()
        call = asyncio.create_task(_call(http, payload, hang_up))
        await eventually(lambda: runtime.in_flight == 2)  # the held job and ours, queued
        # A queued job's tokens count in the predicted wait until it is cancelled.
        queued = runtime.estimate_wait_s()
        assert queued > 0
        if stream:
            hang_up.set()  # it hangs up after the first chunk
            await call
        else:
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await eventually(lambda: runtime.estimate_wait_s() < queued)
        before = runtime.tokens_generated
    # The slot is free: a job still queued would run now.
    await eventually(lambda: runtime.in_flight == 0)
    await asyncio.sleep(0.2)
    assert runtime.tokens_generated - before <= 1


async def _call(http: httpx.AsyncClient, payload: dict[str, Any], hang_up: asyncio.Event) -> None:
    """POST; a streamed one hangs up after its first chunk once `hang_up` is set."""
    if not payload["stream"]:
        await http.post("/v1/completions", json=payload)
        return
    async with http.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                await hang_up.wait()
                return


# ------------------------------------------------------------------ real cloud failures


async def test_no_workers_answers_locally_without_waiting_for_the_accept_timeout(
    start_edge: Callable[..., Any],
) -> None:
    """Nobody serves `hg.gen.hg-cloud`: the bus says so at once. With an accept timeout no
    test can wait out, only that answer lets the request finish (locally)."""
    edge = await start_edge(policy={**LOCAL_POLICY, "cloud_timeout_ms": NEVER_MS})
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        events = await asyncio.wait_for(sse(http, body("cloud", stream=True)), 120)
    last = ends_well(events)
    assert (last["served_by"], last["route_reason"]) == ("edge", "cloud_unavailable")
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert edge.node.counters.cloud_failures == 1


async def test_mid_stream_error_reply_is_finished_locally(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A worker whose handler crashes after two chunks answers a coded `internal` Error."""

    async def crashing(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text=" one", token_ids=[1])
        await responder.chunk(text=" two", token_ids=[2])
        raise RuntimeError("boom")

    async with stand_in(nats_url, crashing):
        edge = await start_edge(policy={"cloud_idle_timeout_ms": NEVER_MS})
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse(http, body("cloud", stream=True))
    last = ends_well(events)
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts).startswith(" one two")
    assert last["completed_by"] == "edge" and last["choices"][0]["finish_reason"]
    assert edge.node.counters.cloud_failures == 1
    assert edge.node.counters.mid_stream_recoveries == 1


async def test_overloaded_worker_sends_requests_to_the_edge(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client
) -> None:
    """A real worker with room for one request, flooded: the rest are answered locally."""
    worker = await start_worker(max_queue_requests=1)
    edge = await start_edge(policy=LOCAL_POLICY)
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        flood = [sse(http, body("cloud", stream=True, max_tokens=100)) for _ in range(6)]
        results = await asyncio.gather(*flood)
    lasts = [ends_well(events) for events in results]
    local = [last for last in lasts if last["served_by"] == "edge"]
    assert local and all(last["route_reason"] == "cloud_unavailable" for last in local)
    assert edge.node.counters.cloud_failures >= 1
    assert worker.admitted == 0


async def test_worker_killed_mid_stream(
    start_edge: Callable[..., Any], nats_url: str, nc: Client, tiny_models: ModelSet
) -> None:
    """SIGKILL of a real worker process mid-stream: the edge finishes the answer locally."""
    ready = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        if wire.decode(msg.data, wire.Heartbeat).status == "ready":
            ready.set()

    await nc.subscribe(subjects.telemetry_of_role("cloud"), cb=on_beat)
    env = {**os.environ, "HG_CLOUD_THREADS": "1", "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(  # noqa: ASYNC220 (a worker process to kill)
        [sys.executable, "-m", "cloud", "worker", "--model-dir", str(tiny_models.cloud_dir),
         "--nats", nats_url, "--node-id", "cloud-victim", "--model", "hg-cloud"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), 120)
        edge = await start_edge(policy={**LOCAL_POLICY, "cloud_idle_timeout_ms": 1000})
        events: list[str] = []
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=None) as http,
            http.stream(
                "POST", "/v1/completions", json=body("cloud", stream=True, max_tokens=200)
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) == 2:
                    victim.send_signal(signal.SIGKILL)
        last = ends_well(events)
        assert last.get("completed_by") == "edge" or "error" in last, last
        assert edge.node.counters.cloud_failures == 1
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)


# ---------------------------------------------------------------------------- flood, broker


async def test_a_flood_beyond_the_queue_is_answered_200_or_503_with_retry_after(
    start_edge: Callable[..., Any],
) -> None:
    """Many concurrent requests, beyond one slot and one queued: each is answered, 200 or a
    503 carrying Retry-After; the queue never grows past its bound; the edge keeps serving.
    (`local_only`: no cloud to overflow to, so what does not fit is shed.)"""
    edge = await start_edge(max_active=1, max_queue=1, policy=LOCAL_POLICY)
    runtime = edge.node.runtime
    deepest = 0
    payload = {**body("edge", stream=False, max_tokens=8), "local_only": True}

    async def one(http: httpx.AsyncClient) -> httpx.Response:
        nonlocal deepest
        deepest = max(deepest, runtime.queue_depth)
        return await http.post("/v1/completions", json=payload)

    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        async with slot_taken(edge):  # a full slot: the flood arrives while it is busy
            calls = [asyncio.ensure_future(one(http)) for _ in range(24)]
            await eventually(lambda: sum(c.done() for c in calls) >= 22)
            deepest = max(deepest, runtime.queue_depth)
        answers = await asyncio.gather(*calls)
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 22, statuses  # one slot busy, one queued: the rest shed
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers.get("retry-after"), answer.headers
                assert answer.json()["error"]["code"] in ("overloaded", "unavailable")
        assert deepest <= 1
        assert (await http.post("/v1/completions", json=payload)).status_code == 200


async def test_broker_restart_mid_request_ends_the_stream_well(
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nats_server: Any,
    tmp_path: Any,
) -> None:
    """The broker stops while a cloud stream runs: the stream ends with a local completion or
    an error event, then [DONE]; once the broker is back the edge reconnects and serves."""
    from broker.server import NatsServer

    await start_worker()
    edge = await start_edge(policy={**LOCAL_POLICY, "cloud_idle_timeout_ms": 1000})
    port = int(nats_server.client_url.rsplit(":", 1)[1])
    events: list[str] = []
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=None) as http,
        http.stream(
            "POST", "/v1/completions", json=body("cloud", stream=True, max_tokens=200)
        ) as response,
    ):
        assert response.headers["x-hybridgen-served-by"] == "cloud"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 2:
                await nats_server.shutdown()
    last = ends_well(events)
    assert last.get("completed_by") == "edge" or "error" in last, last
    again = NatsServer(store_dir=tmp_path / "again", port=port)
    await again.start()
    try:
        await eventually(lambda: edge.node.bus_connected, within=30)
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            answer = await http.post("/v1/completions", json=body("auto", stream=False))
        assert answer.status_code == 200, answer.text
    finally:
        await again.shutdown()


async def test_hang_up_mid_stream_stops_a_real_worker(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """A client that hangs up on a stream the edge gets from a real worker: the edge cancels
    on the bus and the worker stops generating long before `max_tokens`."""
    worker = await start_worker()
    edge = await start_edge()
    budget = 200
    body = {"model": "hg-edge", "prompt": "Hello", "max_tokens": budget, "stream": True,
            "temperature": 0, "ignore_eos": True, "route": "cloud"}  # fmt: skip
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.headers["x-hybridgen-served-by"] == "cloud"
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    break  # the first token: hang up
        at_hang_up = worker.tokens_out
    for _ in range(400):
        if worker.admitted == 0:
            break
        await asyncio.sleep(0.02)
    assert worker.admitted == 0, "the worker still holds the request"
    generated = worker.tokens_out
    assert generated < budget, (generated, at_hang_up)  # stopped, not run to max_tokens
