"""Speculative decoding through a real edge (uvicorn, a real broker): what an answer reports
in `usage`, the request's and the policy's switches, `/metrics` and the heartbeat."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from nats.aio.client import Client

from broker import subjects, wire
from broker.store import FleetConfig
from tests.fixtures_edge import LiveEdge
from tests.waits import eventually

#: A prompt the tiny edge model continues by repeating itself (so its answers draft).
PROMPT = "copy and distribute verbatim copies. copy and distribute"


async def complete(edge: LiveEdge, **body: Any) -> dict[str, Any]:
    fields = {"model": "hg-edge", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **body}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        response = await http.post("/v1/completions", json=fields)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def drafted(body: dict[str, Any]) -> dict[str, int] | None:
    return body["usage"].get("completion_tokens_details")  # type: ignore[no-any-return]


async def test_an_answer_reports_its_drafts_and_either_switch_turns_them_off(
    start_edge: Callable[..., Any], nc: Client
) -> None:
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    edge = await start_edge(policy={"perplexity_threshold": 1e9}, telemetry_interval_s=0.2)
    runtime = edge.node.runtime

    on = await complete(edge)
    details = drafted(on)
    assert details is not None and set(details) == {"draft_tokens", "accepted_tokens"}
    assert 0 < details["accepted_tokens"] <= details["draft_tokens"]
    assert (runtime.draft_tokens, runtime.accepted_tokens) == (
        details["draft_tokens"],
        details["accepted_tokens"],
    )
    off = await complete(edge, speculative=False)
    assert drafted(off) is None
    assert off["choices"][0]["text"] == on["choices"][0]["text"]

    # Two choices: the usage counts both answers' drafts (greedy, so the same twice).
    two = await complete(edge, n=2)
    assert drafted(two) == {k: 2 * v for k, v in details.items()}

    # Streamed: the usage chunk carries them.
    stream = {"model": "hg-edge", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
              "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=stream) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    assert drafted(json.loads(lines[-1][6:])) == details

    async with httpx.AsyncClient(base_url=edge.url) as http:
        scraped = (await http.get("/metrics")).text
    assert f"hybridgen_edge_draft_tokens {float(runtime.draft_tokens)}" in scraped
    assert f"hybridgen_edge_accepted_draft_tokens {float(runtime.accepted_tokens)}" in scraped
    total = runtime.draft_tokens
    await eventually(lambda: beats and beats[-1].extra.get("draft_tokens") == total)
    assert beats[-1].extra["draft_acceptance"] == round(runtime.accepted_tokens / total, 4)

    # The policy's switch, live: nothing is drafted while it is off.
    config = await FleetConfig.open(nc)
    await config.put(subjects.policy_key(), {"perplexity_threshold": 1e9, "speculative": False})
    await eventually(lambda: not edge.node.runtime.speculative, what="the policy applied")
    assert drafted(await complete(edge)) is None
    await config.put(subjects.policy_key(), {"perplexity_threshold": 1e9})
    await eventually(lambda: edge.node.runtime.speculative, what="the policy back on")
    assert drafted(await complete(edge)) == details
