"""Cloud fixtures: real in-process cloud workers on the test's nats-server.

- `start_cloud_worker`: a factory of started workers, closed after the test.
- `cloud_long_model`: a tiny random Llama with a long context window (`LONG_CONTEXT`), built
  once per session, for tests that need a generation no machine finishes within seconds, or
  an input long enough that reading it takes measurable time.
- `serve_cloud_api` / `live_cloud_api`: the cloud API under a real uvicorn, in-process.
- `cli_cloud_api`: the cloud API as a child process started by its CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from broker.bus import connect
from tests.live import serve_app
from tests.waits import BOUND_S, eventually

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
    from models.lab.random_model import make_random_llama

    return make_random_llama(
        tmp_path_factory.mktemp("cloud_long_model"), context_length=LONG_CONTEXT
    )


@asynccontextmanager
async def live_cloud_api(
    nats_url: str, *, http: Any = None, **settings: Any
) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """The cloud API (`ApiSettings` from the environment and `settings`) under a real uvicorn
    on a free port of its `host`, on the test's nats-server, with uvicorn's protocol class
    `http` when given (the CLI's slow-client deadlines:
    `serving.slow_clients.deadline_protocol`); yields (server, base URL on loopback)."""
    from cloud.api import create_app
    from cloud.settings import ApiSettings

    api_settings = ApiSettings(port=0, **settings)
    app = create_app(api_settings, nats_url=nats_url)
    config = (
        {"host": api_settings.host} if http is None else {"host": api_settings.host, "http": http}
    )
    async with serve_app(app, **config) as (server, url):
        yield server, url


@asynccontextmanager
async def serve_cloud_api(nats_url: str, **settings: Any) -> AsyncIterator[str]:
    """`live_cloud_api` yielding only the base URL."""
    async with live_cloud_api(nats_url, **settings) as (_, url):
        yield url


def cloud_api_env(**extra: str) -> dict[str, str]:
    """This process's environment without the `HG_CLOUD_*` settings a developer may have set
    (so a child's settings are only the test's), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HG_CLOUD_")}
    return {**env, **extra}


@asynccontextmanager
async def cli_cloud_api(
    nats_url: str, *flags: str, log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`hybridgen cloud api` as users start it (`python -m cloud api`: the CLI, its settings
    checks and uvicorn with the slow-client protocol) on a free port, its output in `log`;
    yields (process, base URL on loopback) once `/healthz` answers, and stops it with
    SIGTERM after."""
    from broker.server import free_port

    port = free_port()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cloud", "api", "--port", str(port), "--nats", nats_url),
            *flags,
            env=cloud_api_env() if env is None else env,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:

            async def serving() -> bool:
                if proc.returncode is not None:
                    text = await asyncio.to_thread(log.read_text)
                    raise AssertionError(f"the cloud API exited: {text}")
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(serving, "the cloud API serves /healthz")
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), BOUND_S)
