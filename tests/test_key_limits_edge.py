"""Per-key limits and usage at the edge's API (`serving.limits`): a real edge under uvicorn on
the tiny int4 model, a real nats-server, and for the long streams a real cloud worker on a
random Llama (a request routed to the cloud streams for as long as the test needs).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.store import FleetConfig
from models.registry import EDGE_MODEL
from serving.limits import LIMITS_KEY, Limits
from tests.fixtures_edge import ADMIN_KEY, LiveEdge
from tests.test_key_limits import StepClock
from tests.waits import eventually

pytestmark = pytest.mark.slow

ALICE = "alice-edge-key"
BOB = "bob-edge-key"
CLOUD = "hg-cloud"


def sha(key: str, digits: int = 10) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:digits]


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def edge_api(
    start_edge: Callable[..., Any], limits: dict[str, Any], clock: StepClock | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Limits, LiveEdge]]:
    """An edge closed by keys alice and bob (the fixture's admin key too) under `limits`."""
    edge: LiveEdge = await start_edge(api_keys=[ALICE, BOB], key_limits=limits)
    state: Limits = edge.app.state.limits
    if clock is not None:
        state.clock = clock
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        yield http, state, edge


async def complete(http: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    payload = {"model": EDGE_MODEL, "prompt": "Hello", "max_tokens": 4, "route": "edge", **body}
    return await http.post("/v1/completions", json=payload, headers=as_key(key))


async def test_edge_requests_and_tokens_per_minute_give_429_with_headers(
    start_edge: Callable[..., Any],
) -> None:
    clock = StepClock()
    limits = {
        "alice": {"key_sha256": sha(ALICE), "rpm": 2},
        "bob": {"key_sha256": sha(BOB), "tpm": 60},
    }
    async with edge_api(start_edge, limits, clock) as (http, _, _):
        first, second = await complete(http, ALICE), await complete(http, ALICE)
        assert (first.status_code, second.status_code) == (200, 200)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        refused = await complete(http, ALICE)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-limit-requests"] == "2"

        answer = await complete(http, BOB, max_tokens=20)
        assert answer.status_code == 200, answer.text
        used = answer.json()["usage"]["total_tokens"]
        assert answer.headers["x-ratelimit-remaining-tokens"] == str(60 - used)
        assert "x-ratelimit-limit-requests" not in answer.headers  # bob has no rpm
        while (answer := await complete(http, BOB, max_tokens=20)).status_code == 200:
            assert int(answer.headers["x-ratelimit-remaining-tokens"]) >= 0
        assert answer.status_code == 429 and answer.json()["error"]["type"] == "tokens"
        clock.advance(60)  # a minute refills the bucket
        assert (await complete(http, BOB, max_tokens=20)).status_code == 200


async def test_edge_concurrency_usage_and_cancelled_streams(
    start_edge: Callable[..., Any],
    start_cloud_worker: Callable[..., Any],
    cloud_long_model: Path,
    nc: Client,
) -> None:
    await start_cloud_worker(cloud_long_model, model=CLOUD)
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    limits = {"alice": {"key_sha256": sha(ALICE), "concurrent": 1}}
    async with edge_api(start_edge, limits) as (http, state, edge):
        whole = await complete(http, ALICE)
        assert whole.status_code == 200
        local_model = whole.json()["model"]
        body = {"model": CLOUD, "prompt": "Hello", "max_tokens": 3000, "stream": True,
                "route": "cloud"}  # fmt: skip
        received = 0
        async with http.stream("POST", "/v1/completions", json=body, headers=as_key(ALICE)) as s:
            assert s.status_code == 200
            async for line in s.aiter_lines():
                received += line.startswith("data: {")
                if received == 6:
                    refused = await complete(http, ALICE)
                    assert refused.status_code == 429
                    assert "in flight" in refused.json()["error"]["message"]
                    assert (await complete(http, BOB)).status_code == 200
                    break  # the client hangs up mid-stream
        await eventually(lambda: state.states["alice"].in_flight == 0, "the stream released")
        real = await complete(http, BOB, model=CLOUD, route="cloud", max_tokens=1)

        # /v1/usage: admin keys only (the fixture's `KEY@*` user key is one).
        assert (await http.get("/v1/usage", headers=as_key(ALICE))).status_code == 403
        got = (await http.get("/v1/usage", headers=as_key(ADMIN_KEY))).json()["keys"]
        usage = whole.json()["usage"]
        assert got["alice"][local_model] == {
            "requests": 1,
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
        }
        cancelled = got["alice"][CLOUD]
        # A stream cut short counts its prompt as the worker counted it when the worker's
        # reply to the cancel reached the edge before the answer closed, else as admission
        # estimated it ("Hello": 2); which comes first is the network's business.
        prompt_counts = {2, real.json()["usage"]["prompt_tokens"]}
        assert cancelled["requests"] == 1 and cancelled["input_tokens"] in prompt_counts
        assert received - 1 <= cancelled["output_tokens"] < 3000
        assert got[f"key-{sha(BOB, 8)}"][local_model]["requests"] == 1
        # The edge's heartbeats carry the same figures.
        await eventually(
            lambda: beats and beats[-1].extra.get("usage") == got, "a heartbeat with the usage"
        )
        assert beats[-1].node_id == edge.node_id


async def test_edge_limits_change_live_through_the_fleet_config(
    start_edge: Callable[..., Any], nc: Client
) -> None:
    clock = StepClock()
    async with edge_api(start_edge, {"*": {"rpm": 1}}, clock) as (http, state, _):
        assert (await complete(http, ALICE)).status_code == 200
        assert (await complete(http, ALICE)).status_code == 429  # the setting's limit
        await eventually(lambda: state.live_updates >= 1, "the limits watch started")
        config = await FleetConfig.open(nc)
        await config.put(LIMITS_KEY, {"*": {"rpm": 5}})
        await eventually(lambda: state.live_updates >= 2, "the fleet's limits in force")
        raised = await complete(http, ALICE)
        assert raised.status_code == 200
        assert raised.headers["x-ratelimit-limit-requests"] == "5"
        assert raised.headers["x-ratelimit-remaining-requests"] == "3"
