"""Cloud fixtures: real in-process cloud workers on the test's nats-server.

- `start_cloud_worker`: a factory of started workers, closed after the test.
- `cloud_long_model`: a tiny random Llama with a long context window (`LONG_CONTEXT`), built
  once per session, for tests that need a generation no machine finishes within seconds, or
  an input long enough that reading it takes measurable time.
- `serve_cloud_api` / `live_cloud_api`: the cloud API under a real uvicorn.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from broker.bus import connect
from tests.live import serve_app

#: Context window of `cloud_long_model`, in tokens.
LONG_CONTEXT = 8192
#: A worker's KV cache for `cloud_long_model`: two requests of a whole window each.
LONG_CACHE_TOKENS = 2 * LONG_CONTEXT


@pytest.fixture
async def start_cloud_worker(nats_url: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await start_cloud_worker(model_dir, **WorkerSettings overrides)` -> a started
    `cloud.worker.CloudWorker` on its own connection (one thread, a small KV cache); every
    worker and connection is closed after the test."""
    from cloud.settings import WorkerSettings
    from cloud.worker import CloudWorker

    workers: list[CloudWorker] = []
    clients = []

    async def start(model_dir: Path, **overrides: Any) -> CloudWorker:
        nc = await connect(nats_url, name="test-cloud-worker")
        clients.append(nc)
        values: dict[str, Any] = {
            "model_dir": model_dir,
            "threads": 1,
            "cache_tokens": 4096,
            "max_batch_tokens": 512,
            **overrides,
        }
        worker = CloudWorker(nc, WorkerSettings(**values))
        workers.append(worker)
        await worker.start()
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            await worker.close()
        for nc in clients:
            with contextlib.suppress(Exception):
                await nc.close()


@pytest.fixture(scope="session")
def cloud_long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose window is `LONG_CONTEXT` tokens (read-only).

    Greedy from "Hello" it writes no end token within the window, and it decodes a few
    hundred tokens a second on one CPU thread: a request for thousands of tokens runs for
    many seconds, so a test can rely on it still running after a deadline of one or two.
    """
    from models.random_model import make_random_llama

    return make_random_llama(
        tmp_path_factory.mktemp("cloud_long_model"), context_length=LONG_CONTEXT
    )


@asynccontextmanager
async def live_cloud_api(
    nats_url: str, *, http: Any = None, **settings: Any
) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """The cloud API (`ApiSettings` overrides in `settings`) under a real uvicorn on a free
    port, on the test's nats-server, with uvicorn's protocol class `http` when given (the
    CLI's slow-client deadlines: `serving.slow_clients.deadline_protocol`); yields
    (server, base URL)."""
    from cloud.api import create_app
    from cloud.settings import ApiSettings

    app = create_app(ApiSettings(port=0, **settings), nats_url=nats_url)
    config = {} if http is None else {"http": http}
    async with serve_app(app, **config) as (server, url):
        yield server, url


@asynccontextmanager
async def serve_cloud_api(nats_url: str, **settings: Any) -> AsyncIterator[str]:
    """`live_cloud_api` yielding only the base URL."""
    async with live_cloud_api(nats_url, **settings) as (_, url):
        yield url
