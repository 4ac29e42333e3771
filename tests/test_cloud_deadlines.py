"""Deadlines on the cloud side, against real workers (`cloud_long_model`, real nats-server).

docs/broker.md: a worker refuses a request whose deadline passed before admission with
`timeout`, and stops one that runs past it the same way (the engine frees its sequence).
docs/cloud.md: through the cloud API, no answer in time is a 504 `timeout` in OpenAI's
envelope; a stream that fails after it started sends an error event, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.errors import Timeout
from broker.streaming import request_stream
from tests.fixtures_cloud import LONG_CACHE_TOKENS, LONG_CONTEXT, serve_cloud_api
from tests.waits import BOUND_S, eventually

MODEL = "hg-cloud"
#: More tokens than any machine makes within the deadlines below (a few hundred a second
#: here): the requests are still running when their deadline passes.
LONG_ANSWER = LONG_CONTEXT - 100


@pytest.fixture
def start_worker(
    start_cloud_worker: Callable[..., Any], cloud_long_model: Path
) -> Callable[..., Any]:
    """`await start_worker(**WorkerSettings overrides)`: a worker on the long-context model."""
    return functools.partial(start_cloud_worker, cloud_long_model, cache_tokens=LONG_CACHE_TOKENS)


def engine_idle(worker: Any) -> bool:
    """The worker's engine holds nothing: no request, no row, no admitted token (the
    generation thread releases a cancelled row at its next round)."""
    stats = worker.engine.stats()
    return stats["requests"] == stats["running"] == stats["admitted_tokens"] == 0


def request(prompt: str = "Hello", **fields: Any) -> wire.GenerateRequest:
    fields.setdefault("temperature", 0.0)
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=MODEL, prompt=prompt, **fields
    )


async def error_events(nc: Client, node_id: str) -> list[wire.Event]:
    """The `error` events the worker `node_id` publishes from now on (filled as they come)."""
    events: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        event = wire.decode(msg.data, wire.Event)
        if event.kind == "error":
            events.append(event)

    await nc.subscribe(subjects.events("cloud", node_id), cb=on_event)
    await nc.flush()
    return events


async def test_a_request_whose_deadline_passed_before_admission_is_refused(
    start_worker: Callable[..., Any], nc: Client
) -> None:
    """A 1 ms budget for a prompt of 4001 tokens: tokenizing it alone takes longer (about
    15 ms here), so the deadline has passed when the worker would admit it. It answers
    `timeout` instead of the accept chunk, generates nothing and reports an `error` event;
    the same prompt with room in its budget is served."""
    worker = await start_worker()
    assert worker.engine is not None
    errors = await error_events(nc, worker.node_id)
    late = request("word " * 2000, max_tokens=1, timeout_ms=1)
    with pytest.raises(Timeout) as info:
        async with request_stream(nc, late):
            pytest.fail("the worker admitted a request whose deadline had passed")
    assert info.value.message == (
        f"request {late.request_id} reached its deadline of 1 ms before admission"
    )
    assert worker.tokens_out == 0
    assert worker.engine.stats()["prefill_real_tokens"] == 0  # the model never saw it
    await eventually(lambda: errors, "the refusal's error event")
    assert [(e.request_id, e.data["code"]) for e in errors] == [(late.request_id, "timeout")]

    on_time = request("word " * 2000, max_tokens=1, timeout_ms=int(BOUND_S * 1000))
    async with request_stream(nc, on_time) as stream:
        _text, done = await stream.collect()
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4001, 1)


async def test_a_running_request_is_stopped_at_its_deadline(
    start_worker: Callable[..., Any], nc: Client
) -> None:
    """Admitted with a second to go and thousands of tokens to make: the worker streams, then
    ends the stream with `timeout` and frees the request in the engine."""
    worker = await start_worker()
    assert worker.engine is not None
    errors = await error_events(nc, worker.node_id)
    running = request(max_tokens=LONG_ANSWER, timeout_ms=1000)
    async with request_stream(nc, running) as stream:  # admitted: the accept chunk came
        with pytest.raises(Timeout) as info:
            async for _ in stream:
                pass
    assert info.value.message == f"request {running.request_id} exceeded its timeout of 1000 ms"
    await eventually(lambda: worker.admitted == 0, "the worker let the request go")
    await eventually(lambda: engine_idle(worker), "the engine freed the request")
    assert 0 < worker.tokens_out < LONG_ANSWER  # stopped mid-way, not run to max_tokens
    await eventually(lambda: errors, "the timeout's error event")
    assert [(e.request_id, e.data["code"]) for e in errors] == [(running.request_id, "timeout")]


def sse_events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@pytest.mark.slow
async def test_a_cloud_api_deadline_expiring(
    start_worker: Callable[..., Any], nats_url: str
) -> None:
    """`X-Request-Timeout: 3` on requests that need far longer: the whole answer is a 504
    `timeout` in OpenAI's envelope; the stream, already started, ends with a `timeout`
    error event then `[DONE]`; the worker stops both."""
    worker = await start_worker()
    assert worker.engine is not None
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG_ANSWER, "temperature": 0}
    headers = {"X-Request-Timeout": "3"}
    async with (
        serve_cloud_api(nats_url, models=[MODEL]) as url,
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
    ):

        async def streamed() -> tuple[int, list[str]]:
            stream_body = {**body, "stream": True}
            async with http.stream(
                "POST", "/v1/completions", json=stream_body, headers=headers
            ) as response:
                return response.status_code, [line async for line in response.aiter_lines()]

        whole, (stream_status, lines) = await asyncio.gather(
            http.post("/v1/completions", json=body, headers=headers), streamed()
        )
    assert whole.status_code == 504
    error = whole.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("timeout_error", None, "timeout")
    assert "timeout" in error["message"]

    assert stream_status == 200
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    streamed_error = json.loads(events[-2])["error"]
    assert (streamed_error["type"], streamed_error["code"]) == ("timeout_error", "timeout")
    assert any(json.loads(e)["choices"][0]["text"] for e in events[:-2])  # it had started

    await eventually(lambda: worker.admitted == 0, "the worker let both requests go")
    await eventually(lambda: engine_idle(worker), "the engine freed them")
    assert worker.tokens_out < 2 * LONG_ANSWER
