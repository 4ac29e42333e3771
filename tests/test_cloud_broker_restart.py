"""A broker restart in the middle of requests through the cloud API (real nats-server
restarted on the same port, real worker, the API under uvicorn).

docs/cloud.md ("Errors"): no answer in time is a 504 `timeout`; a stream that fails after it
started sends an error event then `[DONE]`, and never just hangs. docs/broker.md: once
connected, a service reconnects forever, so restarting the broker does not take the fleet
down: the next request is served.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.server import NatsServer
from tests.fixtures_cloud import LONG_CACHE_TOKENS, LONG_CONTEXT, serve_cloud_api
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

MODEL = "hg-cloud"
#: The API's longest wait between two pieces of an answer: the outage outlasts it.
IDLE_TIMEOUT_S = 1.0


async def test_a_broker_restart_mid_request(
    start_cloud_worker: Callable[..., Any],
    cloud_long_model: Path,
    nats_server: NatsServer,
    nc: Client,
    tmp_path: Path,
) -> None:
    """Two long requests, one streamed, are running when the broker stops. While it is down
    both fail as documented (the whole one 504 `timeout`, the stream an error event then
    `[DONE]`); once it is back on the same port, the API and the worker reconnect by
    themselves and the next request gets the same answer as before the restart."""
    worker = await start_cloud_worker(
        cloud_long_model, cache_tokens=LONG_CACHE_TOKENS, node_id="cloud-restart"
    )
    sent: list[str] = []

    async def on_request(msg: Msg) -> None:  # beside the worker's queue group: sees all
        sent.append(wire.decode(msg.data, wire.GenerateRequest).request_id)

    await nc.subscribe(subjects.gen(MODEL), cb=on_request)
    await nc.flush()
    port = int(nats_server.client_url.rsplit(":", 1)[1])
    again = NatsServer(store_dir=tmp_path / "again", port=port)
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    long = {**short, "max_tokens": LONG_CONTEXT - 100}  # runs far longer than this test
    try:
        async with (
            serve_cloud_api(nats_server.client_url, idle_timeout_s=IDLE_TIMEOUT_S) as url,
            httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
        ):
            before = await http.post("/v1/completions", json=short)
            assert before.status_code == 200, before.text
            whole = asyncio.ensure_future(http.post("/v1/completions", json=long))
            events: list[str] = []
            async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as s:
                assert s.status_code == 200
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                    if len(events) == 2 and nats_server.running:  # the role, then a token
                        await eventually(lambda: worker.admitted == 2, "both requests run")
                        await nats_server.shutdown()
            timed_out = await whole

            assert timed_out.status_code == 504
            assert timed_out.json()["error"]["code"] == "timeout"
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "timeout"

            await again.start()

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually(ready, "the API and the worker are back on the bus")
            after = await http.post("/v1/completions", json=short)
            assert after.status_code == 200, after.text
            assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
            assert after.json()["worker"] == "cloud-restart"
    finally:
        # The two long requests' cancels were published while the broker was down: stop
        # them here whatever became of those.
        for request_id in sent:
            await nc.publish(subjects.cancel(request_id), b"")
        await eventually(lambda: worker.admitted == 0, "the worker let the long requests go")
        await again.shutdown()
