"""Edge fixtures: the edge runtime on the session's tiny int4 model (`runtime`), a live edge
app (real uvicorn, in the test's event loop) on the test's nats-server, and a real cloud
worker with the session's tiny cloud model."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect
from edge.api.app import create_app
from edge.runtime import EdgeRuntime
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.live import serve_app
from tests.waits import BOUND_S

#: The admin user key (`KEY@*`) the `start_edge` edges accept: tests acting for users send it.
ADMIN_KEY = "test-admin-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class LiveEdge:
    """A running edge: its app, its base URL and its node id."""

    app: FastAPI
    url: str
    node_id: str

    @property
    def node(self) -> Any:
        """The edge's `EdgeNode`."""
        return self.app.state.service.node

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
        """An OpenAI client on this edge (no retries; `ADMIN_KEY` to act for users)."""
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs
        )


@asynccontextmanager
async def serve_edge(settings: EdgeSettings) -> AsyncIterator[LiveEdge]:
    """Run the edge app under a real uvicorn server on a free port, in this event loop."""
    app = create_app(settings)
    async with serve_app(app, lifespan="on") as (_, url):
        yield LiveEdge(app, url, settings.node_id or "")


@pytest.fixture
def edge_dir(tiny_models: ModelSet) -> Path:
    return tiny_models.edge_dir("int4")


@pytest.fixture
async def runtime(edge_dir: Path) -> AsyncIterator[EdgeRuntime]:
    """An `EdgeRuntime` on the tiny int4 model (1 thread, 2 active, 4 queued), closed after."""
    rt = EdgeRuntime(edge_dir, threads=1, max_active=2, max_queue=4)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def start_edge(
    edge_dir: Path, nats_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[LiveEdge]]]:
    """`await start_edge(**EdgeSettings overrides)` -> a running edge, stopped after; it
    accepts `ADMIN_KEY` for every user, and keeps its users in the test's folder (never in
    the user's `HG_HOME`)."""
    stack = contextlib.AsyncExitStack()
    count = 0

    async def start(**overrides: Any) -> LiveEdge:
        nonlocal count
        count += 1
        values: dict[str, Any] = {
            "model_dir": edge_dir,
            "nats_url": nats_url,
            "node_id": f"edge-test-{count}",
            "users_db": tmp_path / f"edge-test-{count}" / "users.sqlite3",
            "threads": 1,
            "reconnect_s": 0.2,
            "user_keys": [f"{ADMIN_KEY}@*"],
            **overrides,
        }
        return await stack.enter_async_context(serve_edge(EdgeSettings(**values)))

    async with stack:
        yield start


@pytest.fixture
def start_worker(
    start_cloud_worker: Callable[..., Awaitable[Any]], tiny_models: ModelSet
) -> Callable[..., Awaitable[Any]]:
    """`await start_worker()` -> a real cloud worker (tiny cloud model), closed after."""
    return functools.partial(
        start_cloud_worker, tiny_models.cloud_dir, cache_tokens=2048, max_batch_tokens=256
    )


# ------------------------------------------------------------- streams, stand-ins, processes


async def sse_lines(
    http: httpx.AsyncClient, payload: dict[str, Any], path: str = "/v1/completions", **kwargs: Any
) -> list[str]:
    """POST a streamed request and return its `data:` lines (the connection must end them)."""
    async with http.stream("POST", path, json=payload, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        return [line async for line in response.aiter_lines() if line.startswith("data: ")]


def sse_json(line: str) -> dict[str, Any]:
    """The JSON of one `data: {...}` line."""
    data: dict[str, Any] = json.loads(line[len("data: ") :])
    return data


def ends_well(events: list[str]) -> dict[str, Any]:
    """The stream ended with `[DONE]`; returns the last JSON event before it."""
    assert events and events[-1] == "data: [DONE]", events[-3:]
    return sse_json(events[-2])


@contextlib.asynccontextmanager
async def stand_in(
    nats_url: str, handler: Callable[[wire.GenerateRequest, Responder], Any]
) -> AsyncIterator[None]:
    """A responder on `hg.gen.hg-cloud` run by the real `GenerationService`, for the replies
    no real worker can be made to send on demand (its users say which)."""
    worker_nc = await connect(nats_url, name="stand-in-worker")
    try:
        async with GenerationService(
            worker_nc, model="hg-cloud", handler=handler, node_id="stand-in"
        ):
            yield
    finally:
        await worker_nc.close()


@contextlib.asynccontextmanager
async def worker_process(
    nc: Client, nats_url: str, model_dir: Path, node_id: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A real cloud worker in its own process (`python -m cloud worker`), ready (its first
    `ready` heartbeat seen) when this enters; killed at the end if still running."""
    ready = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        beat = wire.decode(msg.data, wire.Heartbeat)
        if beat.node_id == node_id and beat.status == "ready":
            ready.set()

    sub = await nc.subscribe(subjects.telemetry_of_role("cloud"), cb=on_beat)
    env = {**os.environ, "HG_CLOUD_THREADS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(  # noqa: ASYNC220 (a worker process to kill)
        [sys.executable, "-m", "cloud", "worker", "--model-dir", str(model_dir),
         "--nats", nats_url, "--node-id", node_id, "--model", "hg-cloud"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), BOUND_S)
        await sub.unsubscribe()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        await asyncio.to_thread(process.wait, BOUND_S)
