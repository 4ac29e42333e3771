"""Edge fixtures: the edge runtime on the session's tiny int4 model (`runtime`), a live edge
app (real uvicorn, in the test's event loop) on the test's nats-server, and a real cloud
worker with the session's tiny cloud model."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from edge.app import create_app
from edge.runtime import EdgeRuntime
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.live import serve_app

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
