"""Cloud fixtures: real in-process cloud workers on the test's nats-server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.bus import connect
from tests.live import serve_app


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


@asynccontextmanager
async def serve_cloud_api(nats_url: str, **settings: Any) -> AsyncIterator[str]:
    """The cloud API (`ApiSettings` overrides in `settings`) under a real uvicorn on a free
    port, on the test's nats-server; yields its base URL."""
    from cloud.api import create_app
    from cloud.settings import ApiSettings

    app = create_app(ApiSettings(port=0, **settings), nats_url=nats_url)
    async with serve_app(app) as (_, url):
        yield url
