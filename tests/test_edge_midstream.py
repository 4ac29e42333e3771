"""A cloud that fails in the middle of a stream, through a live edge on a real nats-server.

The edge finishes the answer locally from the text already streamed (`completed_by: edge`
on the last chunk) when that text fits the edge's context and the answer is free text;
otherwise the stream ends with an error event (`unavailable`), then `[DONE]`. Each outcome
has its own test, on the input that causes it. The failures are real where a real one can be
made on demand (a worker process killed, the broker stopped); a coded `Error` reply after
some chunks, and a partial answer longer than the edge's context, come from a stand-in
(`tests.fixtures_edge.stand_in`): no real worker crashes on demand, and none can be made to
fail exactly after a given amount of text.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import wire
from broker.bus import Responder
from broker.server import NatsServer
from models.registry import ModelSet
from tests.fixtures_edge import ends_well, sse_json, sse_lines, stand_in, worker_process
from tests.waits import eventually

pytestmark = pytest.mark.slow

#: A timeout no test may wait out.
NEVER_MS = 3_600_000.0
#: The local route with the perplexity rule and the latency rule out of the way; a worker
#: may take its time to accept (its first grammar compiles meanwhile), and a silent cloud is
#: given up after a second.
POLICY = {
    "perplexity_threshold": 1e9,
    "latency_budget_ms": NEVER_MS,
    "cloud_timeout_ms": NEVER_MS,
    "cloud_idle_timeout_ms": 1000,
}
PROMPT = "Permission is hereby granted"
#: The answer fits the tiny edge's context (128 tokens) whatever part of it the cloud wrote.
FITS = 100
#: Room for the constrained answer in the tiny cloud's context (256 tokens, the prompt 17).
CONSTRAINED = 230
#: A schema no answer satisfies before 200 characters: the tiny cloud model is still
#: writing it when it fails.
LONG_STRING = {
    "type": "json_schema",
    "json_schema": {
        "name": "long",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 200}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
}


def request(max_tokens: int, **fields: Any) -> dict[str, Any]:
    """A streamed completion for the cloud."""
    return {"model": "hg-edge", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "route": "cloud", **fields}  # fmt: skip


def text_of(events: list[str]) -> str:
    """The text of a completion's stream events (`[DONE]` skipped)."""
    return "".join(
        choice.get("text", "")
        for event in events
        if event != "data: [DONE]"
        for choice in sse_json(event).get("choices", [])
    )


def assert_unfinished(events: list[str]) -> None:
    """Served by the cloud, then an `unavailable` error event and `[DONE]`, never finished
    on the edge."""
    last = ends_well(events)
    assert sse_json(events[0])["served_by"] == "cloud"
    assert (last["error"]["type"], last["error"]["code"]) == (
        "service_unavailable_error",
        "unavailable",
    )
    assert not [e for e in events[:-1] if "completed_by" in sse_json(e)]


def assert_finished_locally(events: list[str], streamed: str = "") -> None:
    """Served by the cloud, finished by the edge (`completed_by` on the last chunk)."""
    last = ends_well(events)
    assert sse_json(events[0])["served_by"] == "cloud"
    assert (last["served_by"], last["completed_by"]) == ("cloud", "edge")
    # Finished: the edge's own continuation ends at its end token or its budget (which of
    # the two depends on how much the cloud had written: not what is tested here).
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert "error" not in last
    assert text_of(events).startswith(streamed)


def assert_counted(edge: Any, *, recovered: int) -> None:
    """One cloud failure, counted by the breaker; `recovered` of them finished locally."""
    assert edge.node.counters.cloud_failures == 1
    assert edge.node.counters.mid_stream_recoveries == recovered


async def stream_until(
    http: httpx.AsyncClient, payload: dict[str, Any], events_before: int, act: Callable[[], Any]
) -> list[str]:
    """Stream `payload`, calling `act` (once) after `events_before` events; every event."""
    events: list[str] = []
    async with http.stream("POST", "/v1/completions", json=payload) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == events_before:
                result = act()
                if hasattr(result, "__await__"):
                    await result
    return events


# ------------------------------------------------------------------------- stand-ins


async def test_an_error_reply_mid_stream_is_finished_locally(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A worker whose handler crashes after two chunks answers a coded `internal` Error."""

    async def crashing(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text=" one", token_ids=[1])
        await responder.chunk(text=" two", token_ids=[2])
        raise RuntimeError("boom")

    async with stand_in(nats_url, crashing):
        edge = await start_edge(policy={**POLICY, "cloud_idle_timeout_ms": NEVER_MS})
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse_lines(http, request(16))
    assert_finished_locally(events, " one two")
    assert_counted(edge, recovered=1)


async def test_a_partial_answer_longer_than_the_edge_context_ends_with_an_error(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """The cloud fails after more text than the edge's context holds: nothing to finish
    it from, so an error event, then [DONE] (never a cut, never a silent truncation)."""
    words = [f" word{index}" for index in range(150)]

    async def long_then_crash(request: wire.GenerateRequest, responder: Responder) -> None:
        for index, word in enumerate(words):
            await responder.chunk(text=word, token_ids=[index])
        raise RuntimeError("boom")

    async with stand_in(nats_url, long_then_crash):
        edge = await start_edge(policy={**POLICY, "cloud_idle_timeout_ms": NEVER_MS})
        runtime = edge.node.runtime
        assert len(runtime.encode(PROMPT + "".join(words))) > runtime.context_length
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse_lines(http, request(200))
    assert text_of(events) == "".join(words)
    assert_unfinished(events)
    assert_counted(edge, recovered=0)


async def test_a_constrained_answer_that_fails_mid_stream_ends_with_an_error(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A grammar-constrained answer is not finished on the edge (its grammar would start
    over), even a short one: an error event, then [DONE]."""

    async def crashing(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text='{"', token_ids=[1])
        raise RuntimeError("boom")

    async with stand_in(nats_url, crashing):
        edge = await start_edge(policy={**POLICY, "cloud_idle_timeout_ms": NEVER_MS})
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            events = await sse_lines(http, request(16, response_format={"type": "json_object"}))
    assert text_of(events) == '{"'
    assert_unfinished(events)
    assert_counted(edge, recovered=0)


# ------------------------------------------------------------------ real worker killed


async def test_a_worker_killed_mid_stream_finishes_free_text_locally_not_a_constrained_one(
    start_edge: Callable[..., Any], nats_url: str, nc: Client, tiny_models: ModelSet
) -> None:
    """SIGKILL of a real worker process while it streams two answers (one process for both
    outcomes: each costs a worker start-up): free text whose answer so far fits the edge
    context (`FITS`) is finished by the edge; a grammar-constrained answer (one the grammar
    keeps open for 200 characters, so still being written) ends with an error event."""
    async with worker_process(nc, nats_url, tiny_models.cloud_dir, "cloud-victim") as victim:
        edge = await start_edge(policy=POLICY)
        started = [asyncio.Event(), asyncio.Event()]

        async def stream(payload: dict[str, Any], first_token: asyncio.Event) -> list[str]:
            async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
                return await stream_until(http, payload, 2, first_token.set)

        free = asyncio.create_task(stream(request(FITS), started[0]))
        constrained = asyncio.create_task(
            stream(request(CONSTRAINED, response_format=LONG_STRING), started[1])
        )
        streams = (free, constrained)
        await eventually(
            lambda: all(e.is_set() for e in started) or any(t.done() for t in streams),
            "both streams have their first token",
        )
        for task in streams:
            if task.done():
                task.result()  # a stream that failed before its first token: its error
        victim.send_signal(signal.SIGKILL)
        free_events, constrained_events = await asyncio.gather(free, constrained)
    assert edge.node.counters.cloud_failures == 2
    assert_finished_locally(free_events, text_of(free_events[:2]))
    assert_unfinished(constrained_events)
    assert edge.node.counters.mid_stream_recoveries == 1


# ------------------------------------------------------------------- broker restarted


async def test_a_broker_stopped_mid_stream_is_finished_locally_and_the_edge_reconnects(
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nats_server: Any,
    tmp_path: Path,
) -> None:
    """The broker stops after the cloud's first token: the answer so far fits, the edge
    finishes it; once the broker is back the edge reconnects and serves from the cloud."""
    await start_worker()
    edge = await start_edge(policy=POLICY)
    port = int(nats_server.client_url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        events = await stream_until(http, request(FITS), 2, nats_server.shutdown)
    assert_finished_locally(events, text_of(events[:2]))
    assert_counted(edge, recovered=1)
    async with NatsServer(store_dir=tmp_path / "again", port=port):
        await eventually(lambda: edge.node.bus_connected, "the edge reconnected")
        await start_worker()  # the first worker's connection may still be reconnecting
        async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
            answer = await http.post("/v1/completions", json={**request(8), "stream": False})
        assert answer.status_code == 200, answer.text
        assert answer.json()["served_by"] == "cloud"


async def test_a_constrained_answer_cut_by_a_broker_stop_ends_with_an_error(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nats_server: Any
) -> None:
    """The broker stops while the cloud writes a grammar-constrained answer: an error
    event, then [DONE]."""
    await start_worker()
    edge = await start_edge(policy=POLICY)
    async with httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        events = await stream_until(
            http, request(CONSTRAINED, response_format=LONG_STRING), 2, nats_server.shutdown
        )
    assert_unfinished(events)
    assert_counted(edge, recovered=0)
